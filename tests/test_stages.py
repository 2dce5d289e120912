"""Both StructLoRA stages act: the smoothing coordinator (Eq. 14-15, Theorem 1), similarity edges by
k nearest layers, and hard-concrete gates that reach a target keep ratio through a Lagrange multiplier."""
from __future__ import annotations

import math

import pytest
import torch

from structlora.coordinator import DepthCoordinator, chain_adjacency, knn_edges, laplacian
from structlora.gates import FamilyGate


def _energy(u: torch.Tensor, lap: torch.Tensor) -> torch.Tensor:
    """E(U) = sum over edges ||u_a - u_b||^2 = tr(U^T L U) for U (L, n) (one flattened update per row)."""
    return torch.einsum("ln,lm,mn->", u, lap, u)


@pytest.mark.parametrize("layers", [2, 6, 12])
def test_smoother_obeys_theorem_1_and_stays_invertible(layers: int):
    coord = DepthCoordinator(layers, "adjacency", mode="smoother", eta_init=0.5)
    lap = laplacian(coord.adjacency)
    lam_max = float(torch.linalg.eigvalsh(lap).max())
    assert math.isclose(lam_max, 2 + 2 * math.cos(math.pi / layers), rel_tol=1e-5)   # chain spectrum
    eta = float(coord.eta())
    assert 0 < eta < 1 / lam_max and math.isclose(eta, 0.5 / lam_max, rel_tol=1e-5)
    m = coord.mixing().detach()
    assert torch.allclose(m.sum(-1), torch.ones(layers), atol=1e-6)                   # depth-constant passes
    assert float(torch.linalg.eigvalsh(m).min()) > 0                                   # SPD: no capacity lost
    g = torch.Generator().manual_seed(layers)
    for _ in range(5):
        u = torch.randn(layers, 40, generator=g)
        bound = _energy(u, lap) - eta * (1 - eta * lam_max) * (lap @ u).pow(2).sum()
        assert float(_energy(m @ u, lap)) <= float(bound) + 1e-5


def test_smoother_eta_is_learned_below_eta_max_and_frozen_on_request():
    coord = DepthCoordinator(6, "adjacency", mode="smoother", eta_init=0.5)
    opt = torch.optim.SGD(coord.parameters(), lr=100.0)
    target = torch.randn(6, 6)
    for _ in range(20):
        opt.zero_grad()
        (coord.mixing() - target).pow(2).sum().backward()   # pushes eta anywhere: it must stay < eta_max
        opt.step()
        assert 0 < float(coord.eta()) < float(coord.eta_max())
    frozen = DepthCoordinator(6, "adjacency", mode="smoother", learn_eta=False)
    assert list(frozen.parameters()) == [] and "theta" in frozen.state_dict()


def test_edge_corrections_start_at_zero_and_stay_symmetric_on_edges():
    coord = DepthCoordinator(5, "adjacency", mode="smoother", edge_corrections=True)
    base = DepthCoordinator(5, "adjacency", mode="smoother")
    assert torch.allclose(coord.mixing(), base.mixing())
    with torch.no_grad():
        coord.corrections.normal_()
    m = coord.mixing().detach()
    assert torch.allclose(m, m.T, atol=1e-6)
    off = (chain_adjacency(5) + torch.eye(5)) == 0
    assert torch.all(m[off] == 0)                                  # no coupling outside the graph


def test_gains_mode_is_kept_as_the_zero_start_ablation():
    coord = DepthCoordinator(4, "adjacency", mode="gains")
    assert torch.equal(coord.mixing().detach(), torch.eye(4)) and coord.gains.shape == (1, 4, 4)


def test_knn_edges_join_each_layer_to_its_nearest_non_adjacent_layers():
    cos = torch.tensor([[1.0, 0.9, 0.1, 0.6],
                        [0.9, 1.0, 0.2, 0.05],
                        [0.1, 0.2, 1.0, 0.8],
                        [0.6, 0.05, 0.8, 1.0]])
    edges = knn_edges(cos, k=1, exclude=chain_adjacency(4))
    # non-adjacent candidates: 0-2, 0-3, 1-3; layer 0 -> 3 (0.6), 1 -> 3 (0.05), 2 -> 0 (0.1), 3 -> 0 (0.6)
    expected = torch.zeros(4, 4)
    for a, b in [(0, 3), (1, 3), (0, 2)]:
        expected[a, b] = expected[b, a] = 1
    assert torch.equal(edges, expected)


def test_similarity_edges_form_by_knn_and_average_across_refreshes():
    coord = DepthCoordinator(4, "hybrid", mode="smoother", sim_rule="knn", sim_k=1, sim_ema=0.5)
    cos = torch.full((4, 4), 0.02)
    cos[0, 3] = cos[3, 0] = 0.05
    coord.set_similarity(cos)
    assert coord.adjacency[0, 3] == 1 and coord.summary()["similarity_edges"] >= 1   # forms at |cos| << 0.3
    flip = cos.clone()
    flip[0, 3] = flip[3, 0] = 0.0
    flip[0, 2] = flip[2, 0] = 0.06
    coord.set_similarity(flip)                     # one noisy refresh: the average still favours 0-3
    assert coord.adjacency[0, 3] == 1
    thr = DepthCoordinator(4, "hybrid", mode="smoother", sim_rule="threshold", sim_threshold=0.3)
    thr.set_similarity(cos)
    assert torch.equal(thr.adjacency, thr.chain)   # the threshold rule of the earlier reading: no edge


def test_lagrangian_gates_end_within_one_direction_of_the_target():
    torch.manual_seed(0)
    layers, r, rho = 3, 8, 0.5
    gate = FamilyGate(layers, r, "concrete", "ib", None, init=2.0, temperature=2 / 3, sigma=0.5, seed=0,
                      target=rho)
    usefulness = torch.rand(layers, r)              # a toy task that prefers some directions
    opt = torch.optim.Adam([{"params": [gate.logits], "lr": 0.05}, {"params": [gate.lagrange], "lr": 0.05}])
    for _ in range(600):
        opt.zero_grad()
        m = gate(True)
        loss = -(usefulness * m).sum() / r + gate.lagrangian()
        loss.backward()
        opt.step()
    raw_open = (gate.gate_values(False) > 0).sum(-1)              # before the eval top-k safeguard
    target = math.ceil(rho * r)
    assert torch.all((raw_open - target).abs() <= 1), raw_open.tolist()
    assert torch.all((gate(False) > 0).sum(-1) <= target)
    assert gate.closed_count() >= layers * (r - target)
    # it kept the useful directions
    kept = gate(False) > 0
    assert float(usefulness[kept].mean()) > float(usefulness[~kept].mean())


def test_held_gates_get_no_gradient():
    gate = FamilyGate(2, 4, "concrete", "ib", None, 2.0, 2 / 3, 0.5, seed=0)
    gate.hold = True
    assert not gate(True).requires_grad
    gate.hold = False
    gate(True).sum().backward()
    assert gate.logits.grad is not None


def test_gaussian_gate_penalty_is_the_kl_of_its_additive_noise():
    gate = FamilyGate(1, 4, "gaussian", "ib", None, 0.0, 2 / 3, sigma=0.5, seed=0)
    mu = torch.sigmoid(gate.logits.detach())
    torch.manual_seed(0)
    samples = torch.stack([gate(True).detach() for _ in range(4000)])
    assert torch.allclose(samples.std(0), torch.full_like(mu, 0.5), atol=0.03)     # additive, sigma
    q = torch.distributions.Normal(mu, 0.5)
    prior = torch.distributions.Normal(torch.zeros_like(mu), 0.5)
    kl = torch.distributions.kl_divergence(q, prior).mean(-1)
    assert torch.allclose(gate.module_compression().detach(), kl, atol=1e-6)

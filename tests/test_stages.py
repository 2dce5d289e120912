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
    opt = torch.optim.Adam([gate.logits], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        m = gate(True)
        loss = -(usefulness * m).sum() / r + gate.lagrangian()
        loss.backward()
        opt.step()
        gate.dual_step()
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
    gate(True).sum().backward()
    assert torch.count_nonzero(gate.logits.grad) == 0       # zero, not None: DDP still sees it used
    gate.hold = False
    gate(True).sum().backward()
    assert torch.count_nonzero(gate.logits.grad) > 0


def test_gaussian_gate_penalty_is_the_kl_of_its_additive_noise():
    gate = FamilyGate(1, 4, "gaussian", "ib", None, 0.0, 2 / 3, sigma=0.5, seed=0)
    mu = torch.sigmoid(gate.logits.detach())
    torch.manual_seed(0)
    samples = torch.stack([(gate.new_step(), gate(True).detach())[1] for _ in range(4000)])   # a new step: new noise
    assert torch.allclose(samples.std(0), torch.full_like(mu, 0.5), atol=0.03)     # additive, sigma
    q = torch.distributions.Normal(mu, 0.5)
    prior = torch.distributions.Normal(torch.zeros_like(mu), 0.5)
    kl = torch.distributions.kl_divergence(q, prior).mean(-1)
    assert torch.allclose(gate.module_compression().detach(), kl, atol=1e-6)


# ------------------------------------------------------------------------------ in the model
from types import SimpleNamespace  # noqa: E402

from structlora import StructLoraConfig, get_structlora_model  # noqa: E402
from toy import tiny_bert, toy_batch  # noqa: E402


def _bert(**kw):
    cfg = StructLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", **kw)
    return get_structlora_model(tiny_bert(layers=4), cfg)


def _one_step(sm, lr: float = 1e-2):
    opt = torch.optim.AdamW(sm.structlora_param_groups(lr, 0.0))
    sm.train()
    (sm(**toy_batch(n=16)).loss + sm.structlora_loss()).backward()
    opt.step()
    return sm.eval().effective_factors(drop_zero=False)


def test_default_coordinator_acts_from_the_first_step():
    """One step from identical seeds: the coordinated model's update differs from the uncoordinated one
    (the smoother mixes gradients across depth while B = 0), and the zero-start gains do not act."""
    torch.manual_seed(0)
    coordinated = _one_step(_bert(gate=None, graph="adjacency"))
    torch.manual_seed(0)
    plain = _one_step(_bert(gate=None, graph=None))
    torch.manual_seed(0)
    gains = _one_step(_bert(gate=None, graph="adjacency", coordinator="gains"))
    diff = max(float((coordinated[n][0] @ coordinated[n][1] - plain[n][0] @ plain[n][1]).abs().max()) for n in plain)
    same = max(float((gains[n][0] @ gains[n][1] - plain[n][0] @ plain[n][1]).abs().max()) for n in plain)
    assert diff > 1e-4 and same < 1e-7, (diff, same)


def test_initial_mixing_obeys_theorem_1_on_random_factors():
    sm = _bert(gate=None, graph="adjacency")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in sm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    from structlora.diagnostics import uncoordinated_factors
    from structlora.lowrank import drift_energy, gram_matrix

    eff = sm.eval().effective_factors(drop_zero=False)
    for fam, before in zip(sm.families, uncoordinated_factors(sm).values()):
        lap = laplacian(fam.coord.adjacency)
        lam = float(torch.linalg.eigvalsh(lap).max())
        eta = float(fam.coord.eta())
        assert 0 < eta < 1 / lam
        lu = float(torch.trace(lap @ gram_matrix(before) @ lap))
        e0, e1 = float(drift_energy(before)), float(drift_energy([eff[n] for n in fam.names]))
        assert e1 <= e0 - eta * (1 - eta * lam) * lu + 1e-6 * e0


class _ResidualToy(torch.nn.Module):
    """h <- h + proj_l(h) with zero base weights: every layer sees the same input and output gradient,
    so the gradients dL/dW of non-adjacent layers are aligned (cosine 1)."""

    def __init__(self, layers: int = 4, dim: int = 8) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"proj": torch.nn.Linear(dim, dim, bias=False)})
                                          for _ in range(layers))
        for blk in self.layers:
            torch.nn.init.zeros_(blk["proj"].weight)
        self.head = torch.nn.Linear(dim, 1)

    def forward(self, x, y):
        h = x
        for blk in self.layers:
            h = h + blk["proj"](h)
        out = self.head(h).squeeze(-1)
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(out, y), logits=out)


def test_similarity_edges_form_when_non_adjacent_gradients_align():
    torch.manual_seed(0)
    cfg = StructLoraConfig(r=2, lora_alpha=2, target_modules=["proj"], gate=None, graph="similarity",
                           sim_refresh_every=3, sim_batches=2, sim_sketch_dim=32)
    sm = get_structlora_model(_ResidualToy(), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in sm.named_parameters():
            if "lora_B" in n:
                p.copy_(1e-3 * torch.randn(p.shape, generator=g))
    sm.train()
    for step in range(4):   # capture at steps 0-1, edges rebuilt at step 2
        x, y = torch.randn(32, 8, generator=g), torch.randn(32, generator=g)
        sm(x=x, y=y).loss.backward()
    coord = sm.families[0].coord
    assert float(coord.sim_ema[0, 2]) > 0.9 and float(coord.sim_ema[0, 3]) > 0.9   # aligned, non-adjacent
    assert coord.summary()["similarity_edges"] >= 2


def test_lagrangian_target_closes_gates_to_the_target_in_training():
    torch.manual_seed(0)
    sm = _bert(gate="concrete", graph="adjacency", target_keep_ratio=0.5, gate_warmup_steps=5, lambda_ib=0.0,
               gate_lr_multiplier=20.0, target_ramp_steps=50)
    opt = torch.optim.AdamW(sm.structlora_param_groups(1e-2, 0.0))
    sm.train()
    for step in range(120):
        (sm(**toy_batch(n=16, seed=step)).loss + sm.structlora_loss()).backward()
        opt.step()
        opt.zero_grad()
    sm.eval()
    for fam in sm.families:
        raw_open = (fam.gate.gate_values(False) > 0).sum(-1)       # the gates themselves, no top-k safeguard
        assert torch.all((raw_open - 2).abs() <= 1), raw_open.tolist()
    from structlora.diagnostics import stage_evidence

    ev = stage_evidence(sm)
    assert ev["closed_directions"] == ev["closed_target"] == 16   # 8 modules x (4 - 2)


def test_target_schedule_ramps_from_all_open_to_the_target():
    sm = _bert(gate="concrete", graph=None, target_keep_ratio=0.25, gate_warmup_steps=10, target_ramp_steps=100)
    for step, want in ((0, 1.0), (10, 1.0), (60, 0.625), (110, 0.25), (500, 0.25)):
        sm.structlora_step.fill_(step)
        assert sm.target_now() == pytest.approx(want)

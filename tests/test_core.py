"""StructLoRA core: parity with peft, Theorem 1, gates, filters, graph, validation, Trainer, DDP."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from structlora import StructLoraConfig, get_structlora_model
from structlora.coordinator import laplacian, normalized_adjacency
from structlora.lowrank import drift_energy, frob_inner, gram_matrix
from toy import randomize_lora, tiny_bert, toy_batch

TARGETS = ["query", "value"]


def make(**kw) -> "torch.nn.Module":
    base = kw.pop("base", None) or tiny_bert()
    cfg = StructLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="SEQ_CLS", **kw)
    return get_structlora_model(base, cfg)


def test_parity_with_peft_lora_outputs_and_gradients():
    batch = toy_batch()
    peft_model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="SEQ_CLS"))
    sm = make(gate=None, graph=None)
    randomize_lora(peft_model)
    randomize_lora(sm)
    peft_model.train(), sm.train()
    out_p, out_s = peft_model(**batch), sm(**batch)
    torch.testing.assert_close(out_s.logits, out_p.logits, rtol=0, atol=1e-6)
    out_p.loss.backward()
    (out_s.loss + sm.structlora_loss()).backward()
    grads_p = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    grads_s = {n.removeprefix("peft_model."): p.grad for n, p in sm.named_parameters() if p.requires_grad}
    assert grads_p.keys() == grads_s.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_s[name], grads_p[name], rtol=1e-5, atol=1e-6, msg=name)
    assert float(sm.structlora_loss()) == 0.0


def test_coordinator_starts_exactly_as_lora():
    """coordinator='gains' (the zero-start ablation): the coordinated forward equals plain LoRA (Eq. 4 residual)."""
    batch = toy_batch()
    peft_model = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="SEQ_CLS"))
    sm = make(gate=None, graph="hybrid", coordinator="gains")
    for model in (peft_model, sm):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g))
    sm.eval(), peft_model.eval()
    torch.testing.assert_close(sm(**batch).logits, peft_model(**batch).logits, rtol=0, atol=1e-6)


def test_effective_factors_match_first_principles():
    """dW_l = sum_j M_lj s B_j diag(m_j) A_j, built densely, equals the exported factors."""
    sm = make(gate="concrete", graph="adjacency", gnn_steps=2)
    randomize_lora(sm)
    with torch.no_grad():
        for gate in sm.gates.values():
            gate.logits.copy_(torch.linspace(-4, 4, gate.logits.numel()).reshape(gate.logits.shape))
    sm.eval()
    eff = sm.effective_factors(drop_zero=True)
    for fam in sm.families:
        m = fam.gate(False)
        mix = fam.coord.mixing().detach()
        s = fam.scalings
        for l, name in enumerate(fam.names):
            dense = sum(mix[l, j] * s[j] * fam.B(j) @ torch.diag(m[j]) @ fam.A(j) for j in range(len(fam.names)))
            b, a = eff[name]
            torch.testing.assert_close(b @ a, dense.detach(), rtol=1e-5, atol=1e-6)
    assert any((m == 0).any() for m in [f.gate(False) for f in sm.families]), "linspace logits must close some gates"


def _set_smoothing_gains(coord, eta: float) -> None:
    """Gains with I + S o G = I - eta L (Eq. 15) on every step."""
    lap = laplacian(coord.adjacency)
    s = normalized_adjacency(coord.adjacency)
    with torch.no_grad():
        coord.gains.copy_(torch.where(s > 0, -eta * lap / s.clamp_min(1e-12), torch.zeros_like(s)).expand_as(coord.gains))


def _raw_factors(sm, fam):
    return [(fam.B(l).detach() * fam.scalings[l], fam.A(l).detach()) for l in range(len(fam.names))]


@pytest.mark.parametrize("coordinator", ["smoother", "gains"])
def test_theorem1_one_smoothing_step_lowers_drift_energy(coordinator):
    sm = make(gate=None, graph="adjacency", base=tiny_bert(layers=5), coordinator=coordinator, eta_init=0.9)
    randomize_lora(sm, std=1.0)
    sm.eval()
    for fam in sm.families:
        lap = laplacian(fam.coord.adjacency)
        lam_max = float(torch.linalg.eigvalsh(lap).max())
        eta = 0.9 / lam_max
        if coordinator == "gains":
            _set_smoothing_gains(fam.coord, eta)
        else:
            assert abs(float(fam.coord.eta()) - eta) < 1e-6    # eta_init is a fraction of eta_max
        before = _raw_factors(sm, fam)
        e0 = float(drift_energy(before))
        g = gram_matrix(before)
        lu_sq = float(torch.trace(lap @ g @ lap))             # ||(L (x) I) U||^2 through the Gram matrix
        sm.reset_states()
        eff = sm.effective_factors()
        e1 = float(drift_energy([eff[n] for n in fam.names]))
        assert e1 < e0
        assert e1 <= e0 - eta * (1 - eta * lam_max) * lu_sq + 1e-6 * e0   # the bound of Theorem 1


def test_many_smoothing_steps_oversmooth_to_constant_depth_signal():
    sm = make(gate=None, graph="adjacency", gnn_steps=200, base=tiny_bert(layers=4), eta_init=0.9)
    randomize_lora(sm, std=1.0)
    sm.eval()
    fam = sm.families[0]
    e0 = float(drift_energy(_raw_factors(sm, fam)))
    eff = sm.effective_factors()
    factors = [eff[n] for n in fam.names]
    assert float(drift_energy(factors)) < 1e-6 * e0
    mean = [(torch.cat([b for b, _ in _raw_factors(sm, fam)], 1) / len(fam.names), torch.cat([a for _, a in _raw_factors(sm, fam)], 0))]
    for f in factors:  # every layer collapses to the depth average (projector onto Null(L))
        diff = frob_inner(*f, *f) + frob_inner(*mean[0], *mean[0]) - 2 * frob_inner(*f, *mean[0])
        assert float(diff) < 1e-6 * float(frob_inner(*f, *f))


def _train(sm, steps: int, lr: float = 1e-2, seed: int = 0):
    opt = torch.optim.AdamW(sm.structlora_param_groups(lr, 0.0))
    sm.train()
    for step in range(steps):
        batch = toy_batch(n=16, seed=seed + step)
        loss = sm(**batch).loss + sm.structlora_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
    sm.eval()
    return sm


def test_concrete_gates_reach_exact_zeros_and_export_drops_them(tmp_path):
    sm = make(gate="concrete", graph=None, lambda_ib=5.0, gate_lr_multiplier=30.0, gate_warmup_steps=0)
    with torch.no_grad():  # half the gates start near the boundary, half wide open
        for gate in sm.gates.values():
            gate.logits[:, :2] = 0.0
            gate.logits[:, 2:] = 6.0
    _train(sm, steps=12)
    report = sm.structlora_report().to_pandas()
    assert (report["kept"] == 2).all(), report[["module", "kept"]]  # exact zeros, from the compression term alone
    summary = sm.save_pretrained(str(tmp_path / "adapter"))
    assert sum(summary["ranks"].values()) == report["kept"].sum()
    assert all(rank == k for rank, k in zip(summary["ranks"].values(), report.set_index("module")["kept"].loc[
        ["base_model.model." + n for n in summary["ranks"]]]))


def test_gaussian_gate_penalty_is_l2_of_mean_gate():
    """lambda_IB times the sum over modules of each module's mean KL mu^2 / (2 sigma^2)."""
    sm = make(gate="gaussian", graph=None, lambda_ib=1.0, gate_sigma=0.5, gate_warmup_steps=0).train()
    per_module = torch.cat([torch.sigmoid(g.logits).pow(2).mean(-1) for g in sm.gates.values()]) / (2 * 0.25)
    torch.testing.assert_close(sm.structlora_loss(), per_module.sum())
    held = make(gate="gaussian", graph=None, lambda_ib=1.0, gate_warmup_steps=5).train()
    assert float(held.structlora_loss()) == 0.0       # gates held during the warm-up: no compression term
    assert float(sm.eval().structlora_loss()) == 0.0  # a regulariser of training: 0 in eval mode


@pytest.mark.parametrize("filter_,gate", [("random", None), ("topk_norm", None), ("ib", "concrete"), ("ib", "gaussian")])
def test_filters_keep_exactly_the_same_number_of_directions(filter_, gate):
    sm = make(gate=gate, graph=None, filter=filter_, keep_ratio=0.5, filter_warmup_steps=3, rescore_every=2)
    _train(sm, steps=6)
    eff = sm.effective_factors(drop_zero=True)
    assert {a.shape[0] for _, a in eff.values()} == {2}, {n: a.shape[0] for n, (_, a) in eff.items()}


def test_topk_norm_keeps_the_largest_directions():
    sm = make(gate=None, graph=None, filter="topk_norm", keep_ratio=0.5, filter_warmup_steps=0)
    randomize_lora(sm)
    sm.eval()
    fam = sm.families[0]
    sm.family_state(fam)
    norms = sm._direction_norms(fam)
    expected = norms.topk(2, dim=-1).indices.sort(-1).values
    got = fam.gate.mask.nonzero()[:, 1].reshape(len(fam.names), 2)
    assert torch.equal(got, expected)


def test_similarity_edges_follow_gradient_cosines():
    for threshold, expect_edges in ((-1.0, True), (1.0, False)):
        sm = make(gate=None, graph="similarity", sim_rule="threshold", sim_threshold=threshold, sim_refresh_every=2,
                  sim_batches=1)
        randomize_lora(sm)
        _train(sm, steps=3)
        adj = sm.families[0].coord.adjacency
        off = adj[~torch.eye(adj.shape[0], dtype=torch.bool)]
        assert bool((off > 0).all()) == expect_edges and bool((off == 0).all()) != expect_edges


def test_hybrid_graph_keeps_the_chain():
    sm = make(gate=None, graph="hybrid", sim_rule="threshold", sim_threshold=1.0, sim_refresh_every=1, sim_batches=1)
    _train(sm, steps=3)
    adj = sm.families[0].coord.adjacency
    assert torch.equal(adj, sm.families[0].coord.chain)


def test_structlora_learns_a_toy_task():
    sm = make(gate="concrete", graph="hybrid", sim_refresh_every=5)
    _train(sm, steps=60, lr=2e-2)
    batch = toy_batch(n=256, seed=999)
    with torch.no_grad():
        acc = (sm(input_ids=batch["input_ids"]).logits.argmax(-1) == batch["labels"]).float().mean()
    assert acc > 0.75


@pytest.mark.parametrize("kwargs,match", [
    ({"target_modules": ["nope"]}, "nope"),
    ({"r": 0}, "r must be"),
    ({"keep_ratio": 0.0}, "keep_ratio"),
    ({"keep_ratio": 1.5}, "keep_ratio"),
    ({"gate": "bernoulli"}, "gate must be"),
    ({"filter": "random"}, "needs keep_ratio"),
    ({"graph": "ring"}, "graph must be"),
])
def test_bad_config_fails_with_a_clear_error(kwargs, match):
    base = dict(r=4, lora_alpha=8, target_modules=TARGETS, task_type="SEQ_CLS")
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        get_structlora_model(tiny_bert(), StructLoraConfig(**base))


def test_one_layer_family_trains_without_coordinator():
    sm = make(graph="similarity", base=tiny_bert(layers=1)).train()
    assert all(fam.coord is None and fam.sketch_proj is None for fam in sm.families)
    sm(**toy_batch()).loss.backward()
    assert {row["note"] for row in sm.structlora_report()} == {"one layer: no coordinator"}


def test_layers_of_different_shapes_form_separate_families():
    sm = make(graph="adjacency", rank_pattern={"layer.0.attention.self.query": 2})
    sizes = {fam.key: len(fam.layers) for fam in sm.families}
    assert sorted(sizes.values()) == [1, 3, 4] and any(k.endswith("query[1]") for k in sizes)


def test_non_finite_factor_is_named():
    sm = make(gate="concrete", graph=None)
    with torch.no_grad():
        sm.families[0].layers[2].lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"layer\.2\.attention\.self\.query"):
        sm.train()(**toy_batch())


def test_transformers_trainer_integration(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from structlora.integrations import StructLoraTrainer

    batch = toy_batch(n=32)
    ds = Dataset.from_dict({"input_ids": batch["input_ids"].tolist(), "labels": batch["labels"].tolist()})
    sm = make(gate="concrete", graph="hybrid")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to=[],
                             learning_rate=1e-2, use_cpu=True, save_strategy="no", logging_strategy="no")
    trainer = StructLoraTrainer(model=sm, args=args, train_dataset=ds)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert len(trainer.optimizer.param_groups) == 4  # shared decay (matrices), shared no-decay (biases), gates, gains
    assert int(sm.structlora_step) == 3


@pytest.mark.dist
def test_two_process_ddp_training_ends_with_identical_parameters(tmp_path):
    script = Path(__file__).with_name("dist_core.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert s0.keys() == s1.keys() and len(s0) > 0
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert any(k.endswith("theta") for k in s0)
    assert not torch.equal(s0["start_B"], s0["end_B"]), "training must have changed the factors"


def test_neighbour_cache_follows_the_adjacency():
    """The cached neighbour lists change when similarity edges (or a loaded state) change the graph."""
    from structlora.coordinator import DepthCoordinator

    coord = DepthCoordinator(4, "hybrid", steps=1)
    assert coord.neighbours() == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3]]
    cos = torch.zeros(4, 4)
    cos[0, 3] = cos[3, 0] = 0.9
    coord.set_similarity(cos, threshold=0.3)
    assert coord.neighbours() == [[0, 1, 3], [0, 1, 2], [1, 2, 3], [0, 2, 3]]
    fresh = DepthCoordinator(4, "hybrid", steps=1)
    fresh.neighbours()
    fresh.load_state_dict(coord.state_dict())
    assert fresh.neighbours() == coord.neighbours()
    two_step = DepthCoordinator(4, "adjacency", steps=2)
    assert two_step.neighbours()[0] == [0, 1, 2]


def test_similarity_sketch_estimates_dense_gradient_cosines(monkeypatch):
    """The in-training sketch G_l R (model.py hooks) estimates cos(dL/dW_a, dL/dW_b) of the dense gradients
    (METHOD_NOTES: JL sketch); the edges of the similarity graph are built from it."""
    from structlora import coordinator

    seen = []
    original = coordinator.DepthCoordinator.set_similarity

    def spy(self, cosine, threshold=None):
        seen.append(cosine.clone())
        return original(self, cosine, threshold)

    monkeypatch.setattr(coordinator.DepthCoordinator, "set_similarity", spy)
    sm = make(gate=None, graph="similarity", sim_rule="threshold", sim_threshold=0.3, sim_refresh_every=4,
              sim_batches=1, sim_sketch_dim=4096, base=tiny_bert(layers=4))
    randomize_lora(sm)
    fam = sm.families[0]
    for layer in fam.layers:
        layer.base_layer.weight.requires_grad_(True)
    sm.train()
    sm(**toy_batch(n=16, seed=0)).loss.backward()       # step 0: the sketch captures this batch
    sm(**toy_batch(n=16, seed=1))                       # step 1 (a training forward): cosines, edges rebuilt
    assert len(seen) == 2  # one call per family
    flat = torch.stack([layer.base_layer.weight.grad.flatten() for layer in fam.layers])   # (L, d k)
    dense = torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)     # (L, L)
    assert (dense - torch.eye(len(fam.layers))).abs().max() > 0.2  # the toy gradients are not orthogonal
    assert (seen[0] - dense).abs().max() < 0.15                    # JL error ~ 1/sqrt(p)
    expected = (dense > 0.3).float().fill_diagonal_(0.0)
    agree = (fam.coord.adjacency == expected) | ((dense - 0.3).abs() < 0.15)  # near-threshold pairs may flip
    assert bool(agree.all())

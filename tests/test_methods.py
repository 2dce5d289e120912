"""The methods registry (structlora.repro.methods) and our own baselines, on tiny random toy models.

Everything here runs in a few seconds per test on 2 CPU cores: the toy models have hidden size 32 and
2-3 layers. The registry-wide training sweep trains every method for a few dozen steps on a learnable
synthetic task and checks held-out accuracy beats chance.
"""
from __future__ import annotations

import re
import warnings
from unittest import mock

import pytest
import torch
from torch import nn

from structlora.repro.catalogue import get_method, method_specs
from structlora.repro.methods import (
    BuildContext,
    MethodHandle,
    MethodSkipped,
    build_method,
    check_budget,
    count_trainable,
    describe_methods,
    list_methods,
    lora_param_count,
)
from structlora.repro.assets.models import LoadedModel
from toy import tiny_bert

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

RANK = 8
VOCAB = 100
SEQ = 8
N_FIRST = 8  # the first token is one of ids 10..17; label = its parity

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- toy models
def _toy_bert(num_labels: int = 2) -> nn.Module:
    """Random 3-layer BERT; initializer_range 0.1 (not 0.02) so random token features are distinct."""
    return tiny_bert(3, seed=None, num_labels=num_labels, vocab=VOCAB, initializer_range=0.1)


def _toy_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _toy_vit(num_labels: int = 3) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    from structlora.repro.assets.vit import ImageClassifier

    backbone = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                                 mlp_ratio=2, num_classes=5)
    return ImageClassifier(backbone, num_labels).eval()


@pytest.fixture(scope="module")
def encoder() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("toy-bert", "seq-cls", _toy_bert(), None, ["query", "value"], 3,
                       modules_to_save=["classifier"])


@pytest.fixture(scope="module")
def causal_lm() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("toy-llama", "causal-lm", _toy_llama(), None, ["q_proj", "v_proj"], 2)


@pytest.fixture(scope="module")
def vit() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("toy-vit", "image-cls", _toy_vit(), None, ["qkv"], 2, image_size=8,
                       modules_to_save=["head"])


def _toy_task(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Label = parity of the first token (one of N_FIRST ids); the rest is noise."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, N_FIRST, (n,), generator=g)
    ids = torch.randint(20, VOCAB, (n, SEQ), generator=g)
    ids[:, 0] = 10 + first
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": first % 2}


def _lm_batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _vit_batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 1, 8, 8, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def _kwargs(name: str, batch: dict[str, torch.Tensor]) -> dict:
    """What the method's spec says its build needs beyond the model (calibration batches)."""
    return {"calibration_batches": [batch]} if "calibration_batches" in get_method(name).needs else {}


def _may_skip(name: str, kind: str) -> bool:
    """Whether the catalogue allows ``name`` to be skipped on ``kind`` (never runs there, or needs a
    library that may not load here)."""
    spec = get_method(name)
    return kind in spec.skipped or "bitsandbytes" in spec.needs


def _train(handle: MethodHandle, batches: list[dict], lr: float = 1e-2) -> list[float]:
    opt = handle.build_optimizer(lr, 0.0)
    handle.model.train()
    losses = []
    for step, batch in enumerate(batches, start=1):
        out = handle.model(**batch)
        loss = out.loss + (handle.extra_loss() if handle.extra_loss is not None else 0.0)
        loss.backward()
        opt.step()
        if handle.on_step is not None:
            handle.on_step(step, len(batches))
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


# ---------------------------------------------------------------------------------- registry basics
def test_registry_lists_every_method_of_the_catalogue_once():
    names = list_methods()
    assert names == [s.name for s in method_specs()] and len(set(names)) == len(names)
    table = describe_methods()
    assert list(table["method"]) == names
    assert set(table["source"]) <= {"peft", "own", "structlora", "skipped"}
    for spec in method_specs():   # every builder has the catalogue's one typed signature
        assert spec.builder.__annotations__.get("ctx") in ("BuildContext", BuildContext), spec.name


@pytest.mark.parametrize("fixture,batch_fn", [("encoder", lambda: _toy_task(8, 0)), ("causal_lm", _lm_batch),
                                              ("vit", _vit_batch)])
def test_every_method_builds_and_budgets_match(fixture, batch_fn, request):
    loaded: LoadedModel = request.getfixturevalue(fixture)
    batch = batch_fn()
    handles: dict[str, MethodHandle] = {}
    for name in list_methods():
        spec = get_method(name)
        if loaded.kind not in spec.kinds:   # the catalogue says it cannot adapt this kind: refused up front
            with pytest.raises(ValueError, match=re.escape(spec.unsupported) or "cannot apply"):
                build_method(name, loaded, rank=RANK, seed=0, total_steps=10, **_kwargs(name, batch))
            continue
        try:
            handle = build_method(name, loaded, rank=RANK, seed=0, total_steps=10, **_kwargs(name, batch))
        except MethodSkipped as exc:
            assert exc.reason and _may_skip(name, loaded.kind), (name, exc.reason)
            continue
        assert loaded.kind not in spec.skipped, f"{name} should have been skipped on {loaded.kind}"
        assert handle.name == name
        assert handle.trainable_params == count_trainable(handle.model) > 0
        out = handle.model(**batch)
        assert torch.isfinite(out.loss)
        handles[name] = handle
    table = check_budget(handles, reference="lora", tolerance=0.1)
    print(f"\n{loaded.name}\n{table.to_string()}")
    counts = dict(zip(table["method"], table["trainable_params"]))
    lora_adapter = lora_param_count(loaded.model, loaded.target_modules, RANK)
    if loaded.kind == "causal-lm":    # no new head: a linear probe has nothing to train and is not built
        assert "linear_probe" not in counts or counts["linear_probe"] == 0
    else:                             # LoRA = its adapter + the head that the linear probe trains alone
        assert counts["lora"] - lora_adapter == counts["linear_probe"] > 0
    for name in (n for n in counts if get_method(n).budget == "matched"):   # adapter, prefix (Table 12)
        assert abs(counts[name] / counts["lora"] - 1) <= 0.1
    assert table.set_index("method").loc["full_ft", "status"].startswith("exempt")
    assert loaded.model is not handles["lora"].model  # built on a copy: the fixture stays un-adapted
    assert not any(type(m).__module__.startswith("peft") for m in loaded.model.modules())


# ------------------------------------------------------------------------------------ training sweep
@pytest.mark.parametrize("name", list_methods())
def test_method_beats_chance_on_learnable_toy_task(name, encoder):
    train = [_toy_task(32, seed) for seed in range(1, 41)]
    test = _toy_task(256, 1000)
    try:
        handle = build_method(name, encoder, rank=RANK, seed=0, total_steps=len(train), **_kwargs(name, train[0]))
    except MethodSkipped as exc:
        assert exc.reason.strip(), name
        assert _may_skip(name, encoder.kind), f"{name} unexpectedly skipped: {exc.reason}"
        pytest.skip(exc.reason)
    before = {n: p.detach().clone() for n, p in handle.model.named_parameters()
              if p.requires_grad and "classifier" not in n}
    losses = _train(handle, train)
    handle.model.eval()
    with torch.no_grad():
        logits = handle.model(**{k: v for k, v in test.items() if k != "labels"}).logits
    acc = float((logits.argmax(-1) == test["labels"]).float().mean())
    print(f"{name}: trainable={handle.trainable_params} loss {losses[0]:.3f}->{losses[-1]:.3f} acc={acc:.3f}")
    assert acc > 0.8, f"{name}: held-out accuracy {acc:.3f} not above chance (0.5) + margin"
    if name != "linear_probe":  # the method's own parameters (not only the head) must have moved
        moved = [n for n, p in handle.model.named_parameters() if n in before and not torch.equal(p, before[n])]
        assert moved, f"{name}: no non-head trainable parameter changed"


# ------------------------------------------------------------------------------------ method details
def test_adalora_on_step_calls_update_and_allocate_every_step(encoder):
    steps = 6
    handle = build_method("adalora", encoder, rank=4, total_steps=steps)
    target = handle.model.base_model
    with mock.patch.object(target, "update_and_allocate", wraps=target.update_and_allocate) as spy:
        _train(handle, [_toy_task(8, s) for s in range(steps)])
    assert [c.args[0] for c in spy.call_args_list] == list(range(1, steps + 1))


def test_adalora_on_step_after_zero_grad_is_a_clear_error(encoder):
    handle = build_method("adalora", encoder, rank=4, total_steps=10)
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        handle.on_step(1, 10)


def test_dylora_rank_varies_in_training_and_is_full_in_eval(encoder):
    handle = build_method("dylora", encoder, rank=RANK, seed=0)
    ctl = handle.controller
    layer = ctl.layers[0][1]
    seen: list[int] = []
    layer.lora_A["default"].register_forward_hook(
        lambda m, i, o: seen.append(int((o.abs().sum(dim=tuple(range(o.dim() - 1))) > 0).sum())))
    batch = _toy_task(4, 0)
    handle.model.train()
    for step in range(1, 9):
        handle.model(**batch)
        assert seen[-1] == ctl.current_rank
        handle.on_step(step, 8)
    assert len(set(ctl.history)) > 1 and all(1 <= b <= RANK for b in ctl.history)
    handle.model.eval()
    with torch.no_grad():
        handle.model(**batch)
    assert seen[-1] == RANK


def test_dylora_truncation_matches_a_rank_b_lora(encoder):
    handle = build_method("dylora", encoder, rank=RANK, seed=0)
    ctl = handle.controller
    _, layer = ctl.layers[0]
    nn.init.normal_(layer.lora_B["default"].weight)
    ctl.current_rank = 3
    x = torch.randn(2, 32)
    layer.train()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    alpha = layer.lora_alpha["default"]
    expected = layer.base_layer(x) + (alpha / 3) * x @ a[:3].T @ b[:, :3].T
    torch.testing.assert_close(layer(x), expected)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + (alpha / RANK) * x @ a.T @ b.T)


def test_lora_dropout_masks_resample_and_are_off_in_eval(encoder):
    handle = build_method("lora_dropout", encoder, rank=RANK, seed=0, p=0.5)
    ctl = handle.controller
    name, layer = ctl.layers[0]
    nn.init.normal_(layer.lora_B["default"].weight)
    first_in, first_out = ctl.in_masks[name].clone(), ctl.out_masks[name].clone()
    assert set(first_in.unique().tolist()) <= {0.0, 2.0}  # inverted dropout: kept entries scaled by 1/(1-p)
    handle.on_step(1, 2)
    assert not torch.equal(first_in, ctl.in_masks[name]) or not torch.equal(first_out, ctl.out_masks[name])
    x = torch.randn(3, 32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    layer.train()
    expected = layer.base_layer(x) + s * ((x * ctl.in_masks[name]) @ a.T @ b.T) * ctl.out_masks[name]
    torch.testing.assert_close(layer(x), expected)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + s * x @ a.T @ b.T)


def test_sensitivity_lora_allocates_the_uniform_budget(encoder):
    from structlora.repro.methods.sensitivity_lora import allocate_ranks

    ranks = allocate_ranks({"a": 10.0, "b": 1.0, "c": 0.0}, total_rank=12)
    assert sum(ranks.values()) == 12 and min(ranks.values()) >= 1 and ranks["a"] > ranks["b"] >= ranks["c"]
    assert allocate_ranks({"a": float("nan"), "b": 1.0}, total_rank=8) == {"a": 4, "b": 4}

    handle = build_method("sensitivity_lora", encoder, rank=RANK, calibration_batches=[_toy_task(16, 3)])
    ranks = handle.controller["ranks"]
    assert len(ranks) == 6 and sum(ranks.values()) == RANK * 6
    built = {n.removeprefix("base_model.model."): m.r["default"] for n, m in handle.model.named_modules()
             if hasattr(m, "r") and isinstance(getattr(m, "r"), dict) and "default" in m.r}
    assert built == ranks
    sens = handle.controller["sensitivity"]
    top = max(sens, key=sens.get)
    assert ranks[top] == max(ranks.values())
    for name, module in handle.model.named_modules():  # scale alpha/r kept uniform
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            assert module.scaling["default"] == pytest.approx(2.0)


def test_loraprune_reaches_target_sparsity_and_zeroes_pruned_channels(encoder):
    steps = 10
    handle = build_method("loraprune", encoder, rank=RANK, total_steps=steps, sparsity=0.25)
    _train(handle, [_toy_task(8, s) for s in range(steps)])
    ctl = handle.controller
    assert ctl.current_sparsity() == pytest.approx(0.25)
    assert ctl.importance and all(torch.isfinite(v).all() for v in ctl.importance.values())
    name, layer = ctl.layers[0]
    pruned = (~ctl.masks[name]).nonzero().flatten()
    assert len(pruned) == 8
    assert layer.base_layer.weight[pruned].abs().sum() == 0 and layer.base_layer.bias[pruned].abs().sum() == 0
    assert layer.lora_B["default"].weight[pruned].abs().sum() == 0
    x = torch.randn(2, 32)
    layer.eval()
    assert layer(x)[:, pruned].abs().sum() == 0
    handle.model.eval()
    with torch.no_grad():
        before = handle.model(**_toy_task(4, 0)).logits
    merged = handle.model.merge_and_unload()  # hooks gone, pruning baked into W0
    assert not any(type(m).__module__.startswith("peft") for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**_toy_task(4, 0)).logits, before, atol=1e-5, rtol=1e-5)


def test_loraprune_importance_survives_zero_grad_before_on_step(encoder):
    handle = build_method("loraprune", encoder, rank=RANK, total_steps=4)
    handle.model.train()
    handle.model(**_toy_task(8, 0)).loss.backward()
    handle.model.zero_grad(set_to_none=True)  # a loop that clears grads before on_step
    handle.on_step(2, 4)
    assert len(handle.controller.importance) == 6
    assert handle.controller.current_sparsity() > 0


def test_dylora_and_lora_dropout_keep_peft_merge_exact(encoder):
    batch = _toy_task(8, 5)
    for name in ("dylora", "lora_dropout"):
        handle = build_method(name, encoder, rank=RANK, seed=1)
        _train(handle, [_toy_task(8, s) for s in range(3)])
        handle.model.eval()
        with torch.no_grad():
            logits = handle.model(**batch).logits
            merged = handle.model.merge_and_unload()
            torch.testing.assert_close(merged(**batch).logits, logits, rtol=1e-4, atol=1e-5)


def test_adapter_starts_as_identity_and_finds_sites(encoder, causal_lm, vit):
    from structlora.repro.methods.adapter import find_adapter_sites

    handle = build_method("adapter", encoder, rank=RANK)
    batch = _toy_task(4, 0)
    with torch.no_grad():
        torch.testing.assert_close(handle.model(**batch).logits, encoder.model(**batch).logits)
    assert len(find_adapter_sites(encoder.model)) == 6
    for model, ends in ((causal_lm.model, ("o_proj", "down_proj")), (vit.model, ("attn.proj", "mlp.fc2"))):
        sites = find_adapter_sites(model)
        assert sites and all(s.endswith(ends) for s in sites), sites     # found, and only where they belong
    trainable = {n.split(".")[0] for n, p in handle.model.named_parameters() if p.requires_grad}
    assert trainable == {"bottleneck_adapters", "classifier"}


def test_lora_fa_freezes_a_and_uses_peft_optimizer(encoder):
    from peft.optimizers.lorafa import LoraFAOptimizer

    handle = build_method("lora_fa", encoder, rank=RANK)
    frozen_a = [p.requires_grad for n, p in handle.model.named_parameters() if "lora_A" in n]
    assert frozen_a and not any(frozen_a)                                  # A found, and none of it trains
    assert isinstance(handle.build_optimizer(1e-3, 0.0), LoraFAOptimizer)


def test_structlora_handles_use_the_core_api(encoder):
    handle = build_method("structlora", encoder, rank=RANK, lambda_ib=0.2)
    assert handle.model.structlora_config.lambda_ib == 0.2
    assert handle.extra_loss is not None and torch.isfinite(handle.extra_loss())
    groups = handle.build_optimizer(1e-3, 0.01).param_groups
    assert len(groups) >= 3  # the shared decay / no-decay groups, then the gates' own group
    with pytest.raises(ValueError, match="keep_ratio"):
        build_method("filter_random", encoder, keep_ratio=1.5)


def test_qlora_builds_or_says_why(encoder):
    try:
        handle = build_method("qlora", encoder, rank=RANK)
    except MethodSkipped as exc:
        assert "bitsandbytes" in exc.reason
        return
    assert any(type(m).__name__ == "Linear4bit" for m in handle.model.modules())
    assert torch.isfinite(handle.model(**_toy_task(4, 0)).loss)


# --------------------------------------------------------------------------------- errors up front
def test_errors_before_training(encoder, vit, causal_lm):
    with pytest.raises(ValueError, match="unknown method 'nope'.*lora, "):
        build_method("nope", encoder)
    with pytest.raises(ValueError, match="prefix tuning cannot apply to image-cls models"):
        build_method("prefix", vit)
    with pytest.raises(ValueError, match="adalora needs total_steps"):
        build_method("adalora", encoder)
    with pytest.raises(ValueError, match="loraprune needs total_steps"):
        build_method("loraprune", encoder)
    with pytest.raises(ValueError, match="calibration_batches"):
        build_method("sensitivity_lora", encoder)
    with pytest.raises(ValueError, match="unsupported option"):
        build_method("lora", encoder, not_an_option=1)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        build_method("lora", encoder, rank=0)
    with pytest.raises(MethodSkipped, match="classification head"):
        build_method("linear_probe", causal_lm)
    with pytest.raises(MethodSkipped) as info:
        build_method("adapterfusion", encoder)
    assert "pretrained" in info.value.reason


def test_check_budget_raises_on_mismatch_and_marks_exemptions():
    def h(name: str, n: int) -> MethodHandle:
        return MethodHandle(name, nn.Linear(1, 1), n)

    ok = check_budget({"lora": h("lora", 1000), "adapter": h("adapter", 1050), "vera": h("vera", 10),
                       "dora": h("dora", 1300)})
    status = dict(zip(ok["method"], ok["status"]))
    assert status["adapter"] == "ok" and status["vera"].startswith("exempt")
    assert "not enforced" in status["dora"]
    with pytest.raises(ValueError, match="prefix: 1200 vs 1000"):
        check_budget({"lora": h("lora", 1000), "prefix": h("prefix", 1200)})
    with pytest.raises(ValueError, match="reference"):
        check_budget({"adapter": h("adapter", 1)})

"""StructLoRA as a meta-adapter (paper appendix F, Table 11): on QLoRA (4-bit base), LoRA-FA (frozen A)
and VeRA; unsupported adapters fail at wrap time; one optimizer policy for every method (fair baselines)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from structlora import StructLoraConfig, get_structlora_model
from structlora.model import StructLoraModel
from structlora.repro.assets.models import LoadedModel
from structlora.repro.methods import MethodSkipped, build_method, count_trainable
from test_methods import _toy_bert, _toy_task

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
RANK = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("toy-bert", "seq-cls", _toy_bert(), None, ["query", "value"], 3,
                       modules_to_save=["classifier"])


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _train(handle, steps: int = 8, lr: float = 1e-2):
    opt = handle.build_optimizer(lr, 0.01)
    batch = _toy_task(32, 3)
    handle.model.train()
    losses = []
    for _ in range(steps):
        task = handle.model(**batch).loss
        (task + (handle.extra_loss() if handle.extra_loss else 0)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(task.detach()))   # the task loss: the IB term joins after the gate warm-up
    handle.model.eval()
    return losses


def _eval_logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**_inputs(batch)).logits


def _short_warmup():
    return {"gate_warmup_steps": 2, "lambda_ib": 0.05}


# ------------------------------------------------------------------------------------------- QLoRA
def test_qlora_structlora_trains_merges_and_exports(encoder, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from structlora.repro.methods.registry import _quantize_for_qlora

    try:
        handle = build_method("qlora+structlora", encoder, rank=RANK, seed=0, **_short_warmup())
    except MethodSkipped as exc:
        pytest.skip(exc.reason)
    sm: StructLoraModel = handle.model
    layers = [l for fam in sm.families for l in fam.layers]
    assert layers and all(isinstance(l, LoraLinear4bit) for l in layers)   # the 4-bit LoRA layers are adapted
    assert len(layers) == 6   # q and v of 3 layers: nothing silently left out
    losses = _train(handle)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(float(fam.B(l).abs().max()) > 0 for fam in sm.families for l in range(len(fam.layers)))
    batch = _toy_task(16, 7)
    ref = _eval_logits(sm, batch)

    # folded export: vanilla peft on a fresh, identically quantized 4-bit base
    sm.save_pretrained(tmp_path / "folded")
    fresh = copy.deepcopy(encoder.model)
    _quantize_for_qlora(fresh, ["classifier"])
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "folded"))
    assert any(isinstance(m, LoraLinear4bit) for m in reloaded.modules())
    torch.testing.assert_close(_eval_logits(reloaded, batch), ref, atol=1e-4, rtol=0)

    # merge: dequantize the adapted layers into nn.Linear (exact), not re-quantize (lossy)
    merged = sm.merge_and_unload()
    q = merged.bert.encoder.layer[0].attention.self.query
    assert type(q) is nn.Linear
    assert type(merged.bert.encoder.layer[0].attention.self.key).__name__ == "Linear4bit"  # unadapted: stays 4-bit
    torch.testing.assert_close(_eval_logits(merged, batch), ref, atol=1e-4, rtol=0)


def test_qlora_structlora_forward_matches_peft_qlora_when_stages_are_off(encoder):
    try:
        a = build_method("qlora", encoder, rank=RANK, seed=0)
        b = build_method("qlora+structlora", encoder, rank=RANK, seed=0, gate=None, graph=None)
    except MethodSkipped as exc:
        pytest.skip(exc.reason)
    g = torch.Generator().manual_seed(3)
    for pa, pb in zip([p for n, p in a.model.named_parameters() if "lora_B" in n],
                      [p for n, p in b.model.named_parameters() if "lora_B" in n]):
        with torch.no_grad():
            v = torch.randn(pa.shape, generator=g) * 0.3
            pa.copy_(v)
            pb.copy_(v)
    batch = _toy_task(8, 2)
    torch.testing.assert_close(_eval_logits(b.model, batch), _eval_logits(a.model, batch), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ LoRA-FA
def test_lorafa_structlora_keeps_a_frozen(encoder):
    handle = build_method("lorafa+structlora", encoder, rank=RANK, seed=0, **_short_warmup())
    sm = handle.model
    a_params = {n: p for n, p in sm.named_parameters() if "lora_A" in n}
    assert a_params and not any(p.requires_grad for p in a_params.values())
    before = {n: p.detach().clone() for n, p in a_params.items()}
    opt_groups = handle.param_groups(1e-3, 0.01)
    grouped = {id(p) for g in opt_groups for p in g["params"]}
    assert not any(id(p) in grouped for p in a_params.values())
    # budget: LoRA-FA's trainables (B + head) plus the gates and coordinator
    fa = build_method("lora_fa", encoder, rank=RANK, seed=0)
    extra = sum(p.numel() for p in list(sm.gates.parameters()) + list(sm.coordinators.parameters()) if p.requires_grad)
    assert handle.trainable_params == count_trainable(sm) == fa.trainable_params + extra
    assert sm.get_nb_trainable_parameters()[0] == handle.trainable_params
    losses = _train(handle)
    assert losses[-1] < losses[0], losses
    for n, p in sm.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    assert any(float(p.abs().max()) > 0 for n, p in sm.named_parameters() if "lora_B" in n)


# --------------------------------------------------------------------------------------------- VeRA
def _randomize_vera(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "vera_lambda" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_vera_structlora_without_stages_is_vera(encoder):
    vera = build_method("vera", encoder, rank=RANK, seed=0)
    sv = build_method("vera+structlora", encoder, rank=RANK, seed=0, gate=None, graph=None)
    assert vera.model.peft_config["default"].r == 256   # the VeRA paper's rank
    assert "r=256" in vera.notes and "adapter params" in vera.notes
    _randomize_vera(vera.model)
    _randomize_vera(sv.model)
    batch = _toy_task(8, 2)
    torch.testing.assert_close(_eval_logits(sv.model, batch), _eval_logits(vera.model, batch), atol=1e-5, rtol=0)


def test_vera_structlora_trains_merges_and_exports_as_lora(encoder, tmp_path):
    from peft import PeftModel

    handle = build_method("vera+structlora", encoder, rank=RANK, seed=0, **_short_warmup())
    sm = handle.model
    assert len([l for fam in sm.families for l in fam.layers]) == 6
    assert all(fam.gate.logits.shape[-1] == 256 for fam in sm.families)   # gates over VeRA's r directions
    frozen = {n: p.detach().clone() for n, p in sm.named_parameters() if "vera_A" in n or "vera_B" in n}
    frozen.update({n: b.detach().clone() for n, b in sm.named_buffers() if "vera_A" in n or "vera_B" in n})
    assert frozen
    losses = _train(handle, steps=10, lr=3e-2)
    assert losses[-1] < losses[0], losses
    state = dict(sm.named_parameters()) | dict(sm.named_buffers())
    assert all(torch.equal(state[n], v) for n, v in frozen.items())   # projections stay frozen
    batch = _toy_task(16, 7)
    ref = _eval_logits(sm, batch)
    summary = sm.save_pretrained(tmp_path / "folded")
    assert summary["ranks"]
    fresh = copy.deepcopy(encoder.model)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "folded"))   # a plain LoRA adapter
    assert reloaded.peft_config["default"].peft_type == "LORA"
    torch.testing.assert_close(_eval_logits(reloaded, batch), ref, atol=1e-4, rtol=0)
    merged = sm.merge_and_unload()
    assert not any(type(m).__module__.startswith("peft.tuners") for m in merged.modules())
    torch.testing.assert_close(_eval_logits(merged, batch), ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------- unsupported: wrap time
def _cfg(**kw):
    return StructLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", **kw)


def test_dora_fails_at_wrap_time():
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_toy_bert(), LoraConfig(r=4, target_modules=["query", "value"], use_dora=True,
                                                task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="DoRA"):
        StructLoraModel(pm, _cfg())


def test_prefix_tuning_fails_at_wrap_time():
    from peft import PrefixTuningConfig, get_peft_model

    pm = get_peft_model(_toy_bert(), PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="PREFIX_TUNING"):
        StructLoraModel(pm, _cfg())
    with pytest.raises(ValueError, match="PREFIX_TUNING|already carries"):
        get_structlora_model(pm, _cfg())


def test_bottleneck_adapter_fails_at_wrap_time(encoder):
    handle = build_method("adapter", encoder, rank=RANK)
    with pytest.raises(ValueError, match="BottleneckAdapter|bottleneck"):
        get_structlora_model(handle.model, _cfg())
    with pytest.raises(MethodSkipped, match="AdapterFusion"):
        build_method("adapterfusion", encoder, rank=RANK)


def test_unsupported_lora_layer_and_no_supported_layer_fail_at_wrap_time():
    # LoRA on the embedding: peft's lora.Embedding is not a linear layer StructLoRA can gate
    with pytest.raises(ValueError, match="Embedding"):
        get_structlora_model(_toy_bert(), StructLoraConfig(r=4, target_modules=["query", "word_embeddings"],
                                                           task_type="SEQ_CLS"))
    # a model with no supported layer at all (only a LayerNorm-free conv net)
    net = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError):
        get_structlora_model(net, StructLoraConfig(r=2, target_modules=["0"], gate=None, graph=None))


def test_already_adapted_lora_model_points_to_the_wrapper():
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_toy_bert(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="StructLoraModel\\(peft_model, config\\)"):
        get_structlora_model(pm, _cfg())


# -------------------------------------------------------------------------------- one optimizer policy
def _named_groups(handle):
    names = {id(p): n.removeprefix("peft_model.") for n, p in handle.model.named_parameters()}
    return [([names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"]) for g in handle.param_groups(1e-3, 0.1)]


def test_lora_and_structlora_without_stages_get_identical_groups_and_steps(encoder):
    from structlora.repro.engine import TrainConfig

    lora = build_method("lora", encoder, rank=RANK, seed=0)
    sl = build_method("structlora", encoder, rank=RANK, seed=0, gate=None, graph=None)
    ga, gb = _named_groups(lora), _named_groups(sl)
    assert ga == gb
    decay = dict((n, wd) for names, _, wd in ga for n in names)
    assert decay["base_model.model.classifier.modules_to_save.default.weight"] == 0.1
    assert decay["base_model.model.classifier.modules_to_save.default.bias"] == 0.0
    assert all(wd == 0.1 for n, wd in decay.items() if "lora_" in n)
    # same starting values, then one identical optimizer step through the one optimizer builder
    pa = dict(lora.model.named_parameters())
    pb = {n.removeprefix("peft_model."): p for n, p in sl.model.named_parameters()}
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    batch = _toy_task(16, 4)
    for handle in (lora, sl):
        opt = handle.build_optimizer(cfg.lr, cfg.weight_decay, betas=cfg.betas)
        handle.model.train()
        for _ in range(2):
            handle.model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], atol=1e-6, rtol=0)


def test_structlora_extra_groups_keep_their_multipliers(encoder):
    sl = build_method("structlora", encoder, rank=RANK, seed=0)
    lora = build_method("lora", encoder, rank=RANK, seed=0)
    groups = _named_groups(sl)
    cfg = sl.model.structlora_config
    assert groups[:2] == _named_groups(lora)   # the shared params grouped exactly as for LoRA
    lrs = sorted(lr for _, lr, _ in groups[2:])
    assert lrs == sorted([1e-3 * cfg.gate_lr_multiplier, 1e-3 * cfg.coordinator_lr_multiplier])
    assert all(wd == 0.0 for _, _, wd in groups[2:])
    assert [g["lr"] for g in sl.model.structlora_param_groups(1e-3, 0.1)] == [lr for _, lr, _ in groups]

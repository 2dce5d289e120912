"""StructLoRA trains the way LLMs are trained (issue 21), on tiny random Llama, Qwen2, T5 and ViT models:

1. gradient checkpointing (both ``use_reentrant`` modes, and the Trainer's flag) gives the gradients of
   the run without it, for every gate and graph;
2. bf16 / fp16 bases, with and without autocast, train with every graph; merges stay within peft's own
   half-precision merge error;
3. every public method of peft's PeftModel / LoraModel is exact for StructLoRA or refused by name;
4. gradient accumulation (plain loop with `attach_optimizer`, and the Trainer) gives the gradients and
   schedules of one large batch;
5. the gate defaults and the polarization column of the report;
6. one-layer families, the model's layer order, and the config checks of the issue's point 8.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraConfig, LoraModel

from structlora import StructLoraConfig, StructLoraModel, get_structlora_model
from structlora.model import REFUSED_PEFT_APIS
from toy import FAMILY_TARGETS, FAMILY_TASKS, family_batch, randomize_lora, tiny_family

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["llama", "qwen2", "t5", "vit"]
# (gate, graph): every gate and every graph at least once
SETTINGS = [("concrete", "hybrid"), ("gaussian", "similarity"), (None, "adjacency"), ("concrete", None)]
FAST = dict(gate_warmup_steps=0, sim_refresh_every=1, sim_batches=1, target_ramp_steps=2)


def build(family: str, gate="concrete", graph="hybrid", dtype=torch.float32, **kw) -> StructLoraModel:
    """A tiny ``family`` model with StructLoRA on its q/v projections, B and gates randomised (trained-ish)."""
    base = tiny_family(family).to(dtype)
    # the ViT's head trains in fp32 only: a pure fp16 head under AdamW (eps 1e-8 underflows to 0) diverges
    # with plain peft LoRA too
    extra = {"modules_to_save": ["classifier"]} if family == "vit" and dtype == torch.float32 else {}
    cfg = StructLoraConfig(r=4, lora_alpha=8, target_modules=FAMILY_TARGETS[family], task_type=FAMILY_TASKS[family],
                           gate=gate, graph=graph, **{**FAST, **extra, **kw})
    sm = get_structlora_model(base, cfg)
    randomize_lora(sm)
    with torch.no_grad():
        for g in sm.gates.values():
            if g.logits is not None:
                g.logits.copy_(torch.linspace(-2, 3, g.logits.numel()).reshape(g.logits.shape))
    return sm


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------------- 1. gradient checkpointing
def _train_grads(sm: StructLoraModel, family: str, steps: int = 2) -> tuple[dict, list]:
    """Gradients of the last of ``steps`` training forwards (no optimizer: the parameters stay put, the
    schedules and the similarity refresh run), and every family's similarity sketch / adjacency."""
    torch.manual_seed(0)
    sm.train()
    for step in range(steps):
        sm.zero_grad(set_to_none=True)
        sm(**family_batch(family, seed=step)).loss.backward()
    state = [(f.sketches.clone() if f.sketches is not None else None,
              f.coord.adjacency.clone() if f.coord is not None else None) for f in sm.families]
    return grads(sm), state


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("gate,graph", SETTINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_gradients_without_it(family, gate, graph, reentrant):
    plain = build(family, gate, graph)
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpt.enable_input_require_grads()   # reentrant checkpoints need an input that requires grad (ViT's pixels)
    g0, s0 = _train_grads(plain, family)
    g1, s1 = _train_grads(ckpt, family)
    assert max_diff(g0, g1) < 1e-5
    for (sk0, adj0), (sk1, adj1) in zip(s0, s1):
        assert (sk0 is None) == (sk1 is None) and (sk0 is None or torch.allclose(sk0, sk1, atol=1e-5))
        assert adj0 is None or torch.equal(adj0, adj1)
    if gate is not None:
        assert any("logits" in n for n in g1)


def _trainer_params(tmp_path, sm: StructLoraModel, family: str, **kw) -> dict[str, torch.Tensor]:
    from datasets import Dataset
    from transformers import TrainingArguments

    from structlora.integrations import StructLoraTrainer

    batch = family_batch(family, n=24)
    ds = Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    args = TrainingArguments(str(tmp_path), max_steps=3, learning_rate=1e-2, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", seed=0, dataloader_num_workers=0,
                             disable_tqdm=True, **{"per_device_train_batch_size": 8, **kw})
    StructLoraTrainer(model=sm, args=args, train_dataset=ds).train()
    return {n: p.detach().clone() for n, p in sm.named_parameters() if p.requires_grad}


def test_trainer_gradient_checkpointing_trains_as_without_it(tmp_path):
    plain = build("llama")
    ckpt = copy.deepcopy(plain)
    p0 = _trainer_params(tmp_path / "a", plain, "llama")
    p1 = _trainer_params(tmp_path / "b", ckpt, "llama", activation_checkpointing=True)
    assert _checkpointing_on(ckpt) and max_diff(p0, p1) < 1e-5


def _checkpointing_on(sm: StructLoraModel) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in sm.modules())


# ---------------------------------------------------------------------- 2. half-precision bases
@pytest.mark.parametrize("autocast", [False, True], ids=["weights", "autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("graph", ["hybrid", "similarity", "adjacency", None])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_bases_train_with_every_graph(family, graph, dtype, autocast):
    sm = build(family, "concrete", graph, dtype=dtype)
    opt = torch.optim.AdamW(sm.structlora_param_groups(1e-3))
    sm.attach_optimizer(opt)
    sm.train()
    for step in range(3):   # step 0 captures the sketch, step 1 refreshes the edges from it
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            loss = sm(**family_batch(family, seed=step)).loss + sm.structlora_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    # state that needs precision stays fp32: LoRA factors (peft), gates, coordinator, sketch
    assert all(p.dtype == torch.float32 for p in sm.parameters() if p.requires_grad)
    assert all(f.sketches is None or f.sketches.dtype == torch.float32 for f in sm.families)


def _merge_error(model: torch.nn.Module, family: str) -> float:
    """max |logits after peft's merge_adapter - logits before| at eval."""
    model.eval()
    batch = family_batch(family)
    with torch.no_grad():
        before = model(**batch).logits.float()
        model.merge_adapter()
        after = model(**batch).logits.float()
        model.unmerge_adapter()
    return float((after - before).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_merge_is_within_peft_merge_error(family, dtype):
    sm = build(family, "concrete", "hybrid", dtype=dtype)
    lora = get_peft_model(tiny_family(family).to(dtype), sm.peft_model.peft_config["default"].__class__(
        r=4, lora_alpha=8, target_modules=FAMILY_TARGETS[family]))
    lora.load_state_dict(sm.peft_model.state_dict(), strict=False)
    ours, peft_own = _merge_error(sm, family), _merge_error(lora, family)
    assert ours <= 2 * peft_own + 1e-3, (ours, peft_own)
    with torch.no_grad():   # merge_and_unload too
        expected = sm.eval()(**family_batch(family)).logits.float()
        merged = sm.merge_and_unload()(**family_batch(family)).logits.float()
    assert float((merged - expected).abs().max()) <= 2 * peft_own + 1e-3


# ---------------------------------------------------------------------- 3. peft APIs
EXACT = {  # public methods of PeftModel / LoraModel that are exact for StructLoRA (numerics checked below)
    "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload", "disable_adapter", "disable_adapter_layers",
    "enable_adapter_layers", "generate", "set_adapter", "get_base_model", "save_pretrained", "from_pretrained",
    "get_nb_trainable_parameters", "print_trainable_parameters",
    # no numerics: status, bookkeeping and setup helpers act on the peft model as they document
    "get_layer_status", "get_model_status", "get_model_config", "create_or_update_model_card", "set_requires_grad",
    "prepare_model_for_gradient_checkpointing", "supports_lora_conversion", "tuner_layer_cls",
    # prompt learning only: peft itself raises on a LoRA model
    "get_prompt", "get_prompt_embedding_to_save",
}


def _public_methods() -> set[str]:
    names = set()
    for cls in (PeftModel, LoraModel):
        names |= {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n, None))
                  and not hasattr(torch.nn.Module, n) and not inspect.isclass(getattr(cls, n))}
    return names


def test_every_public_peft_method_is_classified():
    unknown = _public_methods() - EXACT - set(REFUSED_PEFT_APIS)
    assert not unknown, f"classify these peft methods as exact or refused: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(REFUSED_PEFT_APIS))
def test_refused_peft_methods_name_the_alternative(name):
    sm = build("llama")
    with pytest.raises(NotImplementedError, match=name):
        getattr(sm, name)("x")


def _logits(model, batch, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, **kw).logits


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_peft_methods_are_exact_for_structlora(family):
    sm = build(family).eval()
    batch = family_batch(family)
    expected = _logits(sm, batch)
    base = _logits(tiny_family(family), batch)
    weights = {n: p.detach().clone() for n, p in sm.named_parameters() if "base_layer" in n}
    # merge_adapter / unmerge_adapter: the gated, coordinated update, then the base weights back
    sm.merge_adapter()
    torch.testing.assert_close(_logits(sm, batch), expected, rtol=0, atol=1e-5)
    sm.unmerge_adapter()
    after = {n: p.detach() for n, p in sm.named_parameters() if "base_layer" in n}
    assert max_diff(weights, after) < 1e-6
    torch.testing.assert_close(_logits(sm, batch), expected, rtol=0, atol=1e-5)
    # adapter_names: "default" rows are StructLoRA, "__base__" rows the base model; other names refused
    mixed = _logits(sm, batch, adapter_names=["default", "__base__"] * 4)
    torch.testing.assert_close(mixed[0::2], expected[0::2], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1::2], base[1::2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="other"):   # peft refuses an unknown name before StructLoRA does
        _logits(sm, batch, adapter_names=["other"] * 8)
    # disabling gives the base model, enabling gives StructLoRA back
    with sm.disable_adapter():
        torch.testing.assert_close(_logits(sm, batch), base, rtol=0, atol=1e-5)
    sm.disable_adapter_layers()
    torch.testing.assert_close(_logits(sm, batch), base, rtol=0, atol=1e-5)
    sm.enable_adapter_layers()
    torch.testing.assert_close(_logits(sm, batch), expected, rtol=0, atol=1e-5)
    # set_adapter: only the one adapter
    sm.set_adapter("default")
    with pytest.raises(ValueError, match="one adapter"):
        sm.set_adapter(["default", "other"])
    # generate: greedy decoding with the StructLoRA forward
    if family == "llama":
        ids = batch["input_ids"][:2]
        out = sm.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        step = ids
        for _ in range(3):
            step = torch.cat([step, _logits(sm, {"input_ids": step})[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(out, step)
    # peft's own merge_and_unload, reached through the peft model, merges StructLoRA's update too
    merged = copy.deepcopy(sm).peft_model.merge_and_unload()
    torch.testing.assert_close(_logits(merged, batch), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(copy.deepcopy(sm).merge_and_unload(), batch), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(copy.deepcopy(sm).unload(), batch), base, rtol=0, atol=1e-5)


def test_a_second_active_adapter_added_behind_the_wrapper_is_refused():
    sm = build("llama").eval()
    sm.peft_model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    sm.peft_model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="active"):
        sm(**family_batch("llama"))
    with pytest.raises(ValueError, match="exactly one"):
        StructLoraModel(sm.peft_model, sm.structlora_config)


# ---------------------------------------------------------------------- 4. gradient accumulation
def _accumulate(sm: StructLoraModel, family: str, micro: int, steps: int = 3) -> list[dict]:
    """``steps`` optimizer steps over the same 8 rows per step, as ``micro`` micro-batches; per step the
    gradients and the schedules' state."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(sm.structlora_param_groups(1e-2))
    sm.attach_optimizer(opt)
    sm.train()
    out = []
    for step in range(steps):
        batch = family_batch(family, n=8, seed=step)
        for i in range(micro):
            part = {k: v[i * 8 // micro:(i + 1) * 8 // micro] for k, v in batch.items()}
            ((sm(**part).loss + sm.structlora_loss()) / micro).backward()
        g = grads(sm)
        opt.step()
        opt.zero_grad()
        out.append({"grads": g, "step": int(sm.structlora_step), "target": sm.target_now(),
                    "lagrange": torch.cat([f.gate.lagrange for f in sm.families if f.gate.lagrange is not None] or
                                          [torch.zeros(0)]),
                    "adjacency": [f.coord.adjacency.clone() for f in sm.families if f.coord is not None]})
    return out


@pytest.mark.parametrize("gate,graph", SETTINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_accumulating_four_micro_batches_equals_one_batch(family, gate, graph):
    kw = dict(gate_warmup_steps=1, target_ramp_steps=2, sim_refresh_every=2)
    one = build(family, gate, graph, **kw)
    four = copy.deepcopy(one)
    a, b = _accumulate(one, family, 1), _accumulate(four, family, 4)
    for x, y in zip(a, b):
        assert max_diff(x["grads"], y["grads"]) < 1e-5
        assert x["step"] == y["step"] and x["target"] == y["target"]
        torch.testing.assert_close(x["lagrange"], y["lagrange"])
        assert all(torch.equal(p, q) for p, q in zip(x["adjacency"], y["adjacency"]))
    assert a[-1]["step"] == 3


def test_trainer_accumulation_equals_one_batch(tmp_path):
    one = build("llama", gate_warmup_steps=1, target_ramp_steps=2, sim_refresh_every=2)
    four = copy.deepcopy(one)
    p1 = _trainer_params(tmp_path / "a", one, "llama")
    p4 = _trainer_params(tmp_path / "b", four, "llama", per_device_train_batch_size=2, gradient_accumulation_steps=4)
    assert int(one.structlora_step) == int(four.structlora_step) == 3
    assert max_diff(p1, p4) < 1e-5


# ---------------------------------------------------------------------- 5. defaults and polarization
def test_default_gates_have_a_keep_target_and_the_reproduction_rate():
    cfg = StructLoraConfig(target_modules=["q_proj"])
    assert (cfg.gate, cfg.target_keep_ratio, cfg.gate_lr_multiplier) == ("concrete", 0.5, 50.0)
    assert StructLoraConfig(target_modules=["q_proj"], gate="gaussian").target_keep_ratio is None
    assert StructLoraConfig(target_modules=["q_proj"], gate=None).target_keep_ratio is None


def test_report_gives_the_gate_polarization():
    sm = build("llama").eval()
    rows = sm.structlora_report()
    for row, fam_l in zip(rows, [(f, l) for f in sm.families for l in range(len(f.layers))]):
        m = sm.family_state(fam_l[0], training=False)["m"][fam_l[1]]
        assert row["polarization"] == pytest.approx(float(((m <= 0.1) | (m >= 0.9)).float().mean()))


# ---------------------------------------------------------------------- 6. families and config checks
def test_one_layer_family_trains_and_families_follow_the_model_layers():
    base = tiny_family("llama")
    cfg = StructLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], layers_to_transform=[0, 2],
                           layers_pattern="layers", task_type="CAUSAL_LM", **FAST)
    sm = get_structlora_model(base, cfg).train()
    fams = {f.key: f for f in sm.families}
    q = next(f for k, f in fams.items() if k.endswith("q_proj"))
    assert [n.split(".layers.")[1][0] for n in q.names] == ["0", "2"]
    assert q.coord.chain.sum() == 0          # layers 0 and 2 are not neighbours (layer 1 is not adapted)
    sm(**family_batch("llama")).loss.backward()
    notes = {r["family"]: r["note"] for r in sm.structlora_report()}
    assert "one layer: no coordinator" in notes.values()


@pytest.mark.parametrize("kwargs,match", [
    ({"lora_alpha": -8}, "lora_alpha"),
    ({"gate_warmup_steps": 2.5}, "gate_warmup_steps"),
    ({"sim_refresh_every": True}, "sim_refresh_every"),
    ({"lora_bias": True}, "lora_bias"),
])
def test_config_refuses_what_it_would_silently_misuse(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructLoraConfig(target_modules=["q_proj"], **kwargs)


def test_config_disagreeing_with_the_peft_model_is_refused():
    peft_model = get_peft_model(tiny_family("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="r=8"):
        StructLoraModel(peft_model, StructLoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"]))


def test_non_finite_values_are_caught_at_the_next_step_and_all_named():
    sm = build("llama", graph="adjacency")
    opt = torch.optim.SGD(sm.parameters(), lr=1.0)
    sm.train()
    sm(**family_batch("llama")).loss.backward()
    for p in sm.parameters():
        if p.grad is not None:
            p.grad.fill_(float("nan"))   # a diverged step
    opt.step()
    with pytest.raises(FloatingPointError, match=r"step 1: LoRA factors.*q_proj.*gate logits.*coordinator"):
        sm(**family_batch("llama"))

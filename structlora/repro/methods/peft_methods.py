"""The builders of the methods peft provides (Tables 1, 2 and 11: LoRA, DoRA, VeRA, AdaLoRA, LoRA-FA,
prefix tuning, QLoRA) and the peft helpers the other builders share.

Each builder has the catalogue's one signature ``build_x(ctx: BuildContext) -> MethodHandle``. LoRA-family
defaults follow appendix A: target modules from ``loaded.target_modules`` (q/v), ``lora_alpha = 2 *
rank``, ``lora_dropout = 0``; the peft ``task_type`` follows the model kind (``SEQ_CLS`` / ``CAUSAL_LM`` /
none for image-cls) and the classification head stays trainable (peft ``modules_to_save``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import BuildContext, MethodHandle, MethodSkipped, lora_param_count

__all__ = [
    "VERA_RANK",
    "AdaLoraState",
    "build_adalora",
    "build_dora",
    "build_lora",
    "build_lora_fa",
    "build_prefix",
    "build_qlora",
    "build_vera",
    "lora_defaults",
    "make_config",
    "peft_lora",
    "peft_vera",
    "quantize_for_qlora",
    "require_bitsandbytes",
    "task_fields",
    "vera_budget",
]

VERA_RANK = 256  # Kopiczko et al. 2024 use r = 256 (RoBERTa GLUE) and up to 1024 (LLaMA instruction tuning)


def task_fields(ctx: BuildContext) -> dict[str, Any]:
    """peft ``task_type`` / ``modules_to_save`` for the model kind (heads stay trainable)."""
    kind = ctx.loaded.kind
    if kind == "seq-cls":
        extra = [h for h in ctx.heads if h.split(".")[-1] not in ("classifier", "score")]
        return {"task_type": "SEQ_CLS", "modules_to_save": extra or None}  # peft adds classifier/score
    if kind == "causal-lm":
        return {"task_type": "CAUSAL_LM"}
    return {"modules_to_save": ctx.heads}


def make_config(cls: type, method: str, defaults: dict[str, Any], options: dict[str, Any]) -> Any:
    """``cls(**defaults | options)``; an unknown option becomes a ValueError naming the method."""
    try:
        return cls(**{**defaults, **options})
    except TypeError as exc:
        raise ValueError(f"{method}: unsupported option(s) {sorted(options)} for {cls.__name__}: {exc}") from exc


def lora_defaults(ctx: BuildContext, rank: int | None = None) -> dict[str, Any]:
    """Appendix A's LoRA configuration at ``rank`` (default the context's): q/v, alpha = 2r, no dropout."""
    rank = ctx.rank if rank is None else rank
    return {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(ctx.loaded.target_modules),
            "lora_dropout": 0.0, **task_fields(ctx)}


def peft_lora(ctx: BuildContext, **overrides: Any) -> nn.Module:
    """peft LoRA on ``ctx.model`` (appendix A's defaults, then ``overrides``, then the options)."""
    from peft import LoraConfig, get_peft_model

    cfg = make_config(LoraConfig, ctx.name, {**lora_defaults(ctx), **overrides}, ctx.options)
    return get_peft_model(ctx.model, cfg)


def build_lora(ctx: BuildContext) -> MethodHandle:
    """peft LoRA (Hu et al. 2022)."""
    return MethodHandle(ctx.name, peft_lora(ctx), 0, notes="peft LoRA (Hu et al. 2022)")


def build_dora(ctx: BuildContext) -> MethodHandle:
    """peft LoRA with ``use_dora=True`` (DoRA, Liu et al. 2024)."""
    return MethodHandle(ctx.name, peft_lora(ctx, use_dora=True), 0,
                        notes="peft LoRA with use_dora=True (DoRA, Liu et al. 2024)")


def peft_vera(ctx: BuildContext, options: dict[str, Any]) -> nn.Module:
    """peft VeRA at the VeRA paper's rank (`VERA_RANK`), projections seeded with ``ctx.seed``."""
    from peft import VeraConfig, get_peft_model

    defaults = {"r": VERA_RANK, "target_modules": list(ctx.loaded.target_modules), "projection_prng_key": ctx.seed,
                "vera_dropout": 0.0, **task_fields(ctx)}
    return get_peft_model(ctx.model, make_config(VeraConfig, ctx.name, defaults, options))


def vera_budget(pm: nn.Module) -> int:
    """VeRA's trainable adapter parameters (the scaling vectors lambda_b, lambda_d)."""
    return sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and "vera_lambda" in n)


def build_vera(ctx: BuildContext) -> MethodHandle:
    """peft VeRA (Kopiczko et al. 2024) at r = `VERA_RANK`, independent of the LoRA rank."""
    pm = peft_vera(ctx, ctx.options)
    r = pm.peft_config["default"].r
    return MethodHandle(ctx.name, pm, 0, notes=f"peft VeRA (Kopiczko et al. 2024), r={r} (the VeRA paper's rank, "
                        f"independent of the LoRA rank): frozen shared random A/B, trainable lambda_b (d) and "
                        f"lambda_d (r) per layer = {vera_budget(pm)} adapter params (budget-exempt)")


class AdaLoraState:
    """Checkpointable state of peft's AdaLoRA ``RankAllocator`` (importance moving averages); the budget
    masks live in ``lora_E`` (a trainable parameter) and the schedule is a function of the step."""

    _FIELDS = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __init__(self, pm: nn.Module) -> None:
        self.allocator = pm.base_model.rankallocator

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {f: {k: v.detach().clone() for k, v in getattr(self.allocator, f).items()} for f in self._FIELDS}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for f in self._FIELDS:
            setattr(self.allocator, f, {k: v.clone() for k, v in state[f].items()})


def build_adalora(ctx: BuildContext) -> MethodHandle:
    """peft AdaLoRA (Zhang et al. 2023b): init_r = 1.5 r pruned to target_r = r over the run (Table 2)."""
    from peft import AdaLoraConfig, get_peft_model

    rank, total_steps = ctx.rank, ctx.total_steps
    if total_steps is None or total_steps <= 0:  # build_method checks the spec's needs first
        raise ValueError("adalora needs total_steps (AdaLoRA's budget schedule is defined over the run)")
    defaults = {"init_r": max(rank, math.ceil(1.5 * rank)), "target_r": rank, "total_step": total_steps,
                "tinit": int(0.1 * total_steps), "tfinal": int(0.2 * total_steps),
                "deltaT": max(1, total_steps // 100), "lora_alpha": 2 * rank,
                "target_modules": list(ctx.loaded.target_modules), "lora_dropout": 0.0, **task_fields(ctx)}
    pm = get_peft_model(ctx.model, make_config(AdaLoraConfig, ctx.name, defaults, ctx.options))
    cfg = pm.peft_config["default"]

    def on_step(global_step: int, total: int) -> None:
        if global_step <= cfg.total_step - cfg.tfinal:
            missing = [n for n, p in pm.named_parameters() if "lora_" in n and p.requires_grad and p.grad is None]
            if missing:
                raise RuntimeError("adalora: update_and_allocate needs the gradients; call on_step after "
                                   f"optimizer.step() and before optimizer.zero_grad() (no grad on {missing[0]})")
        pm.base_model.update_and_allocate(global_step)

    return MethodHandle(ctx.name, pm, 0, on_step=on_step, controller=AdaLoraState(pm),
                        notes=f"peft AdaLoRA (Zhang et al. 2023b): init_r={cfg.init_r} -> target_r={cfg.target_r}, "
                        f"tinit={cfg.tinit}, tfinal={cfg.tfinal}, deltaT={cfg.deltaT}; update_and_allocate every "
                        "step via on_step; peft adds the orthogonality loss to out.loss when labels are passed")


def build_lora_fa(ctx: BuildContext) -> MethodHandle:
    """peft LoRA with A frozen and peft's projected LoRA-FA optimizer for B (Table 11)."""
    from peft.optimizers import create_lorafa_optimizer

    pm = peft_lora(ctx)
    for n, p in pm.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)  # LoRA-FA: A stays at its random init (create_lorafa_optimizer does it too)
    cfg = pm.peft_config["default"]

    def make_optimizer(lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return create_lorafa_optimizer(pm, r=cfg.r, lora_alpha=cfg.lora_alpha, lr=lr, weight_decay=weight_decay)

    return MethodHandle(ctx.name, pm, 0, make_optimizer=make_optimizer,
                        notes="peft LoRA + peft.optimizers.create_lorafa_optimizer (LoRA-FA: A frozen, "
                        "projected B update)")


def build_prefix(ctx: BuildContext) -> MethodHandle:
    """peft prefix tuning (Li & Liang 2021) with its virtual tokens matched to LoRA's budget (Table 12)."""
    from peft import PrefixTuningConfig, get_peft_model
    from peft.utils.other import _prepare_prompt_learning_config

    task = task_fields(ctx)
    probe = _prepare_prompt_learning_config(PrefixTuningConfig(num_virtual_tokens=1, **task), ctx.model.config)
    per_token = probe.num_layers * 2 * probe.token_dim * (probe.num_transformer_submodules or 1)
    budget = lora_param_count(ctx.model, list(ctx.loaded.target_modules), ctx.rank)
    n_tokens = max(1, round(budget / per_token))
    pm = get_peft_model(ctx.model, make_config(PrefixTuningConfig, ctx.name,
                                               {"num_virtual_tokens": n_tokens, **task}, ctx.options))
    n_tokens = pm.peft_config["default"].num_virtual_tokens
    return MethodHandle(ctx.name, pm, 0, notes=f"peft prefix tuning (Li & Liang 2021), {n_tokens} virtual tokens "
                        f"({per_token} params each) matched to LoRA r={ctx.rank} ({budget} params), no "
                        "reparametrisation")


def require_bitsandbytes() -> None:
    """MethodSkipped unless bitsandbytes loads and has ``nn.Linear4bit`` (QLoRA's NF4 layers)."""
    try:
        import bitsandbytes as bnb  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise MethodSkipped("qlora: bitsandbytes is not installed or does not load "
                            f"(pip install 'structlora[qlora]'): {type(exc).__name__}: {exc}") from exc
    if not hasattr(bnb.nn, "Linear4bit"):
        raise MethodSkipped(f"qlora: bitsandbytes {getattr(bnb, '__version__', '?')} has no nn.Linear4bit")


def _quantize_4bit(model: nn.Module, skip: list[str]) -> int:
    """Replace every nn.Linear outside ``skip`` by a frozen NF4 ``bnb.nn.Linear4bit`` (double quantisation)."""
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        weight = module.weight
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=weight.dtype, compress_statistics=True, quant_type="nf4",
                              device="cpu")
        q.weight = bnb.nn.Params4bit(weight.data.detach().to("cpu").contiguous(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.detach().to("cpu"), requires_grad=False)
        q = q.to(weight.device)  # quantises the weight
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        count += 1
    return count


def quantize_for_qlora(model: nn.Module, heads: list[str] | None) -> int:
    """Quantize the base to NF4 (heads and lm_head kept); MethodSkipped where the 4-bit kernels fail."""
    require_bitsandbytes()
    skip = list(heads or []) + ["lm_head"]
    n_quantized = _quantize_4bit(model, skip)
    if n_quantized == 0:
        raise ValueError("qlora: no nn.Linear layer to quantise in this model")
    try:  # fail early, with the reason, where the 4-bit kernels do not run on this device
        q = next(m for m in model.modules() if type(m).__name__ == "Linear4bit")
        with torch.no_grad():
            q(torch.zeros(1, q.in_features, device=next(model.parameters()).device))
    except Exception as exc:
        raise MethodSkipped(f"qlora: bitsandbytes 4-bit forward fails here: {type(exc).__name__}: {exc}") from exc
    # what transformers sets for a BitsAndBytesConfig(load_in_4bit=True) load: peft then builds its
    # lora.bnb.Linear4bit layers (4-bit-aware merge, dtype casts) instead of a plain lora.Linear
    model.is_loaded_in_4bit = True
    return n_quantized


def build_qlora(ctx: BuildContext) -> MethodHandle:
    """QLoRA (Dettmers et al. 2023): the base quantised to NF4, peft LoRA on top."""
    n_quantized = quantize_for_qlora(ctx.model, ctx.heads)
    pm = peft_lora(ctx)
    return MethodHandle(ctx.name, pm, 0, notes=f"QLoRA (Dettmers et al. 2023): {n_quantized} base nn.Linear -> "
                        "bitsandbytes NF4 Linear4bit (double quant), LoRA on top via peft; heads/lm_head kept")

"""The builders of the methods peft does not provide: our own baselines of Tables 1-2 (DyLoRA,
Sensitivity-LoRA, LoRA-Dropout, LoRAPrune, the Houlsby adapter, full fine-tuning, linear probing) and the
StructLoRA family (the method, its ablation variants of Tables 5 and 9 and the filter strategies, and
the meta-adapters of appendix F, Table 11).

Each builder has the catalogue's one signature ``build_x(ctx: BuildContext) -> MethodHandle``; a
StructLoRA variant's configuration is its `MethodSpec.config` (``ctx.config``), never its name.
"""
from __future__ import annotations

from typing import Any

import torch

from . import adapter as _adapter
from .base import BuildContext, MethodHandle, MethodSkipped, lora_param_count, set_requires_grad
from .dylora import apply_dylora
from .lora_dropout import apply_lora_dropout
from .loraprune import apply_loraprune
from .peft_methods import lora_defaults, make_config, peft_lora, peft_vera, quantize_for_qlora, vera_budget
from .sensitivity_lora import allocate_ranks, estimate_sensitivity, rank_and_alpha_patterns

__all__ = [
    "ADAPTERFUSION_SKIPPED",
    "build_adapter",
    "build_adapterfusion",
    "build_dylora",
    "build_full_ft",
    "build_linear_probe",
    "build_lora_dropout",
    "build_lorafa_structlora",
    "build_loraprune",
    "build_qlora_structlora",
    "build_sensitivity_lora",
    "build_structlora",
    "build_vera_structlora",
    "pinned_library_defaults",
]


def _pop(options: dict[str, Any], key: str, default: Any) -> Any:
    return options.pop(key) if key in options else default


# ---------------------------------------------------------------------------------------- own baselines
def build_dylora(ctx: BuildContext) -> MethodHandle:
    """DyLoRA (Valipour et al. 2023) on peft LoRA: a random rank b per step (Tables 1-2)."""
    min_rank = _pop(ctx.options, "min_rank", 1)
    pm = peft_lora(ctx)
    ctl = apply_dylora(pm, seed=ctx.seed, min_rank=min_rank)
    return MethodHandle(ctx.name, pm, 0, on_step=ctl.on_step, controller=ctl,
                        notes=f"DyLoRA (Valipour et al. 2023), own on peft LoRA: b ~ U{{{min_rank}..{ctx.rank}}} "
                        "per step, scale alpha/b, update mode 'nested' (the paper's non-frozen mode: all of the "
                        "first b rows of A / columns of B train, not only the b-th as in its 'frozen' mode); "
                        "full rank in eval")


def build_lora_dropout(ctx: BuildContext) -> MethodHandle:
    """LoRA-Dropout (Lin et al. 2024) on peft LoRA (Table 1)."""
    p = _pop(ctx.options, "p", 0.1)
    pm = peft_lora(ctx)
    ctl = apply_lora_dropout(pm, p=p, seed=ctx.seed)
    return MethodHandle(ctx.name, pm, 0, on_step=ctl.on_step, controller=ctl,
                        notes=f"LoRA-Dropout (Lin et al. 2024), own on peft LoRA: Bernoulli(p={p}) masks on A's "
                        "columns and B's rows, resampled every step, off in eval")


def build_sensitivity_lora(ctx: BuildContext) -> MethodHandle:
    """Sensitivity-LoRA (Zhang et al. 2025a): ranks allocated by an empirical-Fisher proxy measured on
    ``calibration_batches`` (build_method checks they are given: the spec's ``calibration_batches``)."""
    batches = _pop(ctx.options, "calibration_batches", None)
    scores = estimate_sensitivity(ctx.model, list(ctx.loaded.target_modules), batches)
    ranks = allocate_ranks(scores, total_rank=ctx.rank * len(scores))
    alpha = _pop(ctx.options, "lora_alpha", 2 * ctx.rank)
    rank_pattern, alpha_pattern = rank_and_alpha_patterns(ranks, ctx.rank, alpha)
    torch.manual_seed(ctx.seed)  # the calibration pass consumed no RNG in eval mode, but be explicit
    pm = peft_lora(ctx, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return MethodHandle(ctx.name, pm, 0, controller={"sensitivity": scores, "ranks": ranks},
                        notes="Sensitivity-LoRA (Zhang et al. 2025a), own rank allocation: empirical-Fisher "
                        f"proxy over {len(batches)} calibration batches; ranks {sorted(ranks.values())} "
                        f"(sum {sum(ranks.values())} = {ctx.rank} x {len(ranks)})")


def build_loraprune(ctx: BuildContext) -> MethodHandle:
    """LoRAPrune (Zhang et al. 2023a) on peft LoRA: LoRA-guided structured pruning over the run (Table 1)."""
    if ctx.total_steps is None or ctx.total_steps <= 0:  # build_method checks the spec's needs first
        raise ValueError("loraprune needs total_steps (its pruning schedule runs over the whole training)")
    sparsity, beta = _pop(ctx.options, "sparsity", 0.2), _pop(ctx.options, "beta", 0.9)
    pm = peft_lora(ctx)
    ctl = apply_loraprune(pm, total_steps=ctx.total_steps, sparsity=sparsity, beta=beta)
    return MethodHandle(ctx.name, pm, 0, on_step=ctl.on_step, controller=ctl,
                        notes=f"LoRAPrune (Zhang et al. 2023a), own on peft LoRA: LoRA-guided channel importance, "
                        f"cubic schedule to {sparsity:.0%} of each adapted module's output channels")


def build_adapter(ctx: BuildContext) -> MethodHandle:
    """Our Houlsby bottleneck adapter (Houlsby et al. 2019), matched to LoRA's budget (Table 12)."""
    kw, model = ctx.options, ctx.model
    sites_patterns = _pop(kw, "adapter_sites", None)
    bottleneck = _pop(kw, "bottleneck", None)
    if kw:
        raise ValueError(f"adapter: unsupported option(s) {sorted(kw)} (known: adapter_sites, bottleneck)")
    budget = lora_param_count(model, list(ctx.loaded.target_modules), ctx.rank)
    sites = _adapter.find_adapter_sites(model, sites_patterns)
    modules = dict(model.named_modules())
    dims = [_adapter.out_features(modules[s]) for s in sites]
    m = bottleneck or _adapter.bottleneck_for_budget(dims, budget)
    for p in model.parameters():
        p.requires_grad_(False)
    _adapter.add_bottleneck_adapters(model, m, sites)
    set_requires_grad(model, ctx.heads)
    return MethodHandle(ctx.name, model, 0, notes=f"own Houlsby bottleneck adapter (Houlsby et al. 2019), m={m} at "
                        f"{len(sites)} sites, matched to LoRA r={ctx.rank} ({budget} params); AdapterHub `adapters` "
                        "needs transformers 4.x")


ADAPTERFUSION_SKIPPED = (
    "adapterfusion: AdapterFusion (Pfeiffer et al. 2021) learns to combine several adapters pretrained on "
    "other tasks; no such pretrained task adapters exist offline here and AdapterHub's `adapters` needs "
    "transformers 4.x. A single-task reading (fusing one adapter) degenerates to a plain adapter, so "
    "we skip it rather than report an adapter under another name.")


def build_adapterfusion(ctx: BuildContext) -> MethodHandle:
    """AdapterFusion (Pfeiffer et al. 2021) cannot run here: always `MethodSkipped` (the spec says so
    first, `MethodSpec.skipped`)."""
    raise MethodSkipped(ADAPTERFUSION_SKIPPED)


def build_full_ft(ctx: BuildContext) -> MethodHandle:
    """Full fine-tuning, the upper bound of Table 1: every parameter trains."""
    if ctx.options:
        raise ValueError(f"full_ft: unsupported option(s) {sorted(ctx.options)}")
    for p in ctx.model.parameters():
        p.requires_grad_(True)
    return MethodHandle(ctx.name, ctx.model, 0, notes="full fine-tuning: every parameter trainable (upper bound)")


def build_linear_probe(ctx: BuildContext) -> MethodHandle:
    """Linear probing, the lower bound of Table 1: only the classification head trains."""
    if ctx.options:
        raise ValueError(f"linear_probe: unsupported option(s) {sorted(ctx.options)}")
    for p in ctx.model.parameters():
        p.requires_grad_(False)
    set_requires_grad(ctx.model, ctx.heads)
    return MethodHandle(ctx.name, ctx.model, 0,
                        notes=f"linear probing: only the head {ctx.heads} trains (lower bound)")


# ------------------------------------------------------------------------------------ StructLoRA family
# The library defaults the reproduction's records were trained with, where the library has since changed
# them (issue 21): pinned here, outside `method_defaults`, so the runs (and their record keys) stay as they were.
# target_keep_ratio: None (library default "auto" = 0.5 with concrete gates since issue 21); gate_lr_multiplier:
# 10.0 (library default 50.0 since issue 21). The gated variants set both themselves (their MethodSpec.config).
_PINNED_LIBRARY_DEFAULTS: dict[str, Any] = {"target_keep_ratio": None, "gate_lr_multiplier": 10.0}


def pinned_library_defaults() -> dict[str, Any]:
    """StructLoraConfig fields the reproduction sets to the library's earlier defaults (a copy)."""
    return dict(_PINNED_LIBRARY_DEFAULTS)


def _structlora_config(ctx: BuildContext, rank: int | None = None) -> Any:
    from ... import StructLoraConfig

    defaults = {**lora_defaults(ctx, rank), "structlora_seed": ctx.seed, **_PINNED_LIBRARY_DEFAULTS, **ctx.config}
    if ctx.options.get("gate", defaults.get("gate")) != "concrete":   # gate off / changed: no keep-ratio target
        defaults.pop("target_keep_ratio", None)
    return make_config(StructLoraConfig, ctx.name, defaults, ctx.options)


def _structlora_handle(ctx: BuildContext, sm: Any, cfg: Any, notes: str) -> MethodHandle:
    settings = {k: getattr(cfg, k) for k in ("gate", "filter", "keep_ratio", "graph", "penalty", "penalty_weight")}
    return MethodHandle(ctx.name, sm, 0, extra_loss=sm.structlora_loss, extra_param_groups=sm.structlora_extra_groups,
                        notes=f"{notes} {settings}")


def build_structlora(ctx: BuildContext) -> MethodHandle:
    """StructLoRA (Sec. 3) and its variants (Tables 5, 9; filters of Fig. 2): ``ctx.config`` says which."""
    from ... import get_structlora_model

    cfg = _structlora_config(ctx)
    return _structlora_handle(ctx, get_structlora_model(ctx.model, cfg), cfg, "StructLoRA core")


# StructLoRA as a meta-adapter (paper appendix F, Table 11): the full method (concrete gate, hybrid graph)
# on top of another PEFT method, at that method's budget.
def build_qlora_structlora(ctx: BuildContext) -> MethodHandle:
    """StructLoRA on QLoRA (Table 11): NF4 base, gated and coordinated 4-bit LoRA layers."""
    from ... import get_structlora_model

    n_quantized = quantize_for_qlora(ctx.model, ctx.heads)
    cfg = _structlora_config(ctx)
    return _structlora_handle(ctx, get_structlora_model(ctx.model, cfg), cfg,
                              f"StructLoRA on QLoRA: {n_quantized} base nn.Linear -> NF4 Linear4bit, peft "
                              "lora.bnb.Linear4bit layers gated and coordinated;")


def build_lorafa_structlora(ctx: BuildContext) -> MethodHandle:
    """StructLoRA on LoRA-FA (Table 11): A frozen, the shared AdamW policy for the rest."""
    from ... import get_structlora_model

    cfg = _structlora_config(ctx)
    sm = get_structlora_model(ctx.model, cfg)
    for n, p in sm.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)  # LoRA-FA: A stays at its random init
    return _structlora_handle(ctx, sm, cfg, "StructLoRA on LoRA-FA: A frozen, B + gates + coordinator train "
                              "with the shared AdamW policy (LoRA-FA's projected B update assumes one product "
                              "dW = s B A per layer, which the coordinator's mixing breaks, so it is not used);")


def build_vera_structlora(ctx: BuildContext) -> MethodHandle:
    """StructLoRA on VeRA (Table 11): gates on lambda_d, the coordinator over VeRA's updates."""
    from ... import StructLoraModel

    vera_options = {k: ctx.options.pop(k) for k in list(ctx.options)
                    if k in ("r", "projection_prng_key", "d_initial", "save_projection")}
    pm = peft_vera(ctx, vera_options)
    r = pm.peft_config["default"].r
    cfg = _structlora_config(ctx, rank=r)
    sm = StructLoraModel(pm, cfg)
    return _structlora_handle(ctx, sm, cfg, f"StructLoRA on VeRA r={r}: gates multiply lambda_d, the "
                              f"coordinator mixes diag(lambda_b) B diag(lambda_d) A; {vera_budget(pm)} VeRA "
                              "params + gates/coordinator (budget-exempt like vera);")

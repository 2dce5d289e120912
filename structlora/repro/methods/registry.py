"""Registry of the fine-tuning methods compared in the paper (Table 1, 2, 12; appendix A).

One name -> one builder with a uniform interface::

    handle = build_method("dylora", loaded, rank=8, seed=0, total_steps=1000)
    opt = handle.build_optimizer(lr=2e-4, weight_decay=0.01)
    for step, batch in enumerate(batches, start=1):
        out = handle.model(**batch)
        loss = out.loss + (handle.extra_loss() if handle.extra_loss else 0)
        loss.backward(); opt.step()
        if handle.on_step: handle.on_step(step, total_steps)   # after step(), BEFORE zero_grad()
        opt.zero_grad()

Conventions shared by every builder:

* ``loaded.model`` is deep-copied first (``inplace=True`` adapts it in place instead), so building
  several methods from one :class:`~structlora.repro.assets.models.LoadedModel` never stacks adapters.
* ``torch.manual_seed(seed)`` is called right before any new parameter is created.
* the peft ``task_type`` follows ``loaded.kind``: ``SEQ_CLS`` for "seq-cls", ``CAUSAL_LM`` for "causal-lm",
  none for "image-cls". The classification head (seq-cls / image-cls) is trainable for every method
  (peft ``modules_to_save``, as in peft's GLUE recipes), linear probing included.
* LoRA-family defaults follow appendix A: target modules from ``loaded.target_modules`` (q/v),
  ``lora_alpha = 2 * rank`` (r=8, alpha=16), ``lora_dropout = 0``. Extra ``**kwargs`` go to the method's
  config (peft's ``LoraConfig`` / ``StructLoraConfig`` fields) or to its own options (documented per method).
* ``on_step(global_step, total_steps)`` is called after every optimizer step with ``global_step`` = number
  of optimizer steps done (1-based), before ``zero_grad`` (AdaLoRA's importance needs the gradients).

Errors are raised before any training: unknown name (the message lists the names), a method that cannot
apply to the model kind, missing required options, and (:func:`check_budget`) budget mismatches.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import adapter as _adapter
from .dylora import apply_dylora
from .lora_dropout import apply_lora_dropout
from .loraprune import apply_loraprune
from .sensitivity_lora import (
    allocate_ranks,
    estimate_sensitivity,
    rank_and_alpha_patterns,
    target_linear_names,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas

    from ..assets.models import LoadedModel

__all__ = [
    "BUDGET_POLICY",
    "MethodHandle",
    "MethodSkipped",
    "build_method",
    "check_budget",
    "count_trainable",
    "describe_methods",
    "list_methods",
    "lora_param_count",
    "method_defaults",
    "param_groups",
    "pinned_library_defaults",
]

KINDS = ("seq-cls", "causal-lm", "image-cls")


class MethodSkipped(Exception):
    """Raised (before training) when a method cannot run in this environment; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        if not reason:
            raise ValueError("MethodSkipped needs a reason")
        super().__init__(reason)
        self.reason = reason


@dataclass
class MethodHandle:
    """What the trainer needs to run one method (see the module docstring for the loop)."""

    name: str
    model: nn.Module
    trainable_params: int
    extra_loss: Callable[[], torch.Tensor] | None = None
    on_step: Callable[[int, int], None] | None = None
    make_optimizer: Callable[[float, float], torch.optim.Optimizer] | None = None
    notes: str = ""
    controller: Any = None  # the method's own state object (DyLoRA / LoRA-Dropout / LoRAPrune controller, ...)
    extra_param_groups: Callable[[float], list[dict[str, Any]]] | None = None  # method-only groups (StructLoRA)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The shared AdamW grouping (`param_groups`) of this method's trainable parameters."""
        return param_groups(self.model, lr, weight_decay,
                            extra=self.extra_param_groups(lr) if self.extra_param_groups is not None else ())

    def build_optimizer(self, lr: float, weight_decay: float,
                        betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
        """``make_optimizer(lr, wd)`` when the method's optimizer is part of the method (LoRA-FA's projected
        update), else AdamW over `param_groups` (the same for every method)."""
        if self.make_optimizer is not None:
            return self.make_optimizer(lr, weight_decay)
        return torch.optim.AdamW(self.param_groups(lr, weight_decay), lr=lr, betas=betas, eps=1e-8)


# ---------------------------------------------------------------------------------------------- helpers
def param_groups(model: nn.Module, lr: float, weight_decay: float, extra: Any = ()) -> list[dict[str, Any]]:
    """The one optimizer policy of every method (fair baselines): AdamW with decay on matrices (weights,
    LoRA factors, the head weight), none on biases / LayerNorm / vectors, and method-specific ``extra``
    groups (StructLoRA's gates and coordinator, with their lr multipliers) appended; see
    `structlora.model.param_groups`, which this is."""
    from ...model import param_groups as _shared

    return _shared(model, lr, weight_decay, extra=extra)


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameters (shared / tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def lora_param_count(model: nn.Module, target_modules: list[str] | str, rank: int) -> int:
    """Adapter parameters of plain LoRA of rank ``rank`` on ``target_modules``: sum of r (d_in + d_out)."""
    modules = dict(model.named_modules())
    return sum(rank * sum(modules[n].weight.shape) for n in target_linear_names(model, target_modules))


_HEAD_CANDIDATES = {"seq-cls": ("classifier", "score"), "image-cls": ("classifier", "head", "fc", "score")}


def _head_names(model: nn.Module, kind: str) -> list[str]:
    """Full names of the classification head module(s) of a seq-cls / image-cls model."""
    if kind not in _HEAD_CANDIDATES:
        return []
    named = list(model.named_modules())
    get_classifier = getattr(model, "get_classifier", None)  # timm
    if callable(get_classifier):
        head = get_classifier()
        for name, module in named:
            if module is head and name and any(p.numel() for p in module.parameters()):
                return [name]
    for cand in _HEAD_CANDIDATES[kind]:
        hits = [n for n, m in named if n.split(".")[-1] == cand and any(True for _ in m.parameters())]
        if hits:
            return [min(hits, key=lambda n: n.count("."))]
    raise ValueError(f"cannot find the classification head of this {kind} model "
                     f"(looked for modules named {_HEAD_CANDIDATES[kind]}); pass head_modules=[...]")


def _set_requires_grad(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in names:
        for p in modules[name].parameters():
            p.requires_grad_(True)


def _task_fields(loaded: LoadedModel, model: nn.Module, heads: list[str] | None) -> dict[str, Any]:
    """peft ``task_type`` / ``modules_to_save`` for the model kind (heads stay trainable)."""
    heads = heads if heads is not None else _head_names(model, loaded.kind)
    if loaded.kind == "seq-cls":
        extra = [h for h in heads if h.split(".")[-1] not in ("classifier", "score")]
        return {"task_type": "SEQ_CLS", "modules_to_save": extra or None}  # peft adds classifier/score
    if loaded.kind == "causal-lm":
        return {"task_type": "CAUSAL_LM"}
    return {"modules_to_save": heads}


def _config(cls: type, method: str, defaults: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """``cls(**defaults | kwargs)``; an unknown option becomes a ValueError naming the method."""
    try:
        return cls(**{**defaults, **kwargs})
    except TypeError as exc:
        raise ValueError(f"{method}: unsupported option(s) {sorted(kwargs)} for {cls.__name__}: {exc}") from exc


def _lora_defaults(loaded: LoadedModel, model: nn.Module, rank: int, heads: list[str] | None) -> dict[str, Any]:
    return {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(loaded.target_modules),
            "lora_dropout": 0.0, **_task_fields(loaded, model, heads)}


def _peft_lora(method: str, loaded: LoadedModel, model: nn.Module, rank: int, kw: dict[str, Any],
               heads: list[str] | None = None, **overrides: Any) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = _config(LoraConfig, method, {**_lora_defaults(loaded, model, rank, heads), **overrides}, kw)
    return get_peft_model(model, cfg)


def _pop(kw: dict[str, Any], key: str, default: Any) -> Any:
    return kw.pop(key) if key in kw else default


# --------------------------------------------------------------------------------------- peft methods
def _build_lora(name, loaded, model, rank, seed, total_steps, kw, heads):
    return MethodHandle(name, _peft_lora(name, loaded, model, rank, kw, heads), 0,
                        notes="peft LoRA (Hu et al. 2022)")


def _build_dora(name, loaded, model, rank, seed, total_steps, kw, heads):
    return MethodHandle(name, _peft_lora(name, loaded, model, rank, kw, heads, use_dora=True), 0,
                        notes="peft LoRA with use_dora=True (DoRA, Liu et al. 2024)")


def _build_vera(name, loaded, model, rank, seed, total_steps, kw, heads):
    from peft import VeraConfig, get_peft_model

    pm = _peft_vera(name, loaded, model, seed, kw, heads)
    r = pm.peft_config["default"].r
    return MethodHandle(name, pm, 0, notes=f"peft VeRA (Kopiczko et al. 2024), r={r} (the VeRA paper's rank, "
                        f"independent of the LoRA rank): frozen shared random A/B, trainable lambda_b (d) and "
                        f"lambda_d (r) per layer = {_vera_budget(pm)} adapter params (budget-exempt)")


VERA_RANK = 256  # Kopiczko et al. 2024 use r = 256 (RoBERTa GLUE) and up to 1024 (LLaMA instruction tuning)


def _peft_vera(name, loaded, model, seed, kw, heads):
    from peft import VeraConfig, get_peft_model

    defaults = {"r": VERA_RANK, "target_modules": list(loaded.target_modules), "projection_prng_key": seed,
                "vera_dropout": 0.0, **_task_fields(loaded, model, heads)}
    return get_peft_model(model, _config(VeraConfig, name, defaults, kw))


def _vera_budget(pm: nn.Module) -> int:
    return sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and "vera_lambda" in n)


class _AdaLoraState:
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


def _build_adalora(name, loaded, model, rank, seed, total_steps, kw, heads):
    from peft import AdaLoraConfig, get_peft_model

    if total_steps is None or total_steps <= 0:
        raise ValueError("adalora needs total_steps (AdaLoRA's budget schedule is defined over the run)")
    defaults = {"init_r": max(rank, math.ceil(1.5 * rank)), "target_r": rank, "total_step": total_steps,
                "tinit": int(0.1 * total_steps), "tfinal": int(0.2 * total_steps),
                "deltaT": max(1, total_steps // 100), "lora_alpha": 2 * rank,
                "target_modules": list(loaded.target_modules), "lora_dropout": 0.0,
                **_task_fields(loaded, model, heads)}
    pm = get_peft_model(model, _config(AdaLoraConfig, name, defaults, kw))
    cfg = pm.peft_config["default"]

    def on_step(global_step: int, total: int) -> None:
        if global_step <= cfg.total_step - cfg.tfinal:
            missing = [n for n, p in pm.named_parameters() if "lora_" in n and p.requires_grad and p.grad is None]
            if missing:
                raise RuntimeError("adalora: update_and_allocate needs the gradients; call on_step after "
                                   f"optimizer.step() and before optimizer.zero_grad() (no grad on {missing[0]})")
        pm.base_model.update_and_allocate(global_step)

    return MethodHandle(name, pm, 0, on_step=on_step, controller=_AdaLoraState(pm),
                        notes=f"peft AdaLoRA (Zhang et al. 2023b): init_r={cfg.init_r} -> target_r={cfg.target_r}, "
                        f"tinit={cfg.tinit}, tfinal={cfg.tfinal}, deltaT={cfg.deltaT}; update_and_allocate every "
                        "step via on_step; peft adds the orthogonality loss to out.loss when labels are passed")


def _build_lora_fa(name, loaded, model, rank, seed, total_steps, kw, heads):
    from peft.optimizers import create_lorafa_optimizer

    pm = _peft_lora(name, loaded, model, rank, kw, heads)
    for n, p in pm.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)  # LoRA-FA: A stays at its random init (create_lorafa_optimizer does it too)
    cfg = pm.peft_config["default"]

    def make_optimizer(lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return create_lorafa_optimizer(pm, r=cfg.r, lora_alpha=cfg.lora_alpha, lr=lr, weight_decay=weight_decay)

    return MethodHandle(name, pm, 0, make_optimizer=make_optimizer,
                        notes="peft LoRA + peft.optimizers.create_lorafa_optimizer (LoRA-FA: A frozen, "
                        "projected B update)")


def _build_prefix(name, loaded, model, rank, seed, total_steps, kw, heads):
    from peft import PrefixTuningConfig, get_peft_model
    from peft.utils.other import _prepare_prompt_learning_config

    task = _task_fields(loaded, model, heads)
    probe = _prepare_prompt_learning_config(PrefixTuningConfig(num_virtual_tokens=1, **task),
                                            model.config)
    per_token = probe.num_layers * 2 * probe.token_dim * (probe.num_transformer_submodules or 1)
    budget = lora_param_count(model, list(loaded.target_modules), rank)
    n_tokens = max(1, round(budget / per_token))
    pm = get_peft_model(model, _config(PrefixTuningConfig, name, {"num_virtual_tokens": n_tokens, **task}, kw))
    n_tokens = pm.peft_config["default"].num_virtual_tokens
    return MethodHandle(name, pm, 0, notes=f"peft prefix tuning (Li & Liang 2021), {n_tokens} virtual tokens "
                        f"({per_token} params each) matched to LoRA r={rank} ({budget} params), no reparametrisation")


def _require_bitsandbytes() -> None:
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


def _quantize_for_qlora(model: nn.Module, heads: list[str] | None) -> int:
    """Quantize the base to NF4 (heads and lm_head kept); MethodSkipped where the 4-bit kernels fail."""
    _require_bitsandbytes()
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


def _build_qlora(name, loaded, model, rank, seed, total_steps, kw, heads):
    n_quantized = _quantize_for_qlora(model, heads)
    pm = _peft_lora(name, loaded, model, rank, kw, heads)
    return MethodHandle(name, pm, 0, notes=f"QLoRA (Dettmers et al. 2023): {n_quantized} base nn.Linear -> "
                        "bitsandbytes NF4 Linear4bit (double quant), LoRA on top via peft; heads/lm_head kept")


# ---------------------------------------------------------------------------------------- own baselines
def _build_dylora(name, loaded, model, rank, seed, total_steps, kw, heads):
    min_rank = _pop(kw, "min_rank", 1)
    pm = _peft_lora(name, loaded, model, rank, kw, heads)
    ctl = apply_dylora(pm, seed=seed, min_rank=min_rank)
    return MethodHandle(name, pm, 0, on_step=ctl.on_step, controller=ctl,
                        notes=f"DyLoRA (Valipour et al. 2023), own on peft LoRA: b ~ U{{{min_rank}..{rank}}} "
                        "per step, scale alpha/b, update mode 'nested' (the paper's non-frozen mode: all of the "
                        "first b rows of A / columns of B train, not only the b-th as in its 'frozen' mode); "
                        "full rank in eval")


def _build_lora_dropout(name, loaded, model, rank, seed, total_steps, kw, heads):
    p = _pop(kw, "p", 0.1)
    pm = _peft_lora(name, loaded, model, rank, kw, heads)
    ctl = apply_lora_dropout(pm, p=p, seed=seed)
    return MethodHandle(name, pm, 0, on_step=ctl.on_step, controller=ctl,
                        notes=f"LoRA-Dropout (Lin et al. 2024), own on peft LoRA: Bernoulli(p={p}) masks on A's "
                        "columns and B's rows, resampled every step, off in eval")


def _build_sensitivity_lora(name, loaded, model, rank, seed, total_steps, kw, heads):
    batches = _pop(kw, "calibration_batches", None)
    if not batches:
        raise ValueError("sensitivity_lora needs calibration_batches=[batch, ...] (a few labelled batches "
                         "from the training split) to estimate the per-module sensitivity")
    targets = list(loaded.target_modules)
    scores = estimate_sensitivity(model, targets, batches)
    ranks = allocate_ranks(scores, total_rank=rank * len(scores))
    alpha = _pop(kw, "lora_alpha", 2 * rank)
    rank_pattern, alpha_pattern = rank_and_alpha_patterns(ranks, rank, alpha)
    torch.manual_seed(seed)  # the calibration pass consumed no RNG in eval mode, but be explicit
    pm = _peft_lora(name, loaded, model, rank, kw, heads, lora_alpha=alpha, rank_pattern=rank_pattern,
                    alpha_pattern=alpha_pattern)
    return MethodHandle(name, pm, 0, controller={"sensitivity": scores, "ranks": ranks},
                        notes="Sensitivity-LoRA (Zhang et al. 2025a), own rank allocation: empirical-Fisher "
                        f"proxy over {len(batches)} calibration batches; ranks {sorted(ranks.values())} "
                        f"(sum {sum(ranks.values())} = {rank} x {len(ranks)})")


def _build_loraprune(name, loaded, model, rank, seed, total_steps, kw, heads):
    if total_steps is None or total_steps <= 0:
        raise ValueError("loraprune needs total_steps (its pruning schedule runs over the whole training)")
    sparsity, beta = _pop(kw, "sparsity", 0.2), _pop(kw, "beta", 0.9)
    pm = _peft_lora(name, loaded, model, rank, kw, heads)
    ctl = apply_loraprune(pm, total_steps=total_steps, sparsity=sparsity, beta=beta)
    return MethodHandle(name, pm, 0, on_step=ctl.on_step, controller=ctl,
                        notes=f"LoRAPrune (Zhang et al. 2023a), own on peft LoRA: LoRA-guided channel importance, "
                        f"cubic schedule to {sparsity:.0%} of each adapted module's output channels")


def _build_adapter(name, loaded, model, rank, seed, total_steps, kw, heads):
    sites_patterns = _pop(kw, "adapter_sites", None)
    bottleneck = _pop(kw, "bottleneck", None)
    if kw:
        raise ValueError(f"adapter: unsupported option(s) {sorted(kw)} (known: adapter_sites, bottleneck)")
    budget = lora_param_count(model, list(loaded.target_modules), rank)
    sites = _adapter.find_adapter_sites(model, sites_patterns)
    modules = dict(model.named_modules())
    dims = [_adapter.out_features(modules[s]) for s in sites]
    m = bottleneck or _adapter.bottleneck_for_budget(dims, budget)
    for p in model.parameters():
        p.requires_grad_(False)
    _adapter.add_bottleneck_adapters(model, m, sites)
    _set_requires_grad(model, heads or [])
    return MethodHandle(name, model, 0, notes=f"own Houlsby bottleneck adapter (Houlsby et al. 2019), m={m} at "
                        f"{len(sites)} sites, matched to LoRA r={rank} ({budget} params); AdapterHub `adapters` "
                        "needs transformers 4.x")


def _build_adapterfusion(name, loaded, model, rank, seed, total_steps, kw, heads):
    raise MethodSkipped(
        "adapterfusion: AdapterFusion (Pfeiffer et al. 2021) learns to combine several adapters pretrained on "
        "other tasks; no such pretrained task adapters exist offline here and AdapterHub's `adapters` needs "
        "transformers 4.x. A single-task reading (fusing one adapter) degenerates to a plain adapter, so "
        "we skip it rather than report an adapter under another name.")


def _build_full_ft(name, loaded, model, rank, seed, total_steps, kw, heads):
    if kw:
        raise ValueError(f"full_ft: unsupported option(s) {sorted(kw)}")
    for p in model.parameters():
        p.requires_grad_(True)
    return MethodHandle(name, model, 0, notes="full fine-tuning: every parameter trainable (upper bound)")


def _build_linear_probe(name, loaded, model, rank, seed, total_steps, kw, heads):
    if kw:
        raise ValueError(f"linear_probe: unsupported option(s) {sorted(kw)}")
    for p in model.parameters():
        p.requires_grad_(False)
    _set_requires_grad(model, heads or [])
    return MethodHandle(name, model, 0, notes=f"linear probing: only the head {heads} trains (lower bound)")


# ------------------------------------------------------------------------------------ StructLoRA family
# Config overrides per variant (any StructLoraConfig field in **kwargs overrides them). penalty_weight 0.1
# for lora_cos / lora_lap and keep_ratio 0.5 for the filter variants are our documented defaults: the paper
# gives no value. The filter variants compare filters only (graph=None); random / top-k-norm masks are fixed,
# so they run without a learned gate. The gated variants close half of each module's directions (target
# keep ratio 0.5, Fig. 2's keep ratio, reached by the augmented Lagrangian of `structlora.gates`) with gate
# logits at 50x the base rate: the configuration whose learning rate the cpu-tier pilot selected
# (scripts/pilot.py). Without a target, lambda_IB alone closed no direction in the protocol-1 runs.
_GATED = {"gate": "concrete", "target_keep_ratio": 0.5, "gate_lr_multiplier": 50.0}
_STRUCT_VARIANTS: dict[str, dict[str, Any]] = {
    "structlora": {**_GATED, "graph": "hybrid"},
    "structlora_no_gate": {"gate": None, "graph": "hybrid"},
    "structlora_no_coord": {**_GATED, "graph": None},
    "lora_cos": {"gate": None, "graph": None, "penalty": "cos", "penalty_weight": 0.1},
    "lora_lap": {"gate": None, "graph": None, "penalty": "laplacian", "penalty_weight": 0.1},
    "filter_ib": {"gate": "concrete", "filter": "ib", "keep_ratio": 0.5, "graph": None},
    "filter_random": {"gate": None, "filter": "random", "keep_ratio": 0.5, "graph": None},
    "filter_topk_norm": {"gate": None, "filter": "topk_norm", "keep_ratio": 0.5, "graph": None},
}


# The library defaults the reproduction's records were trained with, where the library has since changed
# them (issue 21): pinned here, outside `method_defaults`, so the runs (and their record keys) stay as they were.
# target_keep_ratio: None (library default "auto" = 0.5 with concrete gates since issue 21); gate_lr_multiplier:
# 10.0 (library default 50.0 since issue 21). The gated variants set both themselves (_GATED).
_PINNED_LIBRARY_DEFAULTS: dict[str, Any] = {"target_keep_ratio": None, "gate_lr_multiplier": 10.0}


def pinned_library_defaults() -> dict[str, Any]:
    """StructLoraConfig fields the reproduction sets to the library's earlier defaults (a copy)."""
    return dict(_PINNED_LIBRARY_DEFAULTS)


def _structlora_config(name, loaded, model, rank, seed, kw, heads, variant: str = "structlora"):
    from ... import StructLoraConfig

    defaults = {**_lora_defaults(loaded, model, rank, heads), "structlora_seed": seed, **_PINNED_LIBRARY_DEFAULTS,
                **_STRUCT_VARIANTS[variant]}
    if kw.get("gate", defaults.get("gate")) != "concrete":   # gate switched off / changed: no keep-ratio target
        defaults.pop("target_keep_ratio", None)
    return _config(StructLoraConfig, name, defaults, kw)


def _structlora_handle(name, sm, cfg, notes: str) -> MethodHandle:
    settings = {k: getattr(cfg, k) for k in ("gate", "filter", "keep_ratio", "graph", "penalty", "penalty_weight")}
    return MethodHandle(name, sm, 0, extra_loss=sm.structlora_loss, extra_param_groups=sm.structlora_extra_groups,
                        notes=f"{notes} {settings}")


def _build_structlora(name, loaded, model, rank, seed, total_steps, kw, heads):
    from ... import get_structlora_model

    cfg = _structlora_config(name, loaded, model, rank, seed, kw, heads, variant=name)
    return _structlora_handle(name, get_structlora_model(model, cfg), cfg, "StructLoRA core")


# StructLoRA as a meta-adapter (paper appendix F, Table 11): the full method (concrete gate, hybrid graph)
# on top of another PEFT method, at that method's budget.
def _build_qlora_structlora(name, loaded, model, rank, seed, total_steps, kw, heads):
    from ... import get_structlora_model

    n_quantized = _quantize_for_qlora(model, heads)
    cfg = _structlora_config(name, loaded, model, rank, seed, kw, heads)
    return _structlora_handle(name, get_structlora_model(model, cfg), cfg,
                              f"StructLoRA on QLoRA: {n_quantized} base nn.Linear -> NF4 Linear4bit, peft "
                              "lora.bnb.Linear4bit layers gated and coordinated;")


def _build_lorafa_structlora(name, loaded, model, rank, seed, total_steps, kw, heads):
    from ... import get_structlora_model

    cfg = _structlora_config(name, loaded, model, rank, seed, kw, heads)
    sm = get_structlora_model(model, cfg)
    for n, p in sm.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)  # LoRA-FA: A stays at its random init
    return _structlora_handle(name, sm, cfg, "StructLoRA on LoRA-FA: A frozen, B + gates + coordinator train "
                              "with the shared AdamW policy (LoRA-FA's projected B update assumes one product "
                              "dW = s B A per layer, which the coordinator's mixing breaks, so it is not used);")


def _build_vera_structlora(name, loaded, model, rank, seed, total_steps, kw, heads):
    from ... import StructLoraModel

    vera_kw = {k: kw.pop(k) for k in list(kw) if k in ("r", "projection_prng_key", "d_initial", "save_projection")}
    pm = _peft_vera(name, loaded, model, seed, vera_kw, heads)
    r = pm.peft_config["default"].r
    cfg = _structlora_config(name, loaded, model, r, seed, kw, heads)
    sm = StructLoraModel(pm, cfg)
    return _structlora_handle(name, sm, cfg, f"StructLoRA on VeRA r={r}: gates multiply lambda_d, the "
                              f"coordinator mixes diag(lambda_b) B diag(lambda_d) A; {_vera_budget(pm)} VeRA "
                              "params + gates/coordinator (budget-exempt like vera);")


# --------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Spec:
    builder: Callable[..., MethodHandle]
    source: str  # "peft" | "own" | "structlora" | "skipped"
    paper: str
    kinds: tuple[str, ...] = KINDS


_PREFIX_KINDS = ("seq-cls", "causal-lm")
_REGISTRY: dict[str, _Spec] = {
    "full_ft": _Spec(_build_full_ft, "own", "full fine-tuning (upper bound)"),
    "linear_probe": _Spec(_build_linear_probe, "own", "linear probing (lower bound)"),
    "adapter": _Spec(_build_adapter, "own", "Houlsby et al. 2019"),
    "adapterfusion": _Spec(_build_adapterfusion, "skipped", "Pfeiffer et al. 2021"),
    "prefix": _Spec(_build_prefix, "peft", "Li & Liang 2021", _PREFIX_KINDS),
    "lora": _Spec(_build_lora, "peft", "Hu et al. 2022"),
    "qlora": _Spec(_build_qlora, "peft", "Dettmers et al. 2023"),
    "dora": _Spec(_build_dora, "peft", "Liu et al. 2024b"),
    "vera": _Spec(_build_vera, "peft", "Kopiczko et al. 2024"),
    "adalora": _Spec(_build_adalora, "peft", "Zhang et al. 2023b"),
    "lora_fa": _Spec(_build_lora_fa, "peft", "Zhang et al. 2023, LoRA-FA (cited as Drost 2024 in Table 11)"),
    "dylora": _Spec(_build_dylora, "own", "Valipour et al. 2023"),
    "sensitivity_lora": _Spec(_build_sensitivity_lora, "own", "Zhang et al. 2025a"),
    "lora_dropout": _Spec(_build_lora_dropout, "own", "Lin et al. 2024"),
    "loraprune": _Spec(_build_loraprune, "own", "Zhang et al. 2023a"),
    **{name: _Spec(_build_structlora, "structlora", "this paper") for name in _STRUCT_VARIANTS},
    "qlora+structlora": _Spec(_build_qlora_structlora, "structlora", "this paper, Table 11 (on Dettmers et al. 2023)"),
    "lorafa+structlora": _Spec(_build_lorafa_structlora, "structlora", "this paper, Table 11 (on LoRA-FA)"),
    "vera+structlora": _Spec(_build_vera_structlora, "structlora", "this paper, Table 11 (on Kopiczko et al. 2024)"),
}

BUDGET_POLICY: dict[str, str] = {
    "adapter": "matched",
    "prefix": "matched",
    "adapterfusion": "matched",
    "full_ft": "exempt: upper bound, every parameter trains",
    "linear_probe": "exempt: lower bound, only the head trains",
    "vera": "exempt: VeRA trains only scaling vectors over shared frozen random projections",
    "vera+structlora": "exempt: VeRA's scaling vectors (r=256) plus StructLoRA's gates and coordinator",
    "lora_fa": "exempt: LoRA-FA freezes A by design (about half of LoRA's adapter parameters)",
    "lorafa+structlora": "exempt: LoRA-FA's budget (A frozen) plus StructLoRA's gates and coordinator",
    "adalora": "exempt: starts at init_r and is pruned to an average rank of target_r during training",
}
"""How :func:`check_budget` treats each method; any other method is a same-rank LoRA variant (reported)."""


def list_methods() -> list[str]:
    """Every registered method name, in the registry's order."""
    return list(_REGISTRY)


def method_defaults(name: str) -> dict[str, Any]:
    """The configuration the registry gives method ``name`` beyond its run's spec (the StructLoRA
    variants' overrides, `_STRUCT_VARIANTS`; {} for the others). A run record stores it, so a record
    written under other defaults is never served for the method as it is now (`grid.read_record`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}")
    base = "structlora" if name.endswith("+structlora") else name   # meta-adapters build the full method
    return copy.deepcopy(_STRUCT_VARIANTS.get(base, {}))


def describe_methods() -> pandas.DataFrame:
    """One row per method: source (peft / own / structlora / skipped), paper, model kinds, budget policy."""
    import pandas as pd

    return pd.DataFrame([
        {"method": n, "source": s.source, "paper": s.paper, "kinds": ",".join(s.kinds),
         "budget": BUDGET_POLICY.get(n, "same-rank LoRA variant")}
        for n, s in _REGISTRY.items()
    ])


def _already_adapted(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return hasattr(model, "bottleneck_adapters") or any(isinstance(m, BaseTunerLayer) for m in model.modules())


def build_method(name: str, loaded: LoadedModel, rank: int = 8, seed: int = 0, total_steps: int | None = None,
                 *, inplace: bool = False, head_modules: list[str] | None = None, **kwargs: Any) -> MethodHandle:
    """Build method ``name`` on ``loaded`` (see the module docstring for the shared conventions).

    Args:
        name: one of :func:`list_methods`.
        loaded: the model to adapt (``kind``, ``model``, ``target_modules`` are used).
        rank: LoRA rank; adapter/prefix sizes are matched to LoRA at this rank.
        seed: ``torch.manual_seed(seed)`` before new parameters are created; seeds the methods' own RNGs.
        total_steps: optimizer steps of the run (required by adalora and loraprune).
        inplace: adapt ``loaded.model`` itself instead of a deep copy.
        head_modules: names of the classification head modules (default: ``loaded.modules_to_save``,
            else detected by name: classifier / score / head / fc).
        **kwargs: method options / config fields (see each method's notes).

    Raises:
        ValueError: unknown name, a method that cannot apply to ``loaded.kind``, missing or unknown options.
        MethodSkipped: the method cannot run in this environment (reason in ``.reason``).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}")
    spec = _REGISTRY[name]
    kind = getattr(loaded, "kind", None)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    if name == "prefix" and kind == "image-cls":
        raise ValueError("prefix tuning cannot apply to image-cls models (it prepends key/value prefixes to "
                         "the attention of a text transformer through transformers' cache API)")
    if name == "linear_probe" and kind == "causal-lm":
        raise MethodSkipped("linear_probe: a causal LM has no classification head to probe (SmolLM2's lm_head "
                            "is tied to the input embeddings), so there is no honest linear-probe baseline")
    if kind not in spec.kinds:
        raise ValueError(f"{name} cannot apply to {kind} models (supports: {', '.join(spec.kinds)})")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if name == "adapterfusion":
        _build_adapterfusion(name, loaded, None, rank, seed, total_steps, kwargs, None)
    if name in ("qlora", "qlora+structlora"):
        _require_bitsandbytes()
    if name in ("adalora", "loraprune") and (total_steps is None or total_steps <= 0):
        raise ValueError(f"{name} needs total_steps > 0 (its schedule is defined over the whole run)")
    if name == "sensitivity_lora" and not kwargs.get("calibration_batches"):
        raise ValueError("sensitivity_lora needs calibration_batches=[batch, ...] (a few labelled batches from "
                         "the training split) to estimate the per-module sensitivity")

    model = loaded.model if inplace else copy.deepcopy(loaded.model)
    if _already_adapted(model):
        raise ValueError(f"{name}: the model already carries adapters; build from a fresh LoadedModel "
                         "(or use inplace=False)")
    if head_modules is not None:
        heads = list(head_modules)
    elif kind == "causal-lm":
        heads = []
    else:
        heads = list(getattr(loaded, "modules_to_save", None) or []) or _head_names(model, kind)
    torch.manual_seed(seed)
    handle = spec.builder(name, loaded, model, rank, seed, total_steps, dict(kwargs), heads)
    handle.name = name
    handle.trainable_params = count_trainable(handle.model)
    return handle


def check_budget(handles: Mapping[str, MethodHandle], reference: str = "lora",
                 tolerance: float = 0.1) -> pandas.DataFrame:
    """Table of trainable parameters and their ratio to ``reference`` (paper Table 12).

    Budget-matched methods (``BUDGET_POLICY[...] == "matched"``: adapter, prefix) must be within
    ``tolerance`` (relative) of the reference, else ValueError listing the offenders. Exempt methods
    (full_ft, linear_probe, vera, lora_fa, adalora) say why in ``status``; the other LoRA variants at the
    same rank are reported (``status`` notes a deviation beyond tolerance, nothing is raised).
    """
    import pandas as pd

    if reference not in handles:
        raise ValueError(f"check_budget: reference method {reference!r} is not among {sorted(handles)}")
    ref = handles[reference].trainable_params
    if ref <= 0:
        raise ValueError(f"check_budget: reference {reference!r} has no trainable parameters")
    rows, bad = [], []
    for name, handle in handles.items():
        ratio = handle.trainable_params / ref
        within = abs(ratio - 1.0) <= tolerance
        policy = "reference" if name == reference else BUDGET_POLICY.get(name, "same-rank")
        if policy == "matched":
            status = "ok" if within else f"MISMATCH ({ratio:.3f}x)"
            if not within:
                bad.append(f"{name}: {handle.trainable_params} vs {ref} ({ratio:.3f}x)")
        elif policy.startswith("exempt"):
            status = policy
        elif policy == "reference":
            status = "reference"
        else:
            status = "ok" if within else f"same-rank variant, {ratio:.3f}x (reported, not enforced)"
        rows.append({"method": name, "trainable_params": handle.trainable_params, "ratio": round(ratio, 4),
                     "policy": policy.split(":")[0], "status": status})
    table = pd.DataFrame(rows)
    if bad:
        raise ValueError(f"budget mismatch beyond {tolerance:.0%} of {reference}: " + "; ".join(bad))
    return table

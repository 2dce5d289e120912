"""`StructLoraConfig`: peft's `LoraConfig` plus the two StructLoRA stages (paper Sec. 3.2-3.3).

Every extra field carries a one-line reason; `__post_init__` validates them so a bad setting fails
before a model is touched. Defaults follow the paper where it gives a value (r=8, alpha=16, one GNN
step, hybrid graph; appendix A, Table 6) and are our documented choice where it does not (gate prior,
lambda_IB, similarity threshold and refresh period: see README "Deviations from the paper"). The gate
defaults (a keep target of 0.5 per module, gate logits at 50x the learning rate) are the gated
configuration of the reproduction (README "Choosing the gate defaults"), which closes half of the
directions at any learning rate instead of scaling all of them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from peft import LoraConfig

__all__ = ["StructLoraConfig", "GATES", "FILTERS", "GRAPHS", "PENALTIES", "AUTO_TARGET"]

GATES = (None, "concrete", "gaussian")
AUTO_TARGET = 0.5   # target_keep_ratio="auto" with hard-concrete gates
FILTERS = ("ib", "random", "topk_norm")
GRAPHS = (None, "adjacency", "similarity", "hybrid")
PENALTIES = (None, "cos", "laplacian")


@dataclass
class StructLoraConfig(LoraConfig):
    """LoRA config with an IB gate over the r directions and a depth coordinator across layers.

    With ``gate=None, graph=None, penalty=None`` the model is exactly peft LoRA (tested).
    """

    # ---- Stage 1: information-bottleneck gate (Eq. 2-3, 8; appendix E.2) ----
    gate: Optional[str] = field(default="concrete", metadata={"help": "'concrete' (hard-concrete, exact zeros), 'gaussian' (additive noise, KL to N(0, sigma^2)) or None (no gate)"})
    filter: str = field(default="ib", metadata={"help": "how directions are kept: 'ib' (learned gate), 'random' (fixed mask) or 'topk_norm' (||b_j||*||a_j||, re-scored) (Fig. 2)"})
    keep_ratio: Optional[float] = field(default=None, metadata={"help": "fraction of each module's r directions kept (per module, ceil(rho*r)); None = no cardinality constraint"})
    lambda_ib: float = field(default=0.05, metadata={"help": "weight of the compression term per module (its expected open fraction / mean KL), summed over modules: L_total = L_task + lambda_IB * L_IB (Eq. 8)"})
    target_keep_ratio: Optional[float | str] = field(default="auto", metadata={"help": "fraction of each module's directions left open at the end, reached by a Lagrange multiplier on the expected L0 (hard-concrete only); None = lambda_IB alone decides; 'auto' = 0.5 with gate='concrete' (the reproduction's setting), else None"})
    lagrangian_mu: float = field(default=10.0, metadata={"help": "mu of the augmented Lagrangian's quadratic term (mu/2)(s - rho)^2: pulls each module's open fraction back at once"})
    lagrangian_lr: float = field(default=0.05, metadata={"help": "eta of the multiplier's dual-ascent step lambda += eta (s - rho) per training step (eta << mu: slow integral action)"})
    target_ramp_steps: int = field(default=150, metadata={"help": "steps after the gate warm-up over which the target keep ratio falls linearly from 1 to target_keep_ratio (CoFi's schedule; without it the multipliers overshoot)"})
    gate_warmup_steps: int = field(default=30, metadata={"help": "training steps during which the gate logits are held (no gradient, no compression term) while B is still near 0"})
    gate_init: float = field(default=2.0, metadata={"help": "initial gate logit: log_alpha (concrete) or theta (gaussian, mu=sigmoid(theta)); large = open, so training starts near LoRA"})
    gate_temperature: float = field(default=2 / 3, metadata={"help": "hard-concrete temperature beta (Louizos et al. 2018)"})
    gate_sigma: float = field(default=0.5, metadata={"help": "Gaussian gate noise std sigma (m = mu + sigma eps); prior N(0, sigma^2) gives the KL mu^2 / (2 sigma^2) (E.2)"})
    gate_lr_multiplier: float = field(default=50.0, metadata={"help": "gate logits learn this much faster than the factors (they must travel ~5 units within a short run; the reproduction's 50x)"})
    filter_warmup_steps: int = field(default=50, metadata={"help": "training steps before a keep_ratio mask is enforced (all filters alike), so top-k-norm has norms to rank"})
    rescore_every: int = field(default=50, metadata={"help": "steps between re-scorings of the 'topk_norm' mask"})
    # ---- Stage 2: depth coordinator (Eq. 4-5, 7; appendix E.3-E.6) ----
    graph: Optional[str] = field(default="hybrid", metadata={"help": "depth graph per module family: 'adjacency' (chain), 'similarity' (gradient cosine), 'hybrid' (union) or None (no coordinator)"})
    gnn_steps: int = field(default=1, metadata={"help": "T residual message-passing steps (Table 6: 1 is best; large T oversmooths, E.6)"})
    coordinator: str = field(default="smoother", metadata={"help": "'smoother': M = I - eta L (Eq. 14-15, Theorem 1), acts from step 0; 'gains': zero-initialised scalar edge gains (the earlier reading, for the ablation)"})
    eta_init: float = field(default=0.5, metadata={"help": "initial eta as a fraction of eta_max = 1 / lambda_max(L) (smoother): strong enough to act at once, invertible"})
    learn_eta: bool = field(default=True, metadata={"help": "learn eta in its own optimizer group; False freezes it: the static-coupling control of E.5"})
    edge_corrections: bool = field(default=False, metadata={"help": "add learned, zero-initialised symmetric per-edge corrections C to M (the data-aware coupling of E.5)"})
    sim_rule: str = field(default="knn", metadata={"help": "similarity edges: 'knn' (each layer's sim_k highest-cosine non-adjacent layers) or 'threshold' (cosine > sim_threshold)"})
    sim_k: int = field(default=1, metadata={"help": "similarity neighbours per layer for sim_rule='knn' (symmetrised)"})
    sim_threshold: float = field(default=0.3, metadata={"help": "cosine of batch-summed dL/dW above which two layers get an edge (sim_rule='threshold' only)"})
    sim_ema: float = field(default=0.5, metadata={"help": "momentum of the moving average of the cosine estimates across refreshes (0 = latest estimate only)"})
    sim_refresh_every: int = field(default=50, metadata={"help": "K: steps between similarity-edge refreshes"})
    sim_batches: int = field(default=4, metadata={"help": "training batches summed into each gradient-similarity estimate"})
    sim_sketch_dim: int = field(default=64, metadata={"help": "p: random-projection width of the dL/dW sketch (memory O(L*d*p) per family; error ~ 1/sqrt(p))"})
    coordinator_lr_multiplier: float = field(default=10.0, metadata={"help": "learning-rate multiplier for the coordinator (theta of eta, edge corrections, or gains): one scalar per family must move O(1) in a run"})
    # ---- static alternatives (appendix C, Eq. 9-10) ----
    penalty: Optional[str] = field(default=None, metadata={"help": "static depth penalty: 'cos' (Eq. 9), 'laplacian' (Eq. 10) or None"})
    penalty_weight: float = field(default=0.0, metadata={"help": "lambda_cos / lambda_lap for the static penalty"})
    structlora_seed: int = field(default=0, metadata={"help": "seed of the random filter mask and the gradient sketch"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_keep_ratio == "auto":
            self.target_keep_ratio = AUTO_TARGET if self.gate == "concrete" else None
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if self.lora_bias:
            raise ValueError("lora_bias=True is not supported: StructLoRA gates and mixes the low-rank product B A only")
        for name in ("gnn_steps", "sim_refresh_every", "sim_batches", "sim_sketch_dim", "rescore_every", "sim_k",
                     "gate_warmup_steps", "filter_warmup_steps", "target_ramp_steps", "structlora_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} counts steps or items: it must be an int, got {value!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.filter not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {self.filter!r}")
        if self.filter == "ib" and self.gate is None and self.keep_ratio is not None:
            raise ValueError("filter='ib' with keep_ratio needs a gate ('concrete' or 'gaussian') to rank directions")
        if self.filter != "ib" and self.keep_ratio is None:
            raise ValueError(f"filter={self.filter!r} needs keep_ratio in (0, 1]")
        if self.keep_ratio is not None and not (0.0 < self.keep_ratio <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {self.graph!r}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        for name in ("gnn_steps", "sim_refresh_every", "sim_batches", "sim_sketch_dim", "rescore_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.filter_warmup_steps < 0:
            raise ValueError(f"filter_warmup_steps must be >= 0, got {self.filter_warmup_steps!r}")
        for name in ("lagrangian_mu", "lagrangian_lr", "lambda_ib", "penalty_weight", "gate_sigma", "gate_temperature", "gate_lr_multiplier", "coordinator_lr_multiplier"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.gate_sigma == 0 or self.gate_temperature == 0:
            raise ValueError("gate_sigma and gate_temperature must be > 0")
        if not -1.0 <= self.sim_threshold <= 1.0:
            raise ValueError(f"sim_threshold is a cosine in [-1, 1], got {self.sim_threshold!r}")
        if self.coordinator not in ("smoother", "gains"):
            raise ValueError(f"coordinator must be 'smoother' or 'gains', got {self.coordinator!r}")
        if self.sim_rule not in ("knn", "threshold"):
            raise ValueError(f"sim_rule must be 'knn' or 'threshold', got {self.sim_rule!r}")
        if not (isinstance(self.eta_init, (int, float)) and 0.0 < self.eta_init < 1.0):
            raise ValueError(f"eta_init is a fraction of eta_max in (0, 1), got {self.eta_init!r}")
        if not (isinstance(self.sim_ema, (int, float)) and 0.0 <= self.sim_ema < 1.0):
            raise ValueError(f"sim_ema must be in [0, 1), got {self.sim_ema!r}")
        if int(self.sim_k) < 1:
            raise ValueError(f"sim_k must be >= 1, got {self.sim_k!r}")
        if not isinstance(self.target_ramp_steps, int) or self.target_ramp_steps < 0:
            raise ValueError(f"target_ramp_steps must be an int >= 0, got {self.target_ramp_steps!r}")
        if self.gate_warmup_steps < 0:
            raise ValueError(f"gate_warmup_steps must be >= 0, got {self.gate_warmup_steps!r}")
        if self.target_keep_ratio is not None:
            if not (isinstance(self.target_keep_ratio, (int, float)) and 0.0 < self.target_keep_ratio <= 1.0):
                raise ValueError(f"target_keep_ratio must be in (0, 1], got {self.target_keep_ratio!r}")
            if self.gate != "concrete":
                raise ValueError("target_keep_ratio needs gate='concrete' (its expected L0 is the constraint)")
        if self.use_dora:
            raise ValueError("StructLoRA gates LoRA directions; use_dora=True is not supported")

    @property
    def keep_count(self) -> Optional[int]:
        """Directions kept per module under ``keep_ratio`` (ceil(rho * r)), or None."""
        return None if self.keep_ratio is None else max(1, math.ceil(self.keep_ratio * self.r))

    def to_json_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (sets become sorted lists, enums their string value)."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, set):
                value = sorted(value)
            elif isinstance(value, str):
                value = str(value)  # peft's PeftType / TaskType are str enums
            out[key] = value
        return out

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "StructLoraConfig":
        """Inverse of `to_json_dict`; keys that are not fields of this version are ignored."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_lora_config(self) -> LoraConfig:
        """The plain peft ``LoraConfig`` with the same LoRA fields (used to build the peft model)."""
        lora_fields = {f for f in LoraConfig.__dataclass_fields__ if LoraConfig.__dataclass_fields__[f].init}
        kwargs = {k: getattr(self, k) for k in lora_fields if hasattr(self, k)}
        return LoraConfig(**kwargs)

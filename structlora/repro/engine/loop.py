"""The training loop (`train`): batches, forward/backward over micro-batches and processes, the optimizer
step, periodic evaluation with best-state selection and checkpoints, then the test metrics of the best
state. Where the run stands (step, history, best state, cost of earlier sessions) is one `RunProgress`,
which a checkpoint carries across sessions. The protocol is described in `structlora.repro.engine`."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .batches import (CLS_KINDS, MC_KIND, batch_indices, collate, micro_batches, pad_token_id, take_rows,
                      training_columns)
from .checkpoint import CKPT_NAME, load_checkpoint, save_checkpoint
from .config import AUTOCAST_DTYPES, TrainConfig, TrainResult, config_dict
from .distributed import GradSync, ProcessGroup, move_to
from .divergence import check_params_finite, check_step_finite
from .evaluation import evaluate, logits_of
from .memory import PeakMemory
from .regime import autocast, training_regime
from .state import (capture_state, load_trainable_state, resumable_controller, seed_everything, set_capture_state,
                    set_rng_state, trainable_state)

__all__ = ["RunProgress", "train"]

log = logging.getLogger(__name__)


def _no_prior_cost() -> dict[str, Any]:
    return {"train_time_s": 0.0, "eval_time_s": 0.0, "train_steps": 0, "peak_mem_mb": 0.0, "sessions": 0,
            "cost_partial": False}


@dataclass
class RunProgress:
    """Where a run stands: what its checkpoint carries from earlier sessions (step, history, best state,
    their wall time and cost) and this session's counters (times, steps, the loss since the last evaluation)."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_step: int = 0
    best_val: dict[str, float] = field(default_factory=dict)
    best_score: float | None = None
    prior_wall: float = 0.0                     # wall time of earlier sessions
    resumed_from: int | None = None
    prior: dict[str, Any] = field(default_factory=_no_prior_cost)   # the cost of earlier sessions
    train_time: float = 0.0                     # this session: seconds in optimizer steps
    eval_time: float = 0.0                      # this session: seconds in evaluations
    steps: int = 0                              # this session: optimizer steps
    window_loss: float = 0.0                    # summed step losses since the last evaluation
    window_n: int = 0
    ema: float | None = None                    # the progress bar's running loss

    def resume(self, ck: Mapping[str, Any]) -> None:
        """Take over where checkpoint ``ck`` stopped."""
        self.prior.update(ck.get("cost") or {"cost_partial": True})
        self.step, self.history, self.best_state = ck["step"], ck["history"], ck["best_state"]
        self.best_step, self.best_val, self.best_score = ck["best_step"], ck["best_val"], ck["best_score"]
        self.prior_wall, self.resumed_from = ck["wall_time_s"], ck["step"]

    def add_loss(self, value: float) -> None:
        """Count the mean loss ``value`` of the step just done (the window's mean, the bar's running loss)."""
        self.window_loss, self.window_n = self.window_loss + value, self.window_n + 1
        self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value

    def add_evaluation(self, val: dict[str, float], score: float, lr: float, greater: bool,
                       model: nn.Module) -> None:
        """Log an evaluation (``val``: the validation metrics) and keep the model's state when it is the best."""
        entry = {"step": self.step, "loss": self.window_loss / max(self.window_n, 1), "lr": lr}
        entry.update({f"val_{k}": v for k, v in val.items()})
        self.history.append(entry)
        self.window_loss, self.window_n = 0.0, 0
        if not val or _better(score, self.best_score, greater):
            self.best_state, self.best_step, self.best_val = trainable_state(model), self.step, val
            self.best_score = score if val else None

    def cost(self, peak_mb: float) -> dict[str, Any]:
        """The cost of every session so far (what a checkpoint stores)."""
        p = self.prior
        return {"train_time_s": p["train_time_s"] + self.train_time, "eval_time_s": p["eval_time_s"] + self.eval_time,
                "train_steps": p["train_steps"] + self.steps, "peak_mem_mb": max(p["peak_mem_mb"], peak_mb),
                "sessions": p["sessions"] + 1, "cost_partial": p["cost_partial"]}


def _task_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    outputs = model(**batch)
    loss = getattr(outputs, "loss", None)
    if loss is None:  # models that do not compute their own loss: plain cross-entropy
        logits = logits_of(outputs)
        loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
    return loss


def _better(score: float, best: float | None, greater: bool) -> bool:
    if math.isnan(score):
        return best is None
    if best is None or math.isnan(best):
        return True
    return score > best if greater else score < best


def _backward(model: nn.Module, train_ds: Any, rows: Any, mine: list[Any], kind: str, pad_id: int,
              dist: ProcessGroup, autocast_dtype: torch.dtype | None, extra: Any) -> torch.Tensor:
    """Forward and backward of this process's micro-batches (``mine``: positions in ``rows``, the global
    batch); each micro-batch loss is weighted by its share of the global batch. Returns this process's
    part of the step's loss (a float64 scalar)."""
    step_loss = torch.zeros((), dtype=torch.float64, device=dist.device)
    for chunk in mine:
        batch = {k: v.to(dist.device) for k, v in collate(kind, take_rows(train_ds, rows[chunk]), pad_id).items()}
        with autocast(dist.device, autocast_dtype):
            loss = _task_loss(model, batch).float()
        if extra is not None:
            loss = loss + extra()
        weight = len(chunk) * dist.world / len(rows)
        (loss * weight).backward()
        step_loss += loss.detach().double() * weight
    return step_loss


def _restore(ck: Mapping[str, Any], handle: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, dist: ProcessGroup) -> None:
    """Put the model, optimizer, scheduler, this rank's RNGs, the method's controller and the capture
    state back as checkpoint ``ck`` holds them."""
    load_trainable_state(model, ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    rng = ck["rng"][dist.rank] if len(ck["rng"]) == dist.world else ck["rng"][0]
    set_rng_state(rng)
    ctl = resumable_controller(handle)
    if ctl is not None and ck.get("controller") is not None:
        ctl.load_state_dict(ck["controller"])
    set_capture_state(model, ck.get("capture"))


def train(handle: Any, task: Any, encoded: Mapping[str, Any], cfg: TrainConfig, tokenizer: Any | None = None,
          checkpoint_dir: str | Path | None = None, progress: bool = True, progress_leave: bool = True,
          desc: str | None = None, run_id: str | None = None) -> TrainResult:
    """Fine-tune ``handle.model`` on ``encoded["train"]`` and report test metrics at the best validation step.

    ``handle`` is a ``structlora.repro.methods.MethodHandle`` (``model``; optional ``extra_loss()`` added to
    the task loss, ``on_step(step, total)`` called after every optimizer and scheduler step, while the
    step's averaged gradients are still in ``.grad``; ``build_optimizer(lr, weight_decay, betas=...)``, the
    one optimizer policy of every method).
    ``task`` supplies ``kind``, ``metric`` and ``compute_metrics``. The selection metric is
    ``task.metric``, higher is better unless ``task.greater_is_better`` is False. Evaluation happens
    every ``cfg.eval_every`` steps (``<= 0``: only at the end) and after the last step.
    ``progress`` shows one tqdm bar (main process only) with the running loss. ``run_id`` ties the
    checkpoint to one run (a checkpoint of another run is discarded, see `structlora.repro.engine`).
    Raises ``DivergedError`` at the first non-finite loss, gradient or parameter.
    """
    kind = task.kind
    if kind not in CLS_KINDS + (MC_KIND,):
        raise ValueError(f"unknown task kind {kind!r}; expected one of {CLS_KINDS + (MC_KIND,)}")
    if "train" not in encoded or len(encoded["train"]) == 0:
        raise ValueError("encoded['train'] is missing or empty")
    t_start = time.perf_counter()
    dist = ProcessGroup()
    micro_parts = dist.world * cfg.grad_accum
    train_ds = training_columns(kind, encoded["train"])
    if min(cfg.batch_size, len(train_ds)) < micro_parts:
        raise ValueError(f"a batch of {min(cfg.batch_size, len(train_ds))} rows cannot be split over "
                         f"{dist.world} process(es) x grad_accum={cfg.grad_accum}")
    val_ds = encoded.get("validation") if hasattr(encoded, "get") else None
    test_ds = encoded.get("test") if hasattr(encoded, "get") else None
    if val_ds is None or len(val_ds) == 0:
        log.warning("no validation split: the last step is reported as the best step")

    model: nn.Module = handle.model
    move_to(model, dist.device)
    model.train()
    regime = training_regime(model, cfg, dist.device)
    autocast_dtype = AUTOCAST_DTYPES[regime["precision"]]
    pad_id = pad_token_id(tokenizer, model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"method {getattr(handle, 'name', '?')!r}: the model has no trainable parameter")
    params = [p for _, p in named]
    seed_everything(cfg.seed)
    with torch.no_grad():  # identical start on every rank (the frozen base weights load deterministically)
        for p in params:
            dist.broadcast_(p.data)
    optimizer = handle.build_optimizer(cfg.lr, cfg.weight_decay, betas=cfg.betas)  # the one optimizer policy
    if cfg.grad_accum > 1 and hasattr(model, "attach_optimizer"):
        # StructLoRA counts its schedules in optimizer steps, not micro-batches (with grad_accum = 1
        # the two coincide; the committed records were trained that way and keep their numerics)
        model.attach_optimizer(optimizer)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    sync = GradSync(params, dist)
    greater = bool(getattr(task, "greater_is_better", True))
    metric = task.metric

    run = RunProgress()
    ckpt_path = Path(checkpoint_dir) / CKPT_NAME if checkpoint_dir is not None else None
    ck = load_checkpoint(ckpt_path, cfg, dist, run_id) if ckpt_path is not None else None
    if ck is not None:
        _restore(ck, handle, model, optimizer, scheduler, dist)
        run.resume(ck)
        log.info("resuming from %s at step %d", ckpt_path, run.step)

    mem = PeakMemory(dist.device)
    mem.start()
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not (progress and dist.is_main), leave=progress_leave,
               desc=desc or f"{getattr(handle, 'name', 'train')}/{getattr(task, 'name', kind)}",
               mininterval=2.0, dynamic_ncols=True)
    extra = getattr(handle, "extra_loss", None)
    on_step = getattr(handle, "on_step", None)
    try:
        while run.step < cfg.max_steps:
            t0 = time.perf_counter()
            rows = batch_indices(len(train_ds), cfg.batch_size, cfg.seed, run.step)
            chunks = micro_batches(len(rows), micro_parts)
            mine = chunks[dist.rank * cfg.grad_accum:(dist.rank + 1) * cfg.grad_accum]
            optimizer.zero_grad(set_to_none=True)
            step_loss = _backward(model, train_ds, rows, mine, kind, pad_id, dist, autocast_dtype, extra)
            sync()
            step_loss = dist.mean_(step_loss)
            check_step_finite(run.step + 1, step_loss, named, run.history)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            run.step += 1
            run.steps += 1
            if on_step is not None:
                on_step(run.step, cfg.max_steps)
            check_params_finite(run.step, named, run.history)
            run.add_loss(float(step_loss))
            bar.set_postfix(loss=f"{run.ema:.4f}", refresh=False)
            bar.update(1)
            run.train_time += time.perf_counter() - t0

            if run.step == cfg.max_steps or (cfg.eval_every > 0 and run.step % cfg.eval_every == 0):
                t1 = time.perf_counter()
                val = evaluate(model, task, val_ds, cfg.eval_batch_size, pad_id, tokenizer,
                               cfg.max_eval_examples, _dist=dist) if val_ds is not None else {}
                score = val.get(metric, float("nan")) if val else float("nan")
                if val and metric not in val:
                    raise KeyError(f"task {getattr(task, 'name', '?')!r}: compute_metrics returned "
                                   f"{sorted(val)}, not the selection metric {metric!r}")
                run.add_evaluation(val, score, float(scheduler.get_last_lr()[0]), greater, model)
                run.eval_time += time.perf_counter() - t1
                if val:
                    bar.set_postfix(loss=f"{run.ema:.4f}", **{f"val_{metric}": f"{score:.4f}"}, refresh=False)
                if ckpt_path is not None:
                    ctl = resumable_controller(handle)
                    save_checkpoint(ckpt_path, dist, cfg, run.step, model, optimizer, scheduler, run.history,
                                    run.best_state, run.best_step, run.best_val, run.best_score,
                                    run.prior_wall + time.perf_counter() - t_start,
                                    ctl.state_dict() if ctl is not None else None,
                                    run_id=run_id, cost=run.cost(mem.peak_mb()), capture=capture_state(model))
    finally:
        bar.close()

    if run.best_state is not None:
        load_trainable_state(model, run.best_state)
    t1 = time.perf_counter()
    fingerprint: dict[str, Any] = {}
    test = evaluate(model, task, test_ds, cfg.eval_batch_size, pad_id, tokenizer, cfg.max_eval_examples,
                    _dist=dist, fingerprint=fingerprint) if test_ds is not None else {}
    run.eval_time += time.perf_counter() - t1
    prior = run.prior
    wall = run.prior_wall + time.perf_counter() - t_start
    total_train = prior["train_time_s"] + run.train_time
    total_steps = int(prior["train_steps"]) + run.steps
    return TrainResult(
        best_step=run.best_step, val_metrics=dict(run.best_val), test_metrics=test, history=run.history,
        wall_time_s=wall, peak_mem_mb=max(float(prior["peak_mem_mb"]), mem.peak_mb()),
        steps_per_s=total_steps / total_train if total_train > 0 else 0.0,
        peak_mem_kind=mem.kind, train_time_s=total_train, eval_time_s=prior["eval_time_s"] + run.eval_time,
        resumed_from=run.resumed_from, train_steps=total_steps, sessions=int(prior["sessions"]) + 1,
        cost_partial=bool(prior["cost_partial"]) or total_steps != run.step,
        world_size=dist.world, metric=metric, config=config_dict(cfg),
        regime=regime if cfg.precision != "fp32" or cfg.gradient_checkpointing else {},
        test_predictions_sha256=fingerprint.get("sha256"), test_predictions=fingerprint.get("predictions"))

"""One training path for every method and task: the paper's protocol (appendix A).

``train(handle, task, encoded, cfg)`` fine-tunes ``handle.model`` with AdamW (betas 0.9/0.999, weight
decay 0.01), a cosine schedule with 6% linear warm-up (``transformers.get_cosine_schedule_with_warmup``),
evaluates on the validation split every ``cfg.eval_every`` optimizer steps and at the end, keeps the
best-validation *trainable* state in memory and reports the TEST metrics of that state.

Task kinds (``task.kind``):

* ``"seq-cls"`` / ``"image-cls"``: the model's own ``outputs.loss``; predictions are ``argmax(logits)``
  (the raw score when there is a single output, i.e. regression); metrics by ``task.compute_metrics``.
* ``"multiple-choice"`` (causal LM): training uses the SFT loss on ``input_ids``/``labels``; evaluation
  scores every option as lm-evaluation-harness does, by the summed log-probability of its continuation
  tokens given the prompt, and predicts the argmax (``accuracy``). ``acc_norm`` divides each score by the
  continuation length: its decoded character length when a tokenizer is given (as the harness does),
  else its token count.

Data order, multi-process training and resumption
-------------------------------------------------
The engine draws batches itself (no DataLoader): epoch ``e`` visits the training rows in the order
``numpy.random.default_rng([seed, e]).permutation(n)``, in global batches of ``cfg.batch_size`` rows
(an incomplete last batch is dropped, unless the split is smaller than one batch). ``batch_size`` is the
*effective* batch per optimizer step: it is split into ``world_size * grad_accum`` micro-batches, and
each micro-batch loss is weighted by its share of the batch, so a step is the gradient of the mean loss
over the whole batch whatever the number of processes (exactly so for per-example losses; for the
token-mean SFT loss, each micro-batch mean is weighted by its number of examples, as HF does).

Several processes (``torchrun``/``accelerate launch``; gloo on CPU) are driven by an
``accelerate.Accelerator`` for the process group and the device. After the backward passes the
trainable gradients are averaged over processes with ONE all-reduce of a flat buffer, which is what
DDP computes, but also covers parameters that a method touches outside ``forward`` (``extra_loss``) or
leaves without a gradient on a step. Trainable parameters are broadcast from rank 0 at the start.

With ``checkpoint_dir`` the engine writes ``checkpoint_dir/state.pt`` after every evaluation (trainable
parameters and all buffers, optimizer, scheduler, every rank's RNG states, step, history and the best
state so far), atomically (temporary file + ``os.replace``), and resumes from it when it exists. The
same seed gives the same numbers on CPU, and an interrupted run resumed from its checkpoint ends with
the same parameters as an uninterrupted one. State a method keeps outside parameters, buffers and the
optimizer is checkpointed only when ``handle.controller`` offers ``state_dict()`` / ``load_state_dict()``
(otherwise, e.g. an importance estimate kept in Python, a resumed run restarts it from its built state).
The similarity-capture state of a model with ``families`` (``structlora.model.StructLoraModel``:
``capturing``, ``captured``, ``sketches`` of each family) is checkpointed too, so a run killed inside a
capture window resumes exactly.

A checkpoint is tied to its run: ``train(..., run_id=...)`` stores ``run_id`` (the grid passes the
spec key) and the configuration; a checkpoint that cannot be read, has another format, another
``run_id`` or another configuration is reported with a warning naming its path, deleted, and the run
starts afresh. The cost of a resumed run covers all its processes: training time and timed steps are
summed over sessions through the checkpoint and ``peak_mem_mb`` is the maximum over sessions
(``cost_partial`` is True only when a checkpoint did not carry them).

Divergence
----------
Every optimizer step checks that the loss and every trainable gradient are finite (before clipping)
and, after the step and ``on_step``, every trainable parameter; the first non-finite value raises
``DivergedError`` naming the step and the parameter (``history`` so far attached). Finite-ness is
checked with one device synchronisation per step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .._io import atomic_write

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "collate",
    "score_choices",
    "batch_indices",
    "training_batches",
    "pad_token_id",
    "trainable_state",
    "load_trainable_state",
    "PeakMemory",
    "DivergedError",
]

log = logging.getLogger(__name__)

_CLS_KINDS = ("seq-cls", "image-cls")
_MC_KIND = "multiple-choice"
_CKPT_NAME = "state.pt"
_CKPT_FORMAT = 2  # 2: run_id, cumulative cost, similarity-capture state
# Fields that must agree between a checkpoint and the run resuming from it.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
"""``TrainConfig.precision``: the dtype of the training forward's ``torch.autocast`` (fp32: none). bf16
only: fp16 autocast would need a gradient scaler."""
# fields added after records were written: left out of the stored configuration at their default
_NEW_DEFAULTS: dict[str, Any] = {"precision": "fp32", "gradient_checkpointing": False}
_RESUME_KEYS = ("lr", "batch_size", "max_steps", "eval_every", "warmup_ratio", "weight_decay", "seed",
                "grad_accum", "max_grad_norm", "betas")


# --------------------------------------------------------------------------------------------- config
def _check_real(name: str, value: Any) -> None:
    """``value`` is a finite real number (not a bool), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    """``value`` is an int (not a bool) >= ``minimum`` (when given), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"TrainConfig.{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"TrainConfig.{name} must be >= {minimum}, got {value!r}")


class DivergedError(FloatingPointError):
    """A non-finite loss, gradient or parameter stopped training.

    ``step`` is the optimizer step (1-based) at which it was found, ``quantity`` one of ``"loss"``,
    ``"gradient"``, ``"parameter"``, ``name`` the parameter's name (None for the loss) and ``history``
    the evaluations before it.
    """

    def __init__(self, step: int, quantity: str, name: str | None, history: list[dict[str, float]] | None = None,
                 value: float | None = None) -> None:
        where = f" of {name!r}" if name else ""
        shown = f" ({value})" if value is not None else ""
        super().__init__(f"diverged at step {step}: non-finite {quantity}{where}{shown}")
        self.step, self.quantity, self.name = step, quantity, name
        self.history = list(history or [])


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    ``batch_size`` is the effective batch per optimizer step (over all processes and accumulation
    micro-batches). ``max_grad_norm`` (``None`` disables clipping) follows the HF Trainer default of 1.0;
    the paper does not state one. ``max_eval_examples`` evaluates validation AND test on the same fixed
    random subset (drawn with seed 0, independent of ``seed``, so that all methods and seeds of a grid
    are scored on identical examples).
    """

    lr: float = 5e-4
    batch_size: int = 32
    max_steps: int = 200
    eval_every: int = 50
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    seed: int = 0
    grad_accum: int = 1
    eval_batch_size: int = 64
    max_eval_examples: int | None = None
    max_grad_norm: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    precision: str = "fp32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"TrainConfig.precision must be one of {tuple(AUTOCAST_DTYPES)}, got {self.precision!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"TrainConfig.gradient_checkpointing must be a bool, got {self.gradient_checkpointing!r}")
        for name in ("lr", "warmup_ratio", "weight_decay"):
            _check_real(name, getattr(self, name))
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        for name in ("batch_size", "max_steps", "grad_accum", "eval_batch_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        _check_int("eval_every", self.eval_every, None)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_eval_examples is not None:
            _check_int("max_eval_examples", self.max_eval_examples, 1)
        if self.max_grad_norm is not None:
            _check_real("max_grad_norm", self.max_grad_norm)
            if self.max_grad_norm <= 0:
                raise ValueError(f"TrainConfig.max_grad_norm must be None or > 0, got {self.max_grad_norm}")
        if len(tuple(self.betas)) != 2:
            raise ValueError(f"TrainConfig.betas must be two numbers, got {self.betas!r}")
        for b in self.betas:
            _check_real("betas", b)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

    @property
    def warmup_steps(self) -> int:
        """Number of linear warm-up steps: ``ceil(warmup_ratio * max_steps)`` (as HF Trainer)."""
        return math.ceil(self.warmup_ratio * self.max_steps)


@dataclass
class TrainResult:
    """Outcome of ``train``. The model in ``handle.model`` holds the best-validation state afterwards.

    ``history`` has one dict per evaluation: ``step``, ``loss`` (mean training loss since the previous
    evaluation), ``lr`` and ``val_<metric>`` for every validation metric. ``wall_time_s`` is the whole
    run (summed over resumed sessions), ``steps_per_s`` the optimizer steps over their training time
    (evaluations excluded), both summed over all sessions of a resumed run (``train_steps``,
    ``train_time_s``, ``eval_time_s``); ``peak_mem_mb`` (described by ``peak_mem_kind``, see
    ``PeakMemory``) is the maximum over sessions. ``sessions`` counts the processes that worked on the
    run; ``cost_partial`` is True when some session's cost is unknown (a checkpoint without it).
    """

    best_step: int
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    history: list[dict[str, float]]
    wall_time_s: float
    peak_mem_mb: float
    steps_per_s: float
    peak_mem_kind: str = ""
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    resumed_from: int | None = None
    train_steps: int = 0
    sessions: int = 1
    cost_partial: bool = False
    world_size: int = 1
    metric: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    regime: dict[str, Any] = field(default_factory=dict)   # what training used (`training_regime`)
    test_predictions_sha256: str | None = None   # the manipulation check: equal hashes = same predictions
    test_predictions: list[int] | None = None    # class index per test example, in test order (later analyses)


# --------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a code region, in MiB.

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor memory of the
      caching allocator; kind ``"cuda_max_allocated"``).
    * CPU (Linux): the process's peak resident set size (``VmHWM``), reset at the start of the region by
      writing ``5`` to ``/proc/self/clear_refs`` (kind ``"cpu_peak_rss"``). It includes everything the
      process holds (Python, libraries, the model, the data), not only tensors.
    * Elsewhere: ``resource.getrusage`` max RSS over the whole process lifetime
      (kind ``"cpu_peak_rss_lifetime"``), an upper bound of the region's peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = ""

    def start(self) -> None:
        """Reset the peak counter where possible."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "cpu_peak_rss"
        except OSError:
            self.kind = "cpu_peak_rss_lifetime"

    def peak_mb(self) -> float:
        """Peak since ``start`` (see the class docstring for what is measured)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "cpu_peak_rss":
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) / 1024.0  # kB -> MiB
            except OSError:
                pass
            self.kind = "cpu_peak_rss_lifetime"
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, kB on Linux


# --------------------------------------------------------------------------------------------- process group
class _Dist:
    """Rank, world size and the few collectives the loop needs (no-ops in a single process)."""

    def __init__(self) -> None:
        from accelerate import Accelerator

        # cpu=True is what makes accelerate set up gloo for a CPU-only torchrun/accelerate launch.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device: torch.device = self.accelerator.device
        self.world: int = self.accelerator.num_processes
        self.rank: int = self.accelerator.process_index
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world, self.rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        self.is_main: bool = self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(t)
            t /= self.world
        return t

    def broadcast_(self, t: torch.Tensor) -> None:
        if self.active:
            torch.distributed.broadcast(t, src=0)

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


# --------------------------------------------------------------------------------------------- batches
def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Row indices of the global batch of optimizer step ``step`` (0-based).

    Epoch ``e`` is the permutation ``default_rng([seed, e]).permutation(n)`` cut into ``n // batch_size``
    full batches (the remainder is dropped); a split smaller than one batch is one batch per epoch.
    Stateless, so a resumed run draws exactly the batches the uninterrupted one would have.
    """
    if n < 1:
        raise ValueError("the training split is empty")
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size:(k + 1) * batch_size]


def _pad(seqs: Sequence[Sequence[int]], value: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.as_tensor(s, dtype=dtype)
    return out


def _stack(values: Any) -> torch.Tensor:
    """A batch column (tensor, list of tensors, or nested lists/arrays) as one tensor."""
    if isinstance(values, torch.Tensor):
        return values
    if len(values) and isinstance(values[0], torch.Tensor):
        return torch.stack(list(values))
    return torch.as_tensor(np.asarray(values))


def collate(kind: str, columns: Mapping[str, Sequence[Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Turn a column batch (``dataset[indices]``) into model inputs, padding dynamically to the longest row.

    * ``seq-cls``: ``input_ids`` (padded with ``pad_id``), ``attention_mask`` (0 on padding),
      ``token_type_ids`` when present (0 on padding), ``labels``. This is what
      ``transformers.DataCollatorWithPadding`` does for right padding, without needing a tokenizer.
    * ``multiple-choice`` (training): ``input_ids``, ``attention_mask``, ``labels`` padded with -100.
    * ``image-cls``: stacked ``pixel_values`` (float32) and ``labels``.
    """
    if kind == "image-cls":
        return {"pixel_values": _stack(columns["pixel_values"]).float(), "labels": _stack(columns["labels"]).long()}
    if kind not in ("seq-cls", _MC_KIND):
        raise ValueError(f"unknown task kind {kind!r}; expected one of {_CLS_KINDS + (_MC_KIND,)}")
    ids = columns["input_ids"]
    out = {"input_ids": _pad(ids, pad_id)}
    if "attention_mask" in columns and kind == "seq-cls":
        out["attention_mask"] = _pad(columns["attention_mask"], 0)
    else:
        out["attention_mask"] = _pad([[1] * len(s) for s in ids], 0)
    if kind == "seq-cls":
        if "token_type_ids" in columns:
            out["token_type_ids"] = _pad(columns["token_type_ids"], 0)
        out["labels"] = torch.as_tensor(np.asarray(columns["labels"]))
    else:
        out["labels"] = _pad(columns["labels"], -100)
    return out


def training_batches(kind: str, dataset: Any, batch_size: int, seed: int, n: int, pad_id: int = 0
                     ) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` collated global training batches that ``train`` draws with this seed (CPU tensors),
    e.g. calibration batches for methods that look at data before training."""
    return [collate(kind, _columns(dataset, batch_indices(len(dataset), batch_size, seed, s)), pad_id)
            for s in range(n)]


def _columns(ds: Any, indices: Sequence[int]) -> dict[str, list[Any]]:
    return ds[[int(i) for i in indices]]


def _eval_subset(ds: Any, max_examples: int | None) -> Any:
    """The fixed seed-0 random subset of ``max_examples`` rows (kept in original order), or ``ds``."""
    if ds is None or max_examples is None or len(ds) <= max_examples:
        return ds
    keep = np.sort(np.random.default_rng(0).choice(len(ds), size=max_examples, replace=False))
    return ds.select(keep.tolist())


# --------------------------------------------------------------------------------------------- state
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters and of ALL buffers (gate masks, norm statistics, ...)."""
    state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    state.update({f"buffer:{n}": b.detach().to("cpu", copy=True)
                  for n, b in model.named_buffers() if b is not None})
    return state


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a ``trainable_state`` back into ``model`` in place (unknown names are an error)."""
    params = dict(model.named_parameters())
    buffers = {n: b for n, b in model.named_buffers() if b is not None}
    for name, value in state.items():
        if name.startswith("buffer:"):
            target = buffers.get(name[len("buffer:"):])
        else:
            target = params.get(name)
        if target is None:
            raise KeyError(f"checkpointed tensor {name!r} does not exist in the model")
        target.copy_(value.to(target.device, target.dtype))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------------------------- evaluation
def _unwrap_logits(outputs: Any) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


@torch.no_grad()
def score_choices(model: nn.Module, choice_input_ids: Sequence[Sequence[Sequence[int]]],
                  choice_starts: Sequence[Sequence[int]], batch_size: int = 64, pad_id: int = 0,
                  device: torch.device | str | None = None) -> list[np.ndarray]:
    """Summed continuation log-probabilities of every option, as lm-evaluation-harness computes them.

    ``choice_input_ids[i][j]`` is prompt + option ``j`` of example ``i`` and ``choice_starts[i][j]`` the
    index of the option's first token; the score is ``sum_t log p(x_t | x_<t)`` over ``t >= start``.
    Sequences are right-padded (causal attention makes the padding invisible to the real tokens) and run
    longest-first in batches of ``batch_size`` sequences. When every option of every example is a single
    token following the same prompt, one forward per prompt is enough and is used.
    Returns one float64 array (n_options,) per example.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if _single_token_choices(choice_input_ids, choice_starts):
            return _score_single_token(model, choice_input_ids, choice_starts, batch_size, pad_id, device)
        flat = [(i, j) for i, opts in enumerate(choice_input_ids) for j in range(len(opts))]
        for i, j in flat:
            start, length = choice_starts[i][j], len(choice_input_ids[i][j])
            if not 1 <= start < length:
                raise ValueError(f"example {i} option {j}: choice start {start} must be in [1, {length})")
        flat.sort(key=lambda ij: -len(choice_input_ids[ij[0]][ij[1]]))
        scores = [np.zeros(len(opts), dtype=np.float64) for opts in choice_input_ids]
        for b in range(0, len(flat), batch_size):
            chunk = flat[b:b + batch_size]
            seqs = [list(choice_input_ids[i][j]) for i, j in chunk]
            ids = _pad(seqs, pad_id).to(device)
            mask = _pad([[1] * len(s) for s in seqs], 0).to(device)
            logits = _unwrap_logits(model(input_ids=ids, attention_mask=mask))
            for row, ((i, j), seq) in enumerate(zip(chunk, seqs)):
                start = choice_starts[i][j]
                lp = logits[row, start - 1:len(seq) - 1].float().log_softmax(-1)
                target = ids[row, start:len(seq)]
                scores[i][j] = lp.gather(-1, target[:, None]).sum().item()
        return scores
    finally:
        model.train(was_training)


def _single_token_choices(choice_input_ids: Sequence[Sequence[Sequence[int]]],
                          choice_starts: Sequence[Sequence[int]]) -> bool:
    for opts, starts in zip(choice_input_ids, choice_starts):
        if not opts:
            return False
        prompt = list(opts[0][: starts[0]])
        for seq, start in zip(opts, starts):
            if len(seq) - start != 1 or start < 1 or list(seq[:start]) != prompt:
                return False
    return True


def _score_single_token(model: nn.Module, choice_input_ids: Sequence[Sequence[Sequence[int]]],
                        choice_starts: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                        device: torch.device) -> list[np.ndarray]:
    prompts = [list(opts[0][: starts[0]]) for opts, starts in zip(choice_input_ids, choice_starts)]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    scores: list[np.ndarray] = [np.zeros(0)] * len(prompts)
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        seqs = [prompts[i] for i in chunk]
        ids = _pad(seqs, pad_id).to(device)
        mask = _pad([[1] * len(s) for s in seqs], 0).to(device)
        logits = _unwrap_logits(model(input_ids=ids, attention_mask=mask))
        for row, i in enumerate(chunk):
            lp = logits[row, len(prompts[i]) - 1].float().log_softmax(-1)
            tokens = torch.as_tensor([seq[-1] for seq in choice_input_ids[i]], device=lp.device)
            scores[i] = lp[tokens].double().cpu().numpy()
    return scores


def _choice_lengths(columns: Mapping[str, Sequence[Any]], tokenizer: Any | None) -> list[np.ndarray]:
    """Continuation length of each option: decoded characters with a tokenizer, else tokens."""
    out = []
    for opts, starts in zip(columns["choice_input_ids"], columns["choice_starts"]):
        if tokenizer is not None:
            lens = [len(tokenizer.decode(list(seq[s:]))) for seq, s in zip(opts, starts)]
        else:
            lens = [len(seq) - s for seq, s in zip(opts, starts)]
        out.append(np.maximum(np.asarray(lens, dtype=np.float64), 1.0))
    return out


@torch.no_grad()
def _predict(model: nn.Module, task: Any, ds: Any, rows: Sequence[int], batch_size: int, pad_id: int,
             device: torch.device, tokenizer: Any | None) -> dict[str, Any]:
    """Predictions for ``rows`` of ``ds`` on this process (one entry per row, same order)."""
    kind = task.kind
    preds: list[Any] = []
    preds_norm: list[int] = []
    refs: list[Any] = []
    for b in range(0, len(rows), batch_size):
        cols = _columns(ds, rows[b:b + batch_size])
        if kind == _MC_KIND:
            scores = score_choices(model, cols["choice_input_ids"], cols["choice_starts"],
                                   batch_size=batch_size, pad_id=pad_id, device=device)
            lengths = _choice_lengths(cols, tokenizer)
            preds += [int(np.argmax(s)) for s in scores]
            preds_norm += [int(np.argmax(s / n)) for s, n in zip(scores, lengths)]
            refs += list(cols["label"])
        else:
            batch = {k: v.to(device) for k, v in collate(kind, cols, pad_id).items()}
            labels = batch.pop("labels")
            logits = _unwrap_logits(model(**batch)).float()
            pred = logits[..., 0] if logits.shape[-1] == 1 else logits.argmax(-1)
            preds += pred.cpu().tolist()
            refs += labels.cpu().tolist()
    return {"rows": list(rows), "preds": preds, "preds_norm": preds_norm, "refs": refs}


def evaluate(model: nn.Module, task: Any, dataset: Any, batch_size: int = 64, pad_id: int | None = None,
             tokenizer: Any | None = None, max_examples: int | None = None,
             _dist: _Dist | None = None, fingerprint: dict[str, Any] | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset`` (an encoded split of ``task``), computed by ``task.compute_metrics``.

    Classification: argmax predictions. Multiple choice: summed-log-prob scoring (``score_choices``),
    ``accuracy`` from ``task.compute_metrics`` plus ``acc_norm``. Under several processes each rank
    scores a strided shard and the predictions are gathered, so every rank returns the same metrics.
    ``pad_id`` defaults to ``pad_token_id(tokenizer, model)``; ``max_examples`` evaluates the fixed
    seed-0 subset that ``train`` uses. ``fingerprint`` (a dict) receives ``"sha256"`` of the predictions
    in example order: two runs with equal fingerprints predicted exactly the same (the manipulation
    check of the claims, `stats.identical_arms`), and ``"predictions"``, the predictions themselves.
    """
    if dataset is None or len(dataset) == 0:
        return {}
    if pad_id is None:
        pad_id = pad_token_id(tokenizer, model)
    dataset = _eval_subset(dataset, max_examples)
    dist = _dist if _dist is not None else None
    world, rank = (dist.world, dist.rank) if dist is not None and dist.active else (1, 0)
    device = dist.device if dist is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        local = _predict(model, task, dataset, list(range(rank, len(dataset), world)), batch_size, pad_id,
                         device, tokenizer)
    finally:
        model.train(was_training)
    parts = dist.gather_objects(local) if dist is not None else [local]
    n = len(dataset)
    preds: list[Any] = [None] * n
    preds_norm: list[Any] = [None] * n
    refs: list[Any] = [None] * n
    for part in parts:
        for k, row in enumerate(part["rows"]):
            preds[row], refs[row] = part["preds"][k], part["refs"][k]
            if part["preds_norm"]:
                preds_norm[row] = part["preds_norm"][k]
    if fingerprint is not None:
        fingerprint["sha256"] = hashlib.sha256(json.dumps(np.asarray(preds).tolist()).encode()).hexdigest()
        fingerprint["predictions"] = np.asarray(preds).tolist()
    metrics = {k: float(v) for k, v in task.compute_metrics(np.asarray(preds), np.asarray(refs)).items()}
    if task.kind == _MC_KIND:
        metrics["acc_norm"] = float(np.mean(np.asarray(preds_norm) == np.asarray(refs)))
    return metrics


# --------------------------------------------------------------------------------------------- training
def pad_token_id(tokenizer: Any | None, model: nn.Module | None = None) -> int:
    """Padding id: the tokenizer's pad token, else the model config's, else EOS, else 0."""
    for source in (tokenizer, getattr(model, "config", None)):
        pid = getattr(source, "pad_token_id", None) if source is not None else None
        if pid is not None:
            return int(pid)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        return int(tokenizer.eos_token_id)
    return 0


def _task_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    outputs = model(**batch)
    loss = getattr(outputs, "loss", None)
    if loss is None:  # models that do not compute their own loss: plain cross-entropy
        logits = _unwrap_logits(outputs)
        loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
    return loss


def _split(n: int, parts: int) -> list[np.ndarray]:
    return np.array_split(np.arange(n), parts)


class _GradSync:
    """Average the trainable gradients over processes with one all-reduce (DDP's arithmetic).

    A parameter without a gradient on every rank keeps ``grad=None`` (so AdamW skips it, as it would in
    a single process); if some ranks have one, the missing ones count as zeros.
    """

    def __init__(self, params: list[nn.Parameter], dist: _Dist) -> None:
        self.params, self.dist = params, dist

    def __call__(self) -> None:
        if not self.dist.active:
            return
        ref = self.params[0]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(ref.dtype)
                          for p in self.params] +
                         [torch.tensor([float(p.grad is not None) for p in self.params],
                                       dtype=ref.dtype, device=ref.device)])
        self.dist.mean_(flat)
        offset = 0
        present = flat[-len(self.params):]
        for k, p in enumerate(self.params):
            n = p.numel()
            if present[k] > 0:
                g = flat[offset:offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            offset += n


def _move(model: nn.Module, device: torch.device) -> None:
    """``model.to(device)`` unless every parameter is already there (quantized models refuse ``.to``)."""
    def here(t: torch.Tensor) -> bool:
        return t.device.type == device.type and (device.index is None or t.device.index in (None, device.index)
                                                 or device.type == "cpu")
    if not all(here(p) for p in model.parameters()):
        model.to(device)


def _train_columns(kind: str, ds: Any) -> Any:
    """Only the columns the training collator reads (MC rows also carry every option's tokens)."""
    wanted = {"seq-cls": ("input_ids", "attention_mask", "token_type_ids", "labels"),
              _MC_KIND: ("input_ids", "labels"), "image-cls": ("pixel_values", "labels")}[kind]
    names = getattr(ds, "column_names", None)
    if names is None:
        return ds
    missing = [c for c in wanted if c not in names and c not in ("attention_mask", "token_type_ids")]
    if missing:
        raise KeyError(f"the {kind} training split lacks column(s) {missing}; it has {names}")
    keep = [c for c in wanted if c in names]
    return ds.select_columns(keep) if len(keep) < len(names) else ds


def _better(score: float, best: float | None, greater: bool) -> bool:
    if math.isnan(score):
        return best is None
    if best is None or math.isnan(best):
        return True
    return score > best if greater else score < best


def train(handle: Any, task: Any, encoded: Mapping[str, Any], cfg: TrainConfig, tokenizer: Any | None = None,
          checkpoint_dir: str | Path | None = None, progress: bool = True, progress_leave: bool = True,
          desc: str | None = None, run_id: str | None = None) -> TrainResult:
    """Fine-tune ``handle.model`` on ``encoded["train"]`` and report test metrics at the best validation step.

    ``handle`` is a ``structlora.repro.methods.MethodHandle`` (``model``; optional ``extra_loss()`` added to
    the task loss, ``on_step(step, total)`` called after every optimizer and scheduler step, while the
    step's averaged gradients are still in ``.grad``; optional ``make_optimizer(lr, weight_decay)``).
    ``task`` supplies ``kind``, ``metric`` and ``compute_metrics``. The selection metric is
    ``task.metric``, higher is better unless ``task.greater_is_better`` is False. Evaluation happens
    every ``cfg.eval_every`` steps (``<= 0``: only at the end) and after the last step.
    ``progress`` shows one tqdm bar (main process only) with the running loss. ``run_id`` ties the
    checkpoint to one run (a checkpoint of another run is discarded, see the module docstring).
    Raises ``DivergedError`` at the first non-finite loss, gradient or parameter.
    """
    kind = task.kind
    if kind not in _CLS_KINDS + (_MC_KIND,):
        raise ValueError(f"unknown task kind {kind!r}; expected one of {_CLS_KINDS + (_MC_KIND,)}")
    if "train" not in encoded or len(encoded["train"]) == 0:
        raise ValueError("encoded['train'] is missing or empty")
    t_start = time.perf_counter()
    dist = _Dist()
    micro_parts = dist.world * cfg.grad_accum
    train_ds = _train_columns(kind, encoded["train"])
    if min(cfg.batch_size, len(train_ds)) < micro_parts:
        raise ValueError(f"a batch of {min(cfg.batch_size, len(train_ds))} rows cannot be split over "
                         f"{dist.world} process(es) x grad_accum={cfg.grad_accum}")
    val_ds = encoded.get("validation") if hasattr(encoded, "get") else None
    test_ds = encoded.get("test") if hasattr(encoded, "get") else None
    if val_ds is None or len(val_ds) == 0:
        log.warning("no validation split: the last step is reported as the best step")

    model: nn.Module = handle.model
    _move(model, dist.device)
    model.train()
    regime = training_regime(model, cfg, dist.device)
    autocast_dtype = AUTOCAST_DTYPES[regime["precision"]]
    pad_id = pad_token_id(tokenizer, model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"method {getattr(handle, 'name', '?')!r}: the model has no trainable parameter")
    params = [p for _, p in named]
    _seed_everything(cfg.seed)
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
    sync = _GradSync(params, dist)
    greater = bool(getattr(task, "greater_is_better", True))
    metric = task.metric

    step, history, best_state, best_step, best_val, best_score = 0, [], None, 0, {}, None
    prior_wall, resumed_from = 0.0, None
    prior = {"train_time_s": 0.0, "eval_time_s": 0.0, "train_steps": 0, "peak_mem_mb": 0.0, "sessions": 0,
             "cost_partial": False}
    ckpt_path = Path(checkpoint_dir) / _CKPT_NAME if checkpoint_dir is not None else None
    ck = _load_checkpoint(ckpt_path, cfg, dist, run_id) if ckpt_path is not None else None
    if ck is not None:
        load_trainable_state(model, ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        rng = ck["rng"][dist.rank] if len(ck["rng"]) == dist.world else ck["rng"][0]
        _set_rng_state(rng)
        ctl = _controller(handle)
        if ctl is not None and ck.get("controller") is not None:
            ctl.load_state_dict(ck["controller"])
        _set_capture_state(model, ck.get("capture"))
        prior.update(ck.get("cost") or {"cost_partial": True})
        step, history, best_state = ck["step"], ck["history"], ck["best_state"]
        best_step, best_val, best_score = ck["best_step"], ck["best_val"], ck["best_score"]
        prior_wall, resumed_from = ck["wall_time_s"], ck["step"]
        log.info("resuming from %s at step %d", ckpt_path, step)

    mem = PeakMemory(dist.device)
    mem.start()
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and dist.is_main), leave=progress_leave,
               desc=desc or f"{getattr(handle, 'name', 'train')}/{getattr(task, 'name', kind)}",
               mininterval=2.0, dynamic_ncols=True)
    window_loss, window_n, ema = 0.0, 0, None
    train_time = eval_time = 0.0
    steps_this_session = 0
    extra = getattr(handle, "extra_loss", None)
    on_step = getattr(handle, "on_step", None)
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            rows = batch_indices(len(train_ds), cfg.batch_size, cfg.seed, step)
            chunks = _split(len(rows), micro_parts)
            mine = chunks[dist.rank * cfg.grad_accum:(dist.rank + 1) * cfg.grad_accum]
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), dtype=torch.float64, device=dist.device)
            for chunk in mine:
                batch = {k: v.to(dist.device) for k, v in
                         collate(kind, _columns(train_ds, rows[chunk]), pad_id).items()}
                with _autocast(dist.device, autocast_dtype):
                    loss = _task_loss(model, batch).float()
                if extra is not None:
                    loss = loss + extra()
                weight = len(chunk) * dist.world / len(rows)
                (loss * weight).backward()
                step_loss += loss.detach().double() * weight
            sync()
            step_loss = dist.mean_(step_loss)
            _check_step_finite(step + 1, step_loss, named, history)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            steps_this_session += 1
            if on_step is not None:
                on_step(step, cfg.max_steps)
            _check_params_finite(step, named, history)
            loss_value = float(step_loss)
            window_loss, window_n = window_loss + loss_value, window_n + 1
            ema = loss_value if ema is None else 0.9 * ema + 0.1 * loss_value
            bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
            bar.update(1)
            train_time += time.perf_counter() - t0

            if step == cfg.max_steps or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
                t1 = time.perf_counter()
                val = evaluate(model, task, val_ds, cfg.eval_batch_size, pad_id, tokenizer,
                               cfg.max_eval_examples, _dist=dist) if val_ds is not None else {}
                score = val.get(metric, float("nan")) if val else float("nan")
                if val and metric not in val:
                    raise KeyError(f"task {getattr(task, 'name', '?')!r}: compute_metrics returned "
                                   f"{sorted(val)}, not the selection metric {metric!r}")
                entry = {"step": step, "loss": window_loss / max(window_n, 1),
                         "lr": float(scheduler.get_last_lr()[0])}
                entry.update({f"val_{k}": v for k, v in val.items()})
                history.append(entry)
                window_loss, window_n = 0.0, 0
                if not val or _better(score, best_score, greater):
                    best_state, best_step, best_val = trainable_state(model), step, val
                    best_score = score if val else None
                eval_time += time.perf_counter() - t1
                if val:
                    bar.set_postfix(loss=f"{ema:.4f}", **{f"val_{metric}": f"{score:.4f}"}, refresh=False)
                if ckpt_path is not None:
                    ctl = _controller(handle)
                    cost = {"train_time_s": prior["train_time_s"] + train_time,
                            "eval_time_s": prior["eval_time_s"] + eval_time,
                            "train_steps": prior["train_steps"] + steps_this_session,
                            "peak_mem_mb": max(prior["peak_mem_mb"], mem.peak_mb()),
                            "sessions": prior["sessions"] + 1, "cost_partial": prior["cost_partial"]}
                    _save_checkpoint(ckpt_path, dist, cfg, step, model, optimizer, scheduler, history,
                                     best_state, best_step, best_val, best_score,
                                     prior_wall + time.perf_counter() - t_start,
                                     ctl.state_dict() if ctl is not None else None,
                                     run_id=run_id, cost=cost, capture=_capture_state(model))
    finally:
        bar.close()

    if best_state is not None:
        load_trainable_state(model, best_state)
    t1 = time.perf_counter()
    fingerprint: dict[str, Any] = {}
    test = evaluate(model, task, test_ds, cfg.eval_batch_size, pad_id, tokenizer, cfg.max_eval_examples,
                    _dist=dist, fingerprint=fingerprint) if test_ds is not None else {}
    eval_time += time.perf_counter() - t1
    wall = prior_wall + time.perf_counter() - t_start
    total_train = prior["train_time_s"] + train_time
    total_steps = int(prior["train_steps"]) + steps_this_session
    return TrainResult(
        best_step=best_step, val_metrics=dict(best_val), test_metrics=test, history=history, wall_time_s=wall,
        peak_mem_mb=max(float(prior["peak_mem_mb"]), mem.peak_mb()),
        steps_per_s=total_steps / total_train if total_train > 0 else 0.0,
        peak_mem_kind=mem.kind, train_time_s=total_train, eval_time_s=prior["eval_time_s"] + eval_time,
        resumed_from=resumed_from, train_steps=total_steps, sessions=int(prior["sessions"]) + 1,
        cost_partial=bool(prior["cost_partial"]) or total_steps != step,
        world_size=dist.world, metric=metric, config=_config_dict(cfg),
        regime=regime if cfg.precision != "fp32" or cfg.gradient_checkpointing else {},
        test_predictions_sha256=fingerprint.get("sha256"), test_predictions=fingerprint.get("predictions"))


def _controller(handle: Any) -> Any:
    """``handle.controller`` when it can save and restore its state (``state_dict``/``load_state_dict``)."""
    ctl = getattr(handle, "controller", None)
    if ctl is not None and callable(getattr(ctl, "state_dict", None)) and callable(getattr(ctl, "load_state_dict", None)):
        return ctl
    return None


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["betas"] = list(d["betas"])
    for name, default in _NEW_DEFAULTS.items():   # records and checkpoints of earlier runs stay comparable
        if d[name] == default:
            del d[name]
    return d


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; nothing at all for fp32 (None)."""
    import contextlib

    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def training_regime(model: nn.Module, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Turn on what ``cfg`` asks for where the model and the device support it, and say what is used:
    ``{"precision": "bf16" | "fp32", "gradient_checkpointing": bool}`` (the training forward's autocast
    dtype and whether activation checkpointing is on; reasons in ``"notes"`` when a request was dropped).

    Checkpointing: ``model.gradient_checkpointing_enable`` (transformers models, through peft and
    StructLoRA; non-reentrant, so frozen inputs need no gradient); a model without it (timm's ViT, whose
    checkpointing StructLoRA's gate noise does not know) trains without. bf16 autocast: on CUDA where
    the device supports bf16, on CPU always (torch's CPU autocast)."""
    used: dict[str, Any] = {"precision": "fp32", "gradient_checkpointing": False}
    notes = []
    if cfg.gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        try:
            if callable(enable):
                enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                used["gradient_checkpointing"] = True
            else:
                notes.append(f"{type(model).__name__} has no gradient_checkpointing_enable: not checkpointed")
        except (ValueError, TypeError, NotImplementedError, AttributeError) as exc:
            notes.append(f"gradient checkpointing not supported: {exc}")
    if cfg.precision != "fp32":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            notes.append(f"{cfg.precision} autocast not supported on {torch.cuda.get_device_name(device)}: fp32")
        elif device.type not in ("cuda", "cpu"):
            notes.append(f"{cfg.precision} autocast not used on device {device.type}: fp32")
        else:
            used["precision"] = cfg.precision
    for note in notes:
        log.warning("training regime: %s", note)
    if notes:
        used["notes"] = notes
    return used


def _non_finite(t: torch.Tensor) -> bool:
    return not bool(torch.isfinite(t).all())


def _check_step_finite(step: int, loss: torch.Tensor, named: list[tuple[str, nn.Parameter]],
                       history: list[dict[str, float]]) -> None:
    """Raise ``DivergedError`` when the step's loss or a trainable gradient is not finite.

    One synchronisation: the flags of all gradients are stacked and read once; the offending
    parameter is looked up only on failure.
    """
    grads = [(n, p.grad) for n, p in named if p.grad is not None]
    flags = torch.stack([torch.isfinite(loss).all().to(loss.device)] +
                        [torch.isfinite(g).all().to(loss.device) for _, g in grads])
    if bool(flags.all()):
        return
    if not bool(flags[0]):
        bad = next((n for n, g in grads if _non_finite(g)), None)
        raise DivergedError(step, "loss", None, history, float(loss)) if bad is None else \
            _diverged_with(step, "loss", float(loss), bad, history)
    name = next(n for (n, g), ok in zip(grads, flags[1:].tolist()) if not ok)
    raise DivergedError(step, "gradient", name, history)


def _diverged_with(step: int, quantity: str, value: float, grad_name: str,
                   history: list[dict[str, float]]) -> DivergedError:
    err = DivergedError(step, quantity, None, history, value)
    err.name = grad_name
    err.args = (f"{err.args[0]}; first non-finite gradient: {grad_name!r}",)
    return err


def _check_params_finite(step: int, named: list[tuple[str, nn.Parameter]], history: list[dict[str, float]]) -> None:
    """Raise ``DivergedError`` naming the first trainable parameter that is not finite."""
    flags = torch.stack([torch.isfinite(p.detach()).all().to(named[0][1].device) for _, p in named])
    if bool(flags.all()):
        return
    name = next(n for (n, _), ok in zip(named, flags.tolist()) if not ok)
    raise DivergedError(step, "parameter", name, history)


# --------------------------------------------------------------------------------------------- capture state
_CAPTURE_FIELDS = ("capturing", "captured", "sketches")


def _family_owners(model: nn.Module) -> list[tuple[str, Any]]:
    """The (name, module) pairs of ``model`` that carry a ``families`` list (StructLoRA models)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "families", None), list)]


def _capture_state(model: nn.Module) -> dict[str, list[dict[str, Any]]] | None:
    """The similarity-capture fields of every family (CPU copies), or None when the model has none."""
    owners = _family_owners(model)
    if not owners:
        return None
    out: dict[str, list[dict[str, Any]]] = {}
    for name, owner in owners:
        out[name] = []
        for fam in owner.families:
            entry = {}
            for f in _CAPTURE_FIELDS:
                value = getattr(fam, f, None)
                entry[f] = value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
            out[name].append(entry)
    return out


def _set_capture_state(model: nn.Module, state: Mapping[str, Sequence[Mapping[str, Any]]] | None) -> None:
    """Restore what ``_capture_state`` saved (tensors go back to the family's device)."""
    if not state:
        return
    owners = dict(_family_owners(model))
    for name, entries in state.items():
        owner = owners.get(name)
        if owner is None or len(owner.families) != len(entries):
            raise KeyError(f"checkpointed capture state of {name!r} does not match the model's families")
        for fam, entry in zip(owner.families, entries):
            for f in _CAPTURE_FIELDS:
                value = entry.get(f)
                if isinstance(value, torch.Tensor):
                    device = fam.A(0).device if callable(getattr(fam, "A", None)) else value.device
                    value = value.to(device)
                setattr(fam, f, value)


# --------------------------------------------------------------------------------------------- checkpoint
def _check_resume(ck: Any, cfg: TrainConfig, world: int, run_id: str | None) -> str | None:
    """Why checkpoint ``ck`` cannot be resumed by this run (None when it can)."""
    if not isinstance(ck, dict):
        return f"not a checkpoint ({type(ck).__name__})"
    if ck.get("format") != _CKPT_FORMAT:
        return f"unknown checkpoint format {ck.get('format')!r} (expected {_CKPT_FORMAT})"
    if ck.get("run_id") != run_id:
        return f"written by another run ({ck.get('run_id')!r}, this run is {run_id!r})"
    mine, theirs = _config_dict(cfg), ck.get("config", {})
    diff = {k: (theirs.get(k), mine[k]) for k in _RESUME_KEYS if theirs.get(k) != mine[k]}
    if diff:
        return f"written by a run with a different configuration (checkpoint vs now: {diff})"
    return None


def _load_checkpoint(path: Path, cfg: TrainConfig, dist: _Dist, run_id: str | None) -> dict[str, Any] | None:
    """The checkpoint at ``path`` when this run can resume from it, else None.

    A checkpoint that cannot be read or belongs to another run/configuration is reported with a
    warning naming ``path`` and deleted (by the main process), so that the run restarts.
    """
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        problem = _check_resume(ck, cfg, dist.world, run_id)
    except Exception as exc:  # truncated, garbage, pickled from another code version, ...
        ck, problem = None, f"unreadable ({type(exc).__name__}: {exc})"
    if problem is None:
        if ck.get("world_size", 1) != dist.world:
            log.warning("%s: written with %d process(es), resuming with %d (dropout RNG streams differ)",
                        path, ck.get("world_size", 1), dist.world)
        return ck
    warnings.warn(f"discarding checkpoint {path}: {problem}; the run starts afresh", stacklevel=3)
    dist.barrier()
    if dist.is_main:
        try:
            path.unlink()
        except OSError:
            pass
    dist.barrier()
    return None


def _save_checkpoint(path: Path, dist: _Dist, cfg: TrainConfig, step: int, model: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler: Any, history: list, best_state: Any,
                     best_step: int, best_val: dict, best_score: float | None, wall: float,
                     controller_state: Any = None, *, run_id: str | None = None,
                     cost: Mapping[str, Any] | None = None, capture: Any = None) -> None:
    """Write the resumable state with ``atomic_write`` (temporary file, fsync, ``os.replace``)."""
    rngs = dist.gather_objects(_rng_state())
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": _CKPT_FORMAT, "run_id": run_id, "config": _config_dict(cfg), "step": step,
            "world_size": dist.world, "model": trainable_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rngs, "history": history, "best_state": best_state,
            "best_step": best_step, "best_val": best_val, "best_score": best_score, "wall_time_s": wall,
            "controller": controller_state, "cost": dict(cost) if cost is not None else None,
            "capture": capture,
        }
        atomic_write(path, lambda f: torch.save(state, f))
    dist.barrier()

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

Modules
-------
`config` (TrainConfig, TrainResult), `batches` (which rows a step draws, collation), `evaluation`,
`distributed` (the process group, gradient averaging), `memory` (PeakMemory), `regime` (bf16 autocast,
gradient checkpointing), `divergence` (DivergedError and the finite checks), `state` (trainable tensors,
RNG and capture state), `checkpoint` (the resumable ``state.pt``) and `loop` (``train``); this package
re-exports their public API.
"""
from __future__ import annotations

from .batches import batch_indices, collate, pad_token_id, training_batches
from .config import AUTOCAST_DTYPES, TrainConfig, TrainResult
from .divergence import DivergedError
from .evaluation import evaluate, score_choices
from .loop import train
from .memory import PeakMemory
from .regime import training_regime
from .state import load_trainable_state, trainable_state

__all__ = [
    "AUTOCAST_DTYPES",
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
    "training_regime",
    "PeakMemory",
    "DivergedError",
]

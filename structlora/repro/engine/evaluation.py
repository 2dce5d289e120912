"""Evaluation: classification by argmax, multiple choice by summed continuation log-probabilities
(`score_choices`, as lm-evaluation-harness), sharded over processes and gathered (`evaluate`)."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .batches import MC_KIND, collate, pad_sequences, pad_token_id, take_rows
from .distributed import ProcessGroup

__all__ = ["evaluate", "logits_of", "score_choices"]


def _eval_subset(ds: Any, max_examples: int | None) -> Any:
    """The fixed seed-0 random subset of ``max_examples`` rows (kept in original order), or ``ds``."""
    if ds is None or max_examples is None or len(ds) <= max_examples:
        return ds
    keep = np.sort(np.random.default_rng(0).choice(len(ds), size=max_examples, replace=False))
    return ds.select(keep.tolist())


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model's outputs (an HF output object or a tuple)."""
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
            ids = pad_sequences(seqs, pad_id).to(device)
            mask = pad_sequences([[1] * len(s) for s in seqs], 0).to(device)
            logits = logits_of(model(input_ids=ids, attention_mask=mask))
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
        ids = pad_sequences(seqs, pad_id).to(device)
        mask = pad_sequences([[1] * len(s) for s in seqs], 0).to(device)
        logits = logits_of(model(input_ids=ids, attention_mask=mask))
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
        cols = take_rows(ds, rows[b:b + batch_size])
        if kind == MC_KIND:
            scores = score_choices(model, cols["choice_input_ids"], cols["choice_starts"],
                                   batch_size=batch_size, pad_id=pad_id, device=device)
            lengths = _choice_lengths(cols, tokenizer)
            preds += [int(np.argmax(s)) for s in scores]
            preds_norm += [int(np.argmax(s / n)) for s, n in zip(scores, lengths)]
            refs += list(cols["label"])
        else:
            batch = {k: v.to(device) for k, v in collate(kind, cols, pad_id).items()}
            labels = batch.pop("labels")
            logits = logits_of(model(**batch)).float()
            pred = logits[..., 0] if logits.shape[-1] == 1 else logits.argmax(-1)
            preds += pred.cpu().tolist()
            refs += labels.cpu().tolist()
    return {"rows": list(rows), "preds": preds, "preds_norm": preds_norm, "refs": refs}


def evaluate(model: nn.Module, task: Any, dataset: Any, batch_size: int = 64, pad_id: int | None = None,
             tokenizer: Any | None = None, max_examples: int | None = None,
             _dist: ProcessGroup | None = None, fingerprint: dict[str, Any] | None = None) -> dict[str, float]:
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
    if task.kind == MC_KIND:
        metrics["acc_norm"] = float(np.mean(np.asarray(preds_norm) == np.asarray(refs)))
    return metrics

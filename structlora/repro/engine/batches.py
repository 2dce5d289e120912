"""Training data: which rows each optimizer step draws (`batch_indices`, stateless so a resumed run
draws the same batches), how a column batch becomes model inputs (`collate`, dynamic padding), how a
global batch is cut into micro-batches, and the padding id."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["CLS_KINDS", "MC_KIND", "batch_indices", "collate", "micro_batches", "pad_sequences", "pad_token_id",
           "take_rows", "training_batches", "training_columns"]


CLS_KINDS = ("seq-cls", "image-cls")   # task kinds scored by argmax of the logits
MC_KIND = "multiple-choice"            # a causal LM scoring each option (training: the SFT loss)


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


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Right-pad integer sequences with ``value`` to the longest: (len(seqs), max_len)."""
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
    if kind not in ("seq-cls", MC_KIND):
        raise ValueError(f"unknown task kind {kind!r}; expected one of {CLS_KINDS + (MC_KIND,)}")
    ids = columns["input_ids"]
    out = {"input_ids": pad_sequences(ids, pad_id)}
    if "attention_mask" in columns and kind == "seq-cls":
        out["attention_mask"] = pad_sequences(columns["attention_mask"], 0)
    else:
        out["attention_mask"] = pad_sequences([[1] * len(s) for s in ids], 0)
    if kind == "seq-cls":
        if "token_type_ids" in columns:
            out["token_type_ids"] = pad_sequences(columns["token_type_ids"], 0)
        out["labels"] = torch.as_tensor(np.asarray(columns["labels"]))
    else:
        out["labels"] = pad_sequences(columns["labels"], -100)
    return out


def training_batches(kind: str, dataset: Any, batch_size: int, seed: int, n: int, pad_id: int = 0
                     ) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` collated global training batches that ``train`` draws with this seed (CPU tensors),
    e.g. calibration batches for methods that look at data before training."""
    return [collate(kind, take_rows(dataset, batch_indices(len(dataset), batch_size, seed, s)), pad_id)
            for s in range(n)]


def take_rows(ds: Any, indices: Sequence[int]) -> dict[str, list[Any]]:
    """The column batch of ``indices`` of dataset ``ds`` (``{column: [value per row]}``)."""
    return ds[[int(i) for i in indices]]


def micro_batches(n: int, parts: int) -> list[np.ndarray]:
    """Positions ``0..n-1`` of a global batch cut into ``parts`` micro-batches (sizes differ by at most 1)."""
    return np.array_split(np.arange(n), parts)


def training_columns(kind: str, ds: Any) -> Any:
    """Only the columns the training collator reads (MC rows also carry every option's tokens)."""
    wanted = {"seq-cls": ("input_ids", "attention_mask", "token_type_ids", "labels"),
              MC_KIND: ("input_ids", "labels"), "image-cls": ("pixel_values", "labels")}[kind]
    names = getattr(ds, "column_names", None)
    if names is None:
        return ds
    missing = [c for c in wanted if c not in names and c not in ("attention_mask", "token_type_ids")]
    if missing:
        raise KeyError(f"the {kind} training split lacks column(s) {missing}; it has {names}")
    keep = [c for c in wanted if c in names]
    return ds.select_columns(keep) if len(keep) < len(names) else ds


def pad_token_id(tokenizer: Any | None, model: nn.Module | None = None) -> int:
    """Padding id: the tokenizer's pad token, else the model config's, else EOS, else 0."""
    for source in (tokenizer, getattr(model, "config", None)):
        pid = getattr(source, "pad_token_id", None) if source is not None else None
        if pid is not None:
            return int(pid)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        return int(tokenizer.eos_token_id)
    return 0

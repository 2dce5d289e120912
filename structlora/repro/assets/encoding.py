"""Encoding a task for a model: tokenised seq-cls and multiple-choice splits (cached on disk under
``cache_dir("tokenized")``, keyed by the task's rows, the tokenizer and ``max_length``) and image splits
passed through in torch format.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import datasets
import numpy as np

from ..._io import atomic_dir
from ..cache import cache_dir
from .task_data import SPLITS, TaskData, column

__all__ = ["FORMAT_VERSION", "encode"]

FORMAT_VERSION = 1  # bump when the encoded format changes (invalidates the tokenised cache)


def _fingerprint(task: TaskData, tokenizer: Any, max_length: int) -> str:
    content = {s: hashlib.sha256(column(getattr(task, s), "_source_index").astype(np.int64).tobytes()).hexdigest()
               for s in SPLITS}
    key = {"task": task.name, "kind": task.kind, "fraction": task.fraction, "seed": task.seed,
           "tokenizer": [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer)],
           "max_length": max_length, "format": FORMAT_VERSION, "content": content}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{task.name.replace('/', '--')}-{digest}"


def _special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts in front of a text by default (e.g. BOS); empty for most causal LMs."""
    full = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def _encode_seq_cls(batch: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
    enc = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_length)
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    out["labels"] = batch["label"]
    return out


def _encode_mc(batch: dict[str, list], tokenizer: Any, max_length: int, prefix: list[int]) -> dict[str, list]:
    prompts = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
    flat = [c for choices in batch["choices"] for c in choices]
    flat_ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"input_ids": [], "labels": [], "choice_input_ids": [], "choice_starts": [], "label": []}
    pos = 0
    for prompt, choices, gold in zip(prompts, batch["choices"], batch["label"]):
        conts = flat_ids[pos:pos + len(choices)]
        pos += len(choices)
        budget = max_length - len(prefix)
        room = budget - max(len(c) for c in conts)
        context = prefix + (prompt[-room:] if room > 0 else [])  # truncate the prompt from the left
        conts = [c[: max_length - len(context)] for c in conts]  # only if a choice alone overflows
        start = len(context)
        out["input_ids"].append(context + conts[gold])
        out["labels"].append([-100] * start + conts[gold])
        out["choice_input_ids"].append([context + c for c in conts])
        out["choice_starts"].append([start] * len(conts))
        out["label"].append(gold)
    return out


def _encode_split(task: TaskData, ds: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
    if task.kind == "seq-cls":
        fn, kwargs = _encode_seq_cls, {"tokenizer": tokenizer, "max_length": max_length}
    else:
        fn, kwargs = _encode_mc, {"tokenizer": tokenizer, "max_length": max_length,
                                  "prefix": _special_prefix(tokenizer)}
    return ds.map(fn, fn_kwargs=kwargs, batched=True, remove_columns=ds.column_names,
                  keep_in_memory=True, load_from_cache_file=False, desc=f"tokenising {task.name}")


def encode(task: TaskData, tokenizer: Any, max_length: int) -> datasets.DatasetDict:
    """Model-ready splits of ``task``; tokenised ones are cached under ``cache_dir("tokenized")``.

    - seq-cls: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``), ``labels``; truncated to
      ``max_length``, not padded (pad per batch with a collator).
    - multiple-choice: ``input_ids`` = [BOS if the tokenizer adds one] + prompt + gold continuation,
      ``labels`` = the same with -100 on everything before the continuation, ``choice_input_ids`` (one
      sequence per choice), ``choice_starts`` (where each choice's tokens start), ``label`` (gold
      index). Prompt and continuations are tokenised separately, and the prompt is cut from the left
      so that every continuation fits in ``max_length``.
    - image-cls: ``pixel_values`` and ``labels`` (torch format), passed through without caching;
      ``tokenizer`` may be ``None``.
    """
    if task.kind == "image-cls":
        return datasets.DatasetDict({s: getattr(task, s).rename_column("label", "labels")
                                     .select_columns(["pixel_values", "labels"]).with_format("torch")
                                     for s in SPLITS})
    if task.kind not in ("seq-cls", "multiple-choice"):
        raise ValueError(f"don't know how to encode task kind {task.kind!r}")
    if tokenizer is None:
        raise ValueError(f"task {task.name!r} ({task.kind}) needs a tokenizer")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    root = cache_dir("tokenized")
    final = root / _fingerprint(task, tokenizer, max_length)
    if not (final / "dataset_dict.json").exists():
        encoded = datasets.DatasetDict({s: _encode_split(task, getattr(task, s), tokenizer, max_length)
                                        for s in SPLITS})
        with atomic_dir(final) as tmp:
            encoded.save_to_disk(str(tmp))
    return datasets.load_from_disk(str(final))

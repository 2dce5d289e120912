"""The dry run of a tier on hub models: every kind of run it asks for builds, trains and writes a record,
offline, on this machine, before anyone rents a GPU.

    python -m structlora reproduce --tier paper --dry-run        # ~1 min on a CPU, nothing downloaded

For each **family** of the tier's runs (`tier_specs`: one run per model, method and method keywords;
ranks, fractions and seeds only change numbers) the dry run

* replaces the hub model by a tiny random model of the **same architecture** (`tiny_model`: a 2-layer
  ``RobertaForSequenceClassification``, a 2-layer ``LlamaForCausalLM`` with grouped-query attention as
  TinyLlama/LLaMA, timm's ``vit_base_patch16_224`` at width 32 and depth 2, 224 px patch-16 input),
  with a word-level tokenizer that adds the same special tokens (RoBERTa's ``<s> A </s></s> B </s>``,
  LLaMA's leading ``<s>`` and pad = eos);
* replaces the task's data by a tiny synthetic data set with the **same schema** (`tiny_task`: the
  GLUE columns ``text`` [``text_pair``] / ``label`` and class count, BoolQ/PIQA's ``prompt`` /
  ``choices`` / ``label``, CIFAR-100's 3x32x32 ``pixel_values`` and 100 classes);
* runs the real path for everything else: ``grid.run`` (lock, checkpoint, atomic record), the task
  encoding (``assets.tasks.encode``), the method registry (``methods.build_method``), the engine,
  the diagnostics, at 2 optimizer steps of a batch of 4, into a temporary folder.

What it does not check: downloading the weights and the data (``assets.models._load_hub`` and
``assets.tasks.load_task`` on the hub), GPU memory at full size, and the numbers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .grid import RunSpec

__all__ = ["ARCHITECTURES", "families", "tiny_model", "tiny_task", "dry_run_loaders", "dry_run", "main"]

# hub id -> the architecture its tiny stand-in has (the paper tier's models)
ARCHITECTURES: dict[str, str] = {
    "FacebookAI/roberta-base": "roberta", "roberta-base": "roberta",
    "TinyLlama/TinyLlama_v1.1": "llama", "huggyllama/llama-7b": "llama", "meta-llama/Llama-3.2-1B": "llama",
    "vit_base_patch16_224": "vit-b16",
}
_WORDS = [f"w{i}" for i in range(40)]
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
N_TRAIN, N_EVAL = 16, 8


def families(specs: Sequence[RunSpec]) -> list[RunSpec]:
    """One spec per (model, method, method keywords), the first of each, in order: what must build."""
    seen: dict[tuple, RunSpec] = {}
    for s in specs:
        seen.setdefault((s.model, s.method, s.method_kwargs), s)
    return list(seen.values())


# ------------------------------------------------------------------------------------------ tiny models
def _tokenizer(arch: str, name: str) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_SPECIALS + _WORDS + ["yes", "no", "A", "B", "Question:", "Answer:"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if arch == "roberta":   # RoBERTa: <s> A </s></s> B </s>
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    else:                   # LLaMA: a leading <s>
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>" if arch == "roberta" else None)
    fast.name_or_path = f"dry-run/{name}"   # its own tokenised-data cache entries
    return fast


def tiny_model(name: str, task: str | None = None, num_labels: int | None = None, seed: int = 0) -> Any:
    """``LoadedModel`` of a tiny random model with the architecture of hub model ``name`` (`ARCHITECTURES`),
    filled in as ``assets.models._load_hub`` fills in the real one (targets, heads, layers)."""
    from .assets.models import LoadedModel, ensure_pad_token, infer_target_modules, seeded

    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise ValueError(f"dry run: no tiny stand-in for model {name!r} (known: {sorted(ARCHITECTURES)})")
    with seeded(seed):
        if arch == "vit-b16":
            import timm

            from .assets.vit import ImageClassifier

            backbone = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                                         mlp_ratio=2.0)
            model = ImageClassifier(backbone, num_labels).eval()
            return LoadedModel(name, "image-cls", model, None, infer_target_modules(model), len(backbone.blocks),
                               image_size=224, modules_to_save=["head"])
        tok = _tokenizer(arch, name)
        if arch == "roberta":
            from transformers import RobertaConfig, RobertaForSequenceClassification

            cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=514, num_labels=num_labels,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)
            model = RobertaForSequenceClassification(cfg)
            heads = ["classifier"]
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            ensure_pad_token(tok)
            tok.padding_side = "right"
            cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                              pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=2)
            model = LlamaForCausalLM(cfg)
            heads = []
    targets = infer_target_modules(model)
    return LoadedModel(name, task or ("seq-cls" if arch == "roberta" else "causal-lm"), model, tok, targets,
                       model.config.num_hidden_layers, modules_to_save=heads)


# ------------------------------------------------------------------------------------------ tiny data
def _sentences(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(_WORDS, int(rng.integers(3, 10)))) for _ in range(n)]


def _split(kind: str, task: str, n: int, rng: np.random.Generator, n_classes: int, pair: bool = False) -> dict[str, Any]:
    labels = (np.arange(n) % n_classes).tolist()
    if kind == "seq-cls":
        cols: dict[str, Any] = {"text": _sentences(rng, n)}
        if pair:                       # a sentence-pair task (its TaskSpec.pair)
            cols["text_pair"] = _sentences(rng, n)
    elif kind == "multiple-choice":
        options = ["no", "yes"] if task == "boolq" else None
        cols = {"prompt": [f"{s} Question: {q} Answer:" for s, q in zip(_sentences(rng, n), _sentences(rng, n))],
                "choices": [list(options) if options else _sentences(rng, n_classes) for _ in range(n)]}
    else:
        cols = {"pixels": rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)}
    return {**cols, "label": labels, "_source_index": list(range(n))}


def tiny_task(name: str, fraction: float = 1.0, seed: int = 0) -> Any:
    """``TaskData`` of a tiny synthetic data set with the schema of task ``name`` (16 train, 8 validation,
    8 test examples; the few-shot subset drawn as ``load_task`` draws it)."""
    from .assets.tasks import (NUM_CLASSES, PAIRED, TaskData, column, few_shot_indices, from_columns, image_dataset,
                               task_kind)

    model_kind = task_kind(name)
    kind = {"causal-lm": "multiple-choice"}.get(model_kind, model_kind)
    n_classes = NUM_CLASSES.get(name, 2)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", max(N_TRAIN, n_classes)), ("validation", N_EVAL), ("test", N_EVAL)):
        cols = _split(kind, name, n, rng, n_classes, PAIRED.get(name, False))
        if kind == "image-cls":
            labels = np.asarray(cols["label"])
            splits[split] = image_dataset(cols["pixels"], labels, np.arange(n), 0.5, 0.5,
                                           [f"c{i}" for i in range(n_classes)], (3, 32, 32))
        else:
            splits[split] = from_columns(cols)
    train = splits["train"]
    if fraction < 1:
        train = train.select(few_shot_indices(column(train, "label"), fraction, seed))
    return TaskData(name=name, kind=kind, train=train, validation=splits["validation"], test=splits["test"],
                    labels=[str(i) for i in range(n_classes)], metric="accuracy", model_kind=model_kind,
                    source=f"dry run: synthetic data with the schema of {name}", fraction=float(fraction),
                    seed=int(seed))


def dry_run_loaders() -> dict[str, Callable[..., Any]]:
    """``grid.LOADERS`` entries of the dry run: tiny models and data; encoding, methods, diagnostics real."""
    return {"load_task": tiny_task, "load_model": tiny_model, "backbone_id": lambda name: f"dry-run:{name}"}


# ------------------------------------------------------------------------------------------ the run
def _two_steps(spec: RunSpec) -> RunSpec:
    return dataclasses.replace(spec, max_steps=2, eval_every=2, batch_size=4, grad_accum=1, max_eval_examples=None)


@contextlib.contextmanager
def _swapped(loaders: dict[str, Callable[..., Any]]) -> Iterator[None]:
    from . import grid

    old = {k: grid.LOADERS.get(k) for k in loaders}
    grid.LOADERS.update(loaders)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                grid.LOADERS.pop(k, None)
            else:
                grid.LOADERS[k] = v


def dry_run(tier: str = "paper", out_dir: str | Path | None = None, root: str | Path | None = None,
            only: Sequence[str] | None = None, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Build, train for 2 steps and record one run of every family of ``tier`` (`families` of
    `tierspecs.tier_specs`) on tiny stand-ins; return one row per family (``spec``, ``status``, ``error``,
    ``seconds``, ``record``). ``out_dir``: where the records go (default: a temporary folder, removed);
    ``only``: the models to check (default all). Errors are collected, not raised."""
    from .grid import run
    from .tierspecs import tier_specs

    specs = families([s for group in tier_specs(tier, root).values() for s in group])
    if only:
        specs = [s for s in specs if s.model in only]
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        folder = Path(out_dir) if out_dir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="structlora-dry-run-")))
        stack.enter_context(_swapped(dry_run_loaders()))
        for spec in specs:
            t0 = time.perf_counter()
            small = _two_steps(spec)
            try:
                record = run(small, folder, progress=False)
                row = {"spec": spec, "status": record["status"], "error": record.get("error") or record.get("skip_reason"),
                       "record": record}
            except Exception as exc:  # noqa: BLE001 - every family is tried; the report names the failures
                row = {"spec": spec, "status": "error", "error": f"{type(exc).__name__}: {exc}", "record": None}
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            if progress is not None:
                progress(f"{row['status']:<8} {row['seconds']:5.1f} s  {spec.model} / {spec.task} / {spec.method}"
                         f"{' ' + json.dumps(dict(spec.method_kwargs)) if spec.method_kwargs else ''}"
                         f"{'  -- ' + str(row['error'])[:200] if row['status'] not in ('ok',) else ''}")
    return rows


def main(tier: str, out_dir: str | None = None) -> int:
    """``reproduce --tier <tier> --dry-run``: print one line per family and a summary; exit 1 on an error."""
    rows = dry_run(tier, out_dir, progress=lambda line: print(line, flush=True))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"dry run of tier {tier}: {len(rows)} run families on tiny stand-ins, "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + ("" if out_dir is None else f"; records in {out_dir}"))
    return 1 if counts.get("error") or counts.get("diverged") else 0

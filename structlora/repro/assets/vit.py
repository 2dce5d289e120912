"""A tiny ViT that structlora pretrains itself on Fashion-MNIST (no pretrained ViT ships offline).

``vit-tiny-fmnist`` is a timm ``VisionTransformer`` (28x28 grey input, patch 4, dim 192, depth 6,
3 heads, mean-pooled tokens, ~2.7M parameters) trained deterministically on Fashion-MNIST classes 0-4 (T-shirt/top,
Trouser, Pullover, Dress, Coat). The vision transfer task then adapts it to classes 5-9.

The weights of the default recipe (`PretrainRecipe`: all 30k training images of classes 0-4, 15 epochs,
flips and 2-pixel shifts; accuracy and seconds in the shipped meta.json) ship inside the package (``SHIPPED_DIR``: ``model.safetensors``
plus a ``meta.json`` with the recipe, the held-out accuracy on the 5,000 test images of classes 0-4 and
the sha256), so no run has to pretrain them and every machine adapts the same backbone. Rebuild them
with ``python -m structlora.repro.assets.vit`` (into the cache; ``--out DIR`` elsewhere); any other
recipe is trained once and cached under ``cache_dir("models") / "vit-tiny-fmnist"``.

Also here: ``read_fashion_mnist`` (the Debian ``dataset-fashion-mnist`` files), the normalisation
used everywhere (``to_pixel_values``) and ``ImageClassifier``, the HF-style wrapper that lets a timm
backbone go through peft and a Hugging Face style trainer.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import platform
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..._io import atomic_dir
from ..cache import cache_dir

__all__ = [
    "FMNIST_CLASSES",
    "FMNIST_DIR",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "VIT_CONFIG",
    "ImageClassifier",
    "PretrainRecipe",
    "SHIPPED_DIR",
    "build_vit",
    "load_pretrained_vit",
    "pretrain_vit",
    "read_fashion_mnist",
    "to_pixel_values",
    "weights_sha256",
]

log = logging.getLogger(__name__)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)

# Architecture of vit-tiny-fmnist (keyword arguments of timm's VisionTransformer). Mean pooling of
# the patch tokens (instead of the class token) learned faster in our short CPU budget.
VIT_CONFIG = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=6, num_heads=3,
                  global_pool="avg")

_NAME = "vit-tiny-fmnist"
SHIPPED_DIR = Path(__file__).with_name(_NAME)  # the default recipe's weights, shipped with the package
_WEIGHTS = "model.safetensors"
_META = "meta.json"


# --------------------------------------------------------------------------------------- data
def read_fashion_mnist(split: str, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read Fashion-MNIST ``split`` ("train": 60k, "test": 10k) from the Debian package files.

    Returns ``(images, labels)``: a uint8 tensor [N, 28, 28] and an int64 tensor [N] (classes 0-9).
    ``root`` defaults to ``$FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``.
    """
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get("FASHION_MNIST_DIR", FMNIST_DIR))
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {p} is missing. Install the Debian package: "
                "`sudo apt-get install dataset-fashion-mnist` (or run `make setup`).")
    images = _read_idx(img_path, magic=2051)
    labels = _read_idx(lbl_path, magic=2049).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels")
    return images, labels


def _read_idx(path: Path, magic: int) -> torch.Tensor:
    """Parse a gzipped IDX file of unsigned bytes (the MNIST format)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    got, = struct.unpack(">i", data[:4])
    if got != magic:
        raise ValueError(f"{path}: bad IDX magic {got} (expected {magic})")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}i", data[4:4 + 4 * ndim])
    buf = bytearray(data[4 + 4 * ndim:])
    return torch.frombuffer(buf, dtype=torch.uint8).reshape(shape)


def to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 28, 28] -> normalised float32 pixel_values [N, 1, 28, 28]."""
    x = images.float().div_(255.0)
    return ((x - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1)


# -------------------------------------------------------------------------------------- model
def build_vit(num_classes: int = len(PRETRAIN_CLASSES)) -> nn.Module:
    """The vit-tiny-fmnist architecture, randomly initialised (uses the global torch RNG)."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(**VIT_CONFIG, num_classes=num_classes)


class ImageClassifier(nn.Module):
    """A timm backbone (classifier removed) plus a fresh linear ``head``, with an HF-style forward.

    ``forward(pixel_values, labels=None)`` returns a ``SequenceClassifierOutput`` with ``.logits``
    and, when ``labels`` are given, the cross-entropy ``.loss``: this is what HF-style trainers
    expect. The new head is the top-level module ``head`` (peft: ``modules_to_save=["head"]``).
    Timm attention fuses q, k and v into one ``qkv`` Linear, so LoRA targets ``["qkv"]``.
    """

    def __init__(self, backbone: nn.Module, num_labels: int) -> None:
        super().__init__()
        backbone.reset_classifier(0)  # the backbone now returns pooled features
        self.backbone = backbone
        width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.head = nn.Linear(width, num_labels)
        self.num_labels = num_labels

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        from transformers.modeling_outputs import SequenceClassifierOutput
        size = getattr(getattr(self.backbone, "patch_embed", None), "img_size", None)
        if size is not None and tuple(pixel_values.shape[-2:]) != tuple(size):  # e.g. CIFAR's 32 px for a 224 px ViT
            pixel_values = F.interpolate(pixel_values, size=tuple(size), mode="bilinear", align_corners=False)
        logits = self.head(self.backbone(pixel_values))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


# -------------------------------------------------------------------------------- pretraining
@dataclass(frozen=True)
class PretrainRecipe:
    """Everything that determines the pretrained weights (stored in meta.json)."""

    n_images: int = 30_000  # random (seeded) subset of the 30k train images of classes 0-4 (all of them)
    epochs: int = 15        # 7,035 steps; 6 epochs (protocol 2's backbone): 0.835 held-out, 1 epoch of 12k: 0.76
    batch_size: int = 64
    lr: float = 1e-3        # AdamW peak, linear warmup then cosine to 0
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    flip: bool = True       # random horizontal flips (clothes are left-right symmetric)
    shift: int = 2          # random translations of up to this many pixels (zero padding)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_images < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"n_images, epochs and batch_size must be >= 1, got {self}")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.warmup_frac < 1 and 0 <= self.shift < 14):
            raise ValueError(f"need lr > 0, weight_decay >= 0, 0 <= warmup_frac < 1, 0 <= shift < 14; got {self}")


def default_vit_dir() -> Path:
    """Where ``pretrain_vit`` caches vit-tiny-fmnist by default."""
    return cache_dir("models") / _NAME


def pretrain_vit(force: bool = False, *, n_images: int = PretrainRecipe.n_images,
                 epochs: int = PretrainRecipe.epochs, batch_size: int = PretrainRecipe.batch_size,
                 lr: float = PretrainRecipe.lr, flip: bool = PretrainRecipe.flip,
                 shift: int = PretrainRecipe.shift, seed: int = PretrainRecipe.seed,
                 n_test: int | None = None, out_dir: str | Path | None = None,
                 progress: bool = True) -> Path:
    """Pretrain vit-tiny-fmnist on Fashion-MNIST classes 0-4 once and return its directory.

    The directory holds ``model.safetensors`` (a timm ``VisionTransformer`` state dict with a 5-class
    head) and ``meta.json`` (recipe, architecture, test accuracy on classes 0-4, sha256, timings).
    Without ``out_dir`` and ``force``, the shipped weights (``SHIPPED_DIR``) answer the default recipe
    and the cache (``cache_dir("models") / "vit-tiny-fmnist"``) any other; ``force`` retrains into the
    cache (or ``out_dir``), never into the package. A directory is reused unless its recipe differs
    from the requested one, and written atomically (a temporary directory renamed into place), so an
    interrupted run never leaves a half-written model behind.

    Training is deterministic: seeded init, shuffling and augmentation, ``torch.use_deterministic_algorithms``,
    no dropout; the caller's RNG state and determinism setting are restored afterwards. Bit-for-bit
    equality is expected for the same torch build and thread count (both are in meta.json).
    ``n_images``/``epochs``/``n_test`` exist so tests can run a seconds-long version.
    """
    recipe = PretrainRecipe(n_images=n_images, epochs=epochs, batch_size=batch_size, lr=lr, flip=flip,
                            shift=shift, seed=seed)
    if out_dir is None and not force and _read_meta(SHIPPED_DIR, recipe) is not None:
        return SHIPPED_DIR
    out = Path(out_dir) if out_dir is not None else default_vit_dir()
    if not force and _read_meta(out, recipe) is not None:
        return out

    t0 = time.time()
    images, labels = read_fashion_mnist("train")
    test_images, test_labels = read_fashion_mnist("test")
    prev_det = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.use_deterministic_algorithms(True)
        try:
            model = _train(recipe, images, labels, progress)
            accuracy, n_eval = _evaluate(model, test_images, test_labels, n_test)
        finally:
            torch.use_deterministic_algorithms(prev_det)
    seconds = time.time() - t0
    log.info("vit-tiny-fmnist: test accuracy on classes 0-4 = %.4f (%d images), %.0f s", accuracy, n_eval, seconds)
    if progress:
        from tqdm.auto import tqdm
        tqdm.write(f"vit-tiny-fmnist: test accuracy on classes 0-4 = {accuracy:.4f} ({n_eval} images), {seconds:.0f} s")

    from safetensors.torch import save_file
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / _WEIGHTS))
        import timm
        meta = {
            "name": _NAME, "architecture": "timm.models.vision_transformer.VisionTransformer",
            "config": {**VIT_CONFIG, "num_classes": len(PRETRAIN_CLASSES)},
            "recipe": asdict(recipe), "seed": seed, "train_classes": list(PRETRAIN_CLASSES),
            "class_names": [FMNIST_CLASSES[c] for c in PRETRAIN_CLASSES],
            "test_accuracy": accuracy, "n_test": n_eval, "seconds": round(seconds, 1),
            "sha256": _sha256(tmp / _WEIGHTS), "torch": torch.__version__, "timm": timm.__version__,
            "num_threads": torch.get_num_threads(), "machine": platform.machine(),
            "normalisation": {"mean": FMNIST_MEAN, "std": FMNIST_STD},
        }
        (tmp / _META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _train(recipe: PretrainRecipe, images: torch.Tensor, labels: torch.Tensor, progress: bool) -> nn.Module:
    from tqdm.auto import tqdm
    keep = torch.isin(labels, torch.tensor(PRETRAIN_CLASSES)).nonzero().squeeze(1)
    g = torch.Generator().manual_seed(recipe.seed)
    subset = keep[torch.randperm(len(keep), generator=g)[: recipe.n_images]]
    x, y = to_pixel_values(images[subset]), labels[subset]

    torch.manual_seed(recipe.seed)
    model = build_vit(len(PRETRAIN_CLASSES)).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    steps_per_epoch = math.ceil(len(x) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    warmup = max(1, int(recipe.warmup_frac * total))
    bar = tqdm(total=total, desc="pretrain vit-tiny-fmnist", disable=not progress)
    step = 0
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), recipe.batch_size):
            idx = order[i: i + recipe.batch_size]
            lr = recipe.lr * (step + 1) / warmup if step < warmup else \
                recipe.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(model(_augment(x[idx], recipe, g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def _augment(x: torch.Tensor, recipe: PretrainRecipe, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to ``recipe.shift`` pixels, drawn from ``g``.

    x: normalised images [B, 1, 28, 28]; the pixels shifted in are black (0 before normalisation).
    """
    b, _, h, w = x.shape
    if recipe.flip:
        flip = torch.rand(b, generator=g) < 0.5                                # [B]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    s = recipe.shift
    if s:
        padded = F.pad(x, (s, s, s, s), value=-FMNIST_MEAN / FMNIST_STD)       # [B, 1, H+2s, W+2s]
        dy, dx = torch.randint(0, 2 * s + 1, (2, b), generator=g)              # [B] each
        rows = (dy[:, None] + torch.arange(h))[:, :, None]                     # [B, H, 1]
        cols = (dx[:, None] + torch.arange(w))[:, None, :]                     # [B, 1, W]
        x = padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)  # [B, 1, H, W]
    return x


@torch.no_grad()
def _evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              n_test: int | None) -> tuple[float, int]:
    keep = torch.isin(labels, torch.tensor(PRETRAIN_CLASSES)).nonzero().squeeze(1)[:n_test]
    correct = 0
    for i in range(0, len(keep), 500):
        idx = keep[i: i + 500]
        correct += (model(to_pixel_values(images[idx])).argmax(-1) == labels[idx]).sum().item()
    return correct / len(keep), len(keep)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_meta(path: Path, recipe: PretrainRecipe | None = None) -> dict | None:
    """meta.json of a complete cache entry (matching ``recipe`` if given), else None."""
    try:
        meta = json.loads((path / _META).read_text())
    except (OSError, ValueError):
        return None
    if not (path / _WEIGHTS).is_file():
        return None
    if recipe is not None and meta.get("recipe") != asdict(recipe):
        return None
    return meta


def _checked(path: str | Path | None) -> tuple[Path, dict]:
    """The directory (pretraining the default recipe first if needed) and its meta.json, after checking
    the weights file against the sha256 there, so a corrupted cache fails loudly."""
    path = Path(path) if path is not None else pretrain_vit()
    meta = _read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"no pretrained vit-tiny-fmnist under {path} (run structlora.repro.assets.vit.pretrain_vit())")
    digest = _sha256(path / _WEIGHTS)
    if digest != meta["sha256"]:
        raise ValueError(f"{path / _WEIGHTS} is corrupted (sha256 {digest} != {meta['sha256']} in meta.json); "
                         "rebuild it with structlora.repro.assets.vit.pretrain_vit(force=True)")
    return path, meta


def load_pretrained_vit(path: str | Path | None = None) -> tuple[nn.Module, dict]:
    """Load vit-tiny-fmnist (pretraining it first if needed); returns ``(VisionTransformer, meta)``."""
    from safetensors.torch import load_file
    path, meta = _checked(path)
    model = build_vit(meta["config"]["num_classes"])
    model.load_state_dict(load_file(str(path / _WEIGHTS)), strict=True)
    return model.eval(), meta


def weights_sha256(path: str | Path | None = None) -> str | None:
    """sha256 of the weights in ``path`` (default: the default recipe's shipped or cached weights),
    checked against the file: the backbone every vit-tiny-fmnist run records. None when the default
    recipe has not been pretrained here yet (this never pretrains)."""
    if path is None:
        recipe = PretrainRecipe()
        path = next((d for d in (SHIPPED_DIR, default_vit_dir()) if _read_meta(d, recipe) is not None), None)
        if path is None:
            return None
    return _checked(path)[1]["sha256"]


def main(argv: list[str] | None = None) -> int:
    """``python -m structlora.repro.assets.vit [--out DIR]``: retrain the default recipe (progress bar),
    print where it went, its held-out accuracy and sha256. To refresh the shipped weights, pass
    ``--out structlora/repro/assets/vit-tiny-fmnist``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m structlora.repro.assets.vit", description=main.__doc__)
    ap.add_argument("--out", default=None, help="output directory (default: the cache)")
    args = ap.parse_args(argv)
    out = pretrain_vit(force=True, out_dir=args.out)
    meta = _read_meta(out)
    print(f"{out}: held-out accuracy {meta['test_accuracy']:.4f} on {meta['n_test']} images, "
          f"sha256 {meta['sha256']}, {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

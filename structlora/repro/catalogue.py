"""One catalogue of the compared methods and the tasks: each described ONCE, every table derived.

A method is one `MethodSpec` (`register_method`, in `structlora.repro.methods.specs`), a task one
`TaskSpec` (`register_task`, in `structlora.repro.assets.tasks`). The tables that other modules read
are views computed from here on every access, so a method or task registered later (a test's toy one)
appears in all of them at once:

===============================  =====================================================================
view                              derived from
===============================  =====================================================================
``paper.TABLE1`` / ``TABLE2``      `MethodSpec.table1` / ``table2`` (the paper's Tables 1 and 2 rows)
``paper.TABLE1_TYPES``             `MethodSpec.table1_type` (Table 1's "Type" column)
``paper.METHOD_LABELS``            `MethodSpec.label`
``main_results.PAPER_METHODS``     `MethodSpec.paper_row` (Tables 1-2 and 11-12's rows, catalogue order)
``registry.BUDGET_POLICY``         `MethodSpec.budget` (Table 12's budget matching)
``notebook.STRUCTLORA_FAMILY``     `MethodSpec.lr_from` (the variants that train at StructLoRA's rate)
``tasks.NUM_CLASSES``, ``_TASKS``  `TaskSpec.num_classes`, ``kind``/``model_kind``/``loader``/``labels``
``tasks.list_tasks()``             the tasks whose `TaskSpec.hub` is None (they load offline)
``tasks.HUB_TASKS``                `TaskSpec.hub` (the tasks that load from the Hugging Face hub, online only)
``notebook.TASK_MODEL``            `TaskSpec.model` of the offline tasks (a tier's budget may name others)
``main_results.MODEL_KIND``        `TaskSpec.model` -> `TaskSpec.model_kind`
``paper.PAPER_TASK``               `TaskSpec.paper` (the paper table -> column the task stands in for)
``paper.MAIN_TABLE``               `TaskSpec.main_table` (Table 1 or 2)
``paper.ABLATION_COL``             `TaskSpec.ablation_col` (the column of Tables 3-6 and 9)
===============================  =====================================================================

This module imports no method and no task (they import it); `structlora.repro.methods` and
`structlora.repro.assets.tasks` register theirs when imported.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from .assets.models import KINDS  # the model kinds load_model loads: defined there, once

if TYPE_CHECKING:  # pragma: no cover
    from .methods.base import BuildContext, MethodHandle

__all__ = [
    "DATA_KINDS", "KINDS", "NEEDS", "SOURCES", "MethodSpec", "TaskSpec", "LiveMap", "LiveSeq",
    "get_method", "get_task", "method_specs", "method_view", "register_method", "register_task",
    "task_specs", "task_view", "unregister_method", "unregister_task",
]

DATA_KINDS: tuple[str, ...] = ("seq-cls", "multiple-choice", "image-cls")  # how a task's rows look (`TaskData.kind`)
SOURCES: tuple[str, ...] = ("peft", "own", "structlora", "skipped")
NEEDS: tuple[str, ...] = ("total_steps", "calibration_batches", "bitsandbytes")
_BUDGETS = ("matched", "same-rank")


def _frozen(mapping: Mapping[Any, Any] | None) -> Mapping[Any, Any] | None:
    return None if mapping is None else MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class MethodSpec:
    """One compared method: how it is built, where it comes from, how it is budgeted, its paper rows."""

    name: str                        # the registry key: run records, params files and tables name it so
    builder: Callable[[BuildContext], MethodHandle]  # builds it on a copy of the model (methods.base)
    source: str                      # who implements it: peft, own, structlora (this paper) or skipped
    citation: str                    # the work it comes from, as the paper's tables cite it
    label: str                       # display name in tables and figures (the paper's spelling)
    kinds: tuple[str, ...] = KINDS   # model kinds it can adapt; another kind is a ValueError before any work
    unsupported: str = ""            # why not on the other kinds (the ValueError's message; "" = generic)
    skipped: Mapping[str, str] = field(default_factory=dict)  # kind -> why it cannot run here (MethodSkipped)
    budget: str = "same-rank"        # Table 12: "matched" to LoRA, "same-rank" LoRA variant, or "exempt: why"
    lr_from: str | None = None       # the method whose frozen learning rate it trains at (StructLoRA's family)
    needs: tuple[str, ...] = ()      # what build_method must get: total_steps, calibration_batches, bitsandbytes
    calibration_batches: int = 0     # train batches a run hands to the build (Sensitivity-LoRA's calibration)
    config: Mapping[str, Any] = field(default_factory=dict)  # config beyond the run spec (stored in records)
    paper_row: bool = False          # a row of the paper's main comparison (Tables 1-2, 11-12)
    table1: Mapping[str, float] | None = None  # its Table 1 row: paper column -> value
    table1_type: str | None = None   # Table 1's "Type" column (Additive, Reparam., ...)
    table2: Mapping[str, float] | None = None  # its Table 2 (GLUE) row: paper column -> value

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"MethodSpec.name must be a non-empty string, got {self.name!r}")
        if not callable(self.builder):
            raise ValueError(f"{self.name}: builder must be callable")
        if self.source not in SOURCES:
            raise ValueError(f"{self.name}: source {self.source!r} is not one of {SOURCES}")
        if not self.citation or not self.label:
            raise ValueError(f"{self.name}: citation and label are required")
        if not self.kinds or not set(self.kinds) <= set(KINDS):
            raise ValueError(f"{self.name}: kinds {self.kinds!r} must be a non-empty subset of {KINDS}")
        if not set(self.skipped) <= set(self.kinds) or not all(self.skipped.values()):
            raise ValueError(f"{self.name}: skipped must map supported kinds to a reason, got {dict(self.skipped)}")
        if self.budget not in _BUDGETS and not self.budget.startswith("exempt: "):
            raise ValueError(f"{self.name}: budget {self.budget!r} is not matched, same-rank or 'exempt: <why>'")
        if not set(self.needs) <= set(NEEDS):
            raise ValueError(f"{self.name}: needs {self.needs!r} must be among {NEEDS}")
        if (self.calibration_batches > 0) != ("calibration_batches" in self.needs):
            raise ValueError(f"{self.name}: calibration_batches > 0 exactly when needs has 'calibration_batches'")
        if (self.table1 is None) != (self.table1_type is None):
            raise ValueError(f"{self.name}: a Table 1 row needs its type, and a type its row")
        if (self.table1 is not None or self.table2 is not None) and not self.paper_row:
            raise ValueError(f"{self.name}: a method with Table 1/2 values is a paper_row")
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "needs", tuple(self.needs))
        object.__setattr__(self, "skipped", _frozen(self.skipped))
        object.__setattr__(self, "config", _frozen(self.config))
        object.__setattr__(self, "table1", _frozen(self.table1))
        object.__setattr__(self, "table2", _frozen(self.table2))


@dataclass(frozen=True)
class TaskSpec:
    """One task: its data, the model that trains it, and the paper column it stands in for."""

    name: str                        # the task id: run records, params files and tables name it so
    kind: str                        # how its rows look: seq-cls, multiple-choice (LM-scored), image-cls
    model_kind: str                  # the kind of model that trains it (one of KINDS)
    loader: Callable[[], tuple[dict, str, dict]]  # () -> (train/validation/test splits, source, split stats)
    num_classes: int                 # classes (answer options), known without loading the data
    labels: tuple[str, ...] | None = None  # class names; None = the train split's ClassLabel names
    model: str | None = None         # the model that trains it by default: the offline stand-in, or (hub) the paper's
    paper: Mapping[int, str] = field(default_factory=dict)  # paper table -> the column it stands in for
    main_table: int | None = None    # the main-results table (1 or 2) its StructLoRA - LoRA gap is compared with
    ablation_col: str | None = None  # the column of Tables 3-6 and 9 its rank/few-shot/ablation gaps meet
    hub: str | None = None           # the Hugging Face hub data set its loader downloads (online only); None: offline
    pair: bool = False               # its rows carry a second text (``text_pair``: GLUE's sentence-pair tasks)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"TaskSpec.name must be a non-empty string, got {self.name!r}")
        if self.kind not in DATA_KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {DATA_KINDS}")
        if self.model_kind not in KINDS:
            raise ValueError(f"{self.name}: model_kind {self.model_kind!r} is not one of {KINDS}")
        if not callable(self.loader):
            raise ValueError(f"{self.name}: loader must be callable")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"{self.name}: num_classes must be an int >= 2, got {self.num_classes!r}")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {self.num_classes} classes")
        if self.main_table is not None and self.main_table not in self.paper:
            raise ValueError(f"{self.name}: main_table {self.main_table} has no column in paper {dict(self.paper)}")
        if (self.main_table is not None or self.ablation_col is not None) and self.model is None:
            raise ValueError(f"{self.name}: a task compared with the paper needs its model")
        if self.pair and self.kind != "seq-cls":
            raise ValueError(f"{self.name}: only a seq-cls task has a text_pair, not a {self.kind} task")
        if self.hub is not None and (not isinstance(self.hub, str) or not self.hub):
            raise ValueError(f"{self.name}: hub must be a hub data set id or None, got {self.hub!r}")
        object.__setattr__(self, "labels", None if self.labels is None else tuple(self.labels))
        object.__setattr__(self, "paper", _frozen(self.paper))


# ------------------------------------------------------------------------------------------- registries
_METHODS: dict[str, MethodSpec] = {}
_TASKS: dict[str, TaskSpec] = {}


def _add(table: dict[str, Any], spec: Any, cls: type) -> Any:
    if not isinstance(spec, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(spec).__name__}")
    if spec.name in table:
        raise ValueError(f"{cls.__name__} {spec.name!r} is already registered")
    table[spec.name] = spec
    return spec


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the catalogue (its name must be new, its ``lr_from`` registered); returns ``spec``."""
    if getattr(spec, "lr_from", None) is not None and spec.lr_from not in _METHODS:
        raise ValueError(f"{spec.name}: lr_from {spec.lr_from!r} is not a registered method")
    return _add(_METHODS, spec, MethodSpec)


def unregister_method(name: str) -> MethodSpec:
    """Remove a method (tests that register a toy one); returns its spec."""
    return _METHODS.pop(name)


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task to the catalogue (its name must be new); returns ``spec``."""
    return _add(_TASKS, spec, TaskSpec)


def unregister_task(name: str) -> TaskSpec:
    """Remove a task (tests that register a toy one); returns its spec."""
    return _TASKS.pop(name)


def get_method(name: str) -> MethodSpec:
    """The spec of a registered method; ValueError naming the known ones otherwise."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_METHODS)}")
    return _METHODS[name]


def get_task(name: str) -> TaskSpec:
    """The spec of a registered task; ValueError naming the known ones otherwise."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(_TASKS)}")
    return _TASKS[name]


def method_specs() -> list[MethodSpec]:
    """Every registered method, in registration order (the paper's order of Tables 1-2 first)."""
    return list(_METHODS.values())


def task_specs() -> list[TaskSpec]:
    """Every registered task, in registration order."""
    return list(_TASKS.values())


# ---------------------------------------------------------------------------------------------- views
K = TypeVar("K")
V = TypeVar("V")


class LiveMap(Mapping[K, V]):
    """A read-only mapping recomputed from the catalogue on every access (so it never goes stale)."""

    def __init__(self, compute: Callable[[], dict[K, V]], doc: str = "") -> None:
        self._compute = compute
        self.__doc__ = doc or compute.__doc__

    def __getitem__(self, key: K) -> V:
        return self._compute()[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._compute())

    def __len__(self) -> int:
        return len(self._compute())

    def __contains__(self, key: object) -> bool:
        return key in self._compute()

    def __repr__(self) -> str:
        return repr(self._compute())

    def copy(self) -> dict[K, V]:
        """A plain dict of the current values."""
        return dict(self._compute())


class LiveSeq(Sequence[V]):
    """A read-only sequence recomputed from the catalogue on every access; equal to a tuple of the same items."""

    def __init__(self, compute: Callable[[], tuple[V, ...]], doc: str = "") -> None:
        self._compute = compute
        self.__doc__ = doc or compute.__doc__

    def __getitem__(self, index):  # type: ignore[override]
        return self._compute()[index]

    def __len__(self) -> int:
        return len(self._compute())

    def __contains__(self, item: object) -> bool:
        return item in self._compute()

    def __iter__(self) -> Iterator[V]:
        return iter(self._compute())

    def __eq__(self, other: object) -> bool:
        return tuple(self._compute()) == (tuple(other) if isinstance(other, Sequence) else other)

    def __hash__(self) -> int:
        return hash(self._compute())

    def __repr__(self) -> str:
        return repr(self._compute())


def method_view(value: Callable[[MethodSpec], Any], keep: Callable[[MethodSpec], bool] = lambda s: True,
                doc: str = "") -> LiveMap[str, Any]:
    """``{spec.name: value(spec)}`` over the methods that ``keep``, live."""
    return LiveMap(lambda: {s.name: value(s) for s in _METHODS.values() if keep(s)}, doc)


def task_view(value: Callable[[TaskSpec], Any], keep: Callable[[TaskSpec], bool] = lambda s: True,
              doc: str = "") -> LiveMap[str, Any]:
    """``{spec.name: value(spec)}`` over the tasks that ``keep``, live."""
    return LiveMap(lambda: {s.name: value(s) for s in _TASKS.values() if keep(s)}, doc)

"""The catalogue (structlora.repro.catalogue): one MethodSpec per method, one TaskSpec per task, and every
table derived from them. A toy method and a toy task registered HERE, in one place, appear in every
table the catalogue feeds (registry, labels, budget policy, paper rows, learning-rate inheritance, the
main-results scope, its grid, its notebook table and its claims ledger) and leave them when unregistered."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from structlora.repro import catalogue, main_results, methods, notebook, paper
from structlora.repro.assets import tasks
from structlora.repro.catalogue import MethodSpec, TaskSpec, get_method, method_specs, task_specs
from structlora.repro.claims import write_claims
from structlora.repro.grid import RunSpec
from structlora.repro.methods.peft_methods import build_lora
from structlora.repro.stats import summarize

TOY_METHOD = "toy_lora"
TOY_TASK = "toy-sst2"
_TOY_T1 = {"boolq": 70.0, "piqa": 71.0, "cifar100": 72.0, "imagenet1k": 73.0, "coco_caption": 100.0, "vqav2": 74.0}
_TOY_T2 = {"mnli": 80.0, "sst2": 99.0, "mrpc": 81.0, "cola": 50.0, "qnli": 82.0, "qqp": 83.0, "rte": 70.0,
           "stsb": 84.0, "average": 77.4}


def _toy_loader() -> tuple[dict, str, dict]:
    import datasets

    label = datasets.ClassLabel(names=["neg", "pos"])

    def split(n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"text": [f"example {i}" for i in range(n)], "label": [i % 2 for i in range(n)],
             "_source_index": list(range(n))},
            features=datasets.Features({"text": datasets.Value("string"), "label": label,
                                        "_source_index": datasets.Value("int64")}))

    return {"train": split(8), "validation": split(4), "test": split(4)}, "toy rows", {}


TOY_METHOD_SPEC = MethodSpec(
    TOY_METHOD, build_lora, "own", "a test's toy method", "Toy LoRA", kinds=("seq-cls",),
    budget="exempt: a toy", lr_from="structlora", config={"toy_option": 1}, paper_row=True,
    table1=_TOY_T1, table1_type="Toy", table2=_TOY_T2)
TOY_TASK_SPEC = TaskSpec(TOY_TASK, "seq-cls", "seq-cls", _toy_loader, 2, model="minilm-l6", paper={2: "sst2"},
                         main_table=2, ablation_col="boolq")


@pytest.fixture
def toy_catalogue():
    """Register the toy method and task for one test; the catalogue is restored afterwards."""
    catalogue.register_method(TOY_METHOD_SPEC)
    catalogue.register_task(TOY_TASK_SPEC)
    try:
        yield
    finally:
        catalogue.unregister_method(TOY_METHOD)
        catalogue.unregister_task(TOY_TASK)


def _where_it_appears() -> dict[str, bool]:
    """Every table the catalogue feeds: does the toy method / task appear in it?"""
    return {
        "list_methods": TOY_METHOD in methods.list_methods(),
        "describe_methods": TOY_METHOD in set(methods.describe_methods()["method"]),
        "BUDGET_POLICY": TOY_METHOD in methods.BUDGET_POLICY,
        "TABLE1": TOY_METHOD in paper.TABLE1, "TABLE1_TYPES": TOY_METHOD in paper.TABLE1_TYPES,
        "TABLE2": TOY_METHOD in paper.TABLE2, "METHOD_LABELS": TOY_METHOD in paper.METHOD_LABELS,
        "PAPER_METHODS": TOY_METHOD in main_results.PAPER_METHODS, "in_scope": TOY_METHOD in main_results.in_scope(),
        "STRUCTLORA_FAMILY": TOY_METHOD in notebook.STRUCTLORA_FAMILY,
        "list_tasks": TOY_TASK in tasks.list_tasks(), "NUM_CLASSES": TOY_TASK in tasks.NUM_CLASSES,
        "_TASKS": TOY_TASK in tasks._TASKS, "TASK_MODEL": TOY_TASK in notebook.TASK_MODEL,
        "PAPER_TASK": TOY_TASK in paper.PAPER_TASK, "MAIN_TABLE": TOY_TASK in paper.MAIN_TABLE,
        "ABLATION_COL": TOY_TASK in paper.ABLATION_COL,
    }


def _main_runs() -> pd.DataFrame:
    """Four seeds of LoRA, StructLoRA and the toy method on the toy task (the toy best on validation)."""
    rows = []
    for seed in range(4):
        for m, test, val in (("lora", 85.0, 0.80), ("structlora", 86.0 + 0.1 * seed, 0.81), (TOY_METHOD, 84.0, 0.9)):
            rows.append({"task": TOY_TASK, "method": m, "seed": seed, "acc": test + 0.3 * (seed % 2),
                         "val_accuracy": val, "single_class": False})
    return pd.DataFrame(rows)


def test_a_toy_method_and_task_flow_into_every_table_and_leave_with_them(toy_catalogue, tmp_path):
    assert all(_where_it_appears().values()), _where_it_appears()
    # values, not only names
    assert methods.BUDGET_POLICY[TOY_METHOD] == "exempt: a toy"
    assert methods.method_defaults(TOY_METHOD) == {"toy_option": 1}
    assert paper.TABLE1[TOY_METHOD] == _TOY_T1 and paper.TABLE2[TOY_METHOD] == _TOY_T2
    assert paper.METHOD_LABELS[TOY_METHOD] == "Toy LoRA" and paper.TABLE1_TYPES[TOY_METHOD] == "Toy"
    assert paper.paper_value(2, TOY_METHOD, TOY_TASK) == 99.0          # through PAPER_TASK: toy-sst2 -> sst2
    assert paper.paper_diff(2, TOY_TASK) == 1.5 and paper.ABLATION_COL[TOY_TASK] == "boolq"
    assert tasks.NUM_CLASSES[TOY_TASK] == 2 and notebook.TASK_MODEL[TOY_TASK] == "minilm-l6"
    assert main_results.MODEL_KIND["minilm-l6"] == "seq-cls"
    assert main_results.applies(TOY_TASK, TOY_METHOD) and not main_results.applies("boolq", TOY_METHOD)
    assert f"{TOY_METHOD} on boolq" in "\n".join(main_results.not_applicable())
    data = tasks.load_task(TOY_TASK)
    assert data.labels == ["neg", "pos"] and data.model_kind == "seq-cls" and len(data.train) == 8
    # the learning rate is StructLoRA's (lr_from), on every model of the cpu tier's budget
    budget = notebook.load_budget("cpu")
    assert all(budget.lr_of(m, TOY_METHOD) == budget.lr_of(m, "structlora") for m in budget.models)
    # a grid: the main-results grid of a tier's parameters, and a run spec with the tier's budget
    params = {"TASKS": [TOY_TASK], "METHODS": ["lora", "structlora", TOY_METHOD], "TASK_METHODS": {},
              "SEEDS": [0, 1], "TASK_SEEDS": {}, "RANK": 8}
    assert {"task": TOY_TASK, "method": TOY_METHOD, "seeds": 2} in main_results.grid_of(params)
    model = notebook.TASK_MODEL[TOY_TASK]
    spec = RunSpec.make(TOY_TASK, model, TOY_METHOD, **budget.run(model, TOY_METHOD))
    assert spec.lr == budget.lr_of(model, "structlora") and spec.key().startswith(f"{TOY_TASK}-{model}-{TOY_METHOD}-")
    # a notebook table (01's side by side) and the claims ledger
    runs = _main_runs()
    side = main_results.side_by_side(summarize(runs, metric="acc", by=("task", "method"), digits=1), [TOY_TASK])
    assert side.loc[TOY_METHOD, (TOY_TASK, "paper")] == 99.0
    claims = {c.claim_id: c for c in main_results.main_claims(runs, [TOY_TASK], "01", "smoke", seeds_cap=10)}
    best = claims[f"T2.{TOY_TASK}.structlora_best_peft"]
    assert f"({TOY_METHOD})" in best.claim and "Toy LoRA" in best.paper_value and best.paper_diff == -4.0
    ledger = write_claims("01", "smoke", claims.values(), root=tmp_path).read_text()
    assert f"T2.{TOY_TASK}.structlora>lora" in ledger and TOY_METHOD in ledger
    # the toy method builds through the registry like any other (its builder, its defaults)
    assert TOY_METHOD in [s.name for s in method_specs()] and TOY_TASK in [t.name for t in task_specs()]


def test_unregistering_restores_every_table():
    before = _where_it_appears()
    assert not any(before.values()), before
    catalogue.register_method(TOY_METHOD_SPEC)
    catalogue.register_task(TOY_TASK_SPEC)
    catalogue.unregister_method(TOY_METHOD)
    catalogue.unregister_task(TOY_TASK)
    assert _where_it_appears() == before


def test_a_name_registers_once(toy_catalogue):
    with pytest.raises(ValueError, match="already registered"):
        catalogue.register_method(TOY_METHOD_SPEC)
    with pytest.raises(ValueError, match="already registered"):
        catalogue.register_task(TOY_TASK_SPEC)
    with pytest.raises(ValueError, match="lr_from"):
        catalogue.register_method(dataclasses.replace(TOY_METHOD_SPEC, name="toy2", lr_from="no_such_method"))
    with pytest.raises(TypeError):
        catalogue.register_method({"name": "toy3"})  # type: ignore[arg-type]


@pytest.mark.parametrize("change,match", [
    ({"name": ""}, "name"),
    ({"builder": None}, "callable"),
    ({"source": "elsewhere"}, "source"),
    ({"label": ""}, "label"),
    ({"kinds": ("seq-cls", "audio")}, "kinds"),
    ({"kinds": ()}, "kinds"),
    ({"skipped": {"causal-lm": "why"}}, "skipped"),       # a kind it does not support
    ({"skipped": {"seq-cls": ""}}, "skipped"),            # no reason
    ({"budget": "sometimes"}, "budget"),
    ({"needs": ("gpu",)}, "needs"),
    ({"calibration_batches": 4}, "calibration_batches"),  # without needs=("calibration_batches",)
    ({"table1_type": None}, "Table 1"),
    ({"paper_row": False}, "paper_row"),
])
def test_method_spec_validates_its_fields(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TOY_METHOD_SPEC, **change)


@pytest.mark.parametrize("change,match", [
    ({"name": ""}, "name"),
    ({"kind": "audio"}, "kind"),
    ({"model_kind": "multiple-choice"}, "model_kind"),
    ({"loader": None}, "loader"),
    ({"num_classes": 1}, "num_classes"),
    ({"labels": ("a", "b", "c")}, "labels"),
    ({"main_table": 1}, "main_table"),                    # no Table 1 column in paper={2: ...}
    ({"model": None}, "model"),                           # compared with the paper without a model
])
def test_task_spec_validates_its_fields(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TOY_TASK_SPEC, **change)


def test_specs_are_read_only():
    spec = get_method("structlora")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.label = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.config["gate"] = None  # type: ignore[index]
    assert methods.method_defaults("structlora") is not methods.method_defaults("structlora")  # copies


# ---------------------------------------------------------------------------------- the real catalogue
@pytest.mark.parametrize("spec", method_specs(), ids=lambda s: s.name)
def test_every_method_spec_is_consistent_with_the_paper_tables(spec: MethodSpec):
    if spec.table1 is not None:
        assert tuple(spec.table1) == paper.TABLE1_COLUMNS
    if spec.table2 is not None:
        assert tuple(spec.table2) == paper.TABLE2_COLUMNS
    if spec.lr_from is not None:
        assert get_method(spec.lr_from).lr_from is None      # one hop: the family inherits StructLoRA's rate
    if spec.name.endswith("+structlora"):                    # the meta-adapters build the full method
        assert spec.config == get_method("structlora").config


@pytest.mark.parametrize("spec", task_specs(), ids=lambda t: t.name)
def test_every_task_spec_names_a_model_of_its_kind_and_a_paper_column(spec: TaskSpec):
    if spec.model is not None:
        assert main_results.MODEL_KIND[spec.model] == spec.model_kind
    if spec.main_table is not None:
        columns = paper.TABLE1_COLUMNS if spec.main_table == 1 else paper.TABLE2_COLUMNS
        assert spec.paper[spec.main_table] in columns
    if spec.ablation_col is not None:
        assert spec.ablation_col in paper.COLUMN_LABEL


def test_every_tier_budget_gives_the_family_structloras_rate():
    """The learning rate a spec gets is unchanged by the catalogue: a method's own rate when the budget
    has one, else that of the method it inherits from (StructLoRA's family), else the model default."""
    for tier in ("cpu", "gpu", "smoke"):
        budget = notebook.load_budget(tier)
        for model, table in budget.lr.items():
            for spec in method_specs():
                expected = table.get(spec.name, table.get(spec.lr_from or "", table["default"]))
                assert budget.lr_of(model, spec.name) == float(expected), (tier, model, spec.name)
            assert budget.lr_of(model, "not_a_method") == float(table["default"])


def test_the_paper_tiers_hub_tasks_are_task_specs_that_load_online_only(monkeypatch):
    """Issue 22: adding a task is one TaskSpec, hub tasks included. The paper tier's GLUE and CIFAR-100 tasks
    are registered with their kind, classes, model and paper column; they are in every table but the offline
    ones (``list_tasks``, ``TASK_MODEL``), and loading one offline names the switch."""
    assert dict(tasks.HUB_TASKS) == {**{f"glue/{c}": "nyu-mll/glue" for c in
                                       ("sst2", "mrpc", "rte", "cola", "qnli", "qqp", "mnli")},
                                    "cifar100": "uoft-cs/cifar100"}
    assert not set(tasks.HUB_TASKS) & set(tasks.list_tasks()) and not set(tasks.HUB_TASKS) & set(notebook.TASK_MODEL)
    budget = notebook.load_budget("paper")
    for name in budget.task_model:          # every task of the paper tier is in the catalogue, of its model's kind
        spec = catalogue.get_task(name)
        assert spec.main_table is not None and tasks.NUM_CLASSES[name] == spec.num_classes
    assert tasks.NUM_CLASSES["glue/mnli"] == 3 and tasks.NUM_CLASSES["cifar100"] == 100
    assert set(tasks.PAIRED) == {"mrpc", "rte", "glue/mrpc", "glue/rte", "glue/qnli", "glue/qqp", "glue/mnli"}
    with pytest.raises(ValueError, match="text_pair"):
        catalogue.TaskSpec("x", "image-cls", "image-cls", lambda: None, 2, pair=True)
    assert paper.MAIN_TABLE["glue/rte"] == 2 and paper.paper_diff(2, "glue/rte") == paper.paper_diff(2, "rte")
    assert paper.ABLATION_COL["cifar100"] == "cifar100" and main_results.MODEL_KIND["vit_base_patch16_224"] == "image-cls"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("glue/cola", "cifar100"):
        with pytest.raises(RuntimeError, match="needs the Hugging Face hub"):
            tasks.load_task(name)
    with pytest.raises(ValueError, match="hub"):
        dataclasses.replace(catalogue.get_task("cifar100"), hub="")

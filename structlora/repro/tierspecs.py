"""Every run a tier asks for, from its params files alone (no notebook executed): what the paper tier's
dry run builds and what ``reproduce --tier <tier> --list-pending`` hands to ``--train-pending``.

The notebooks build the same specs in their spec cells (01: tasks x methods x seeds where the method
applies to the model's kind; 02/03: `sweeps.sweep_specs`; 04: `ablations.variants` of each task's groups;
05: the filters at the tier's keep ratio and their LoRA reference; 06 reuses 01's runs), with the model of
each task from the tier's budget (``Budget.task_model``: the offline stand-ins, or the paper tier's hub ids).
This mirrors the notebooks' spec cells (a second copy of that logic: keep them in step);
`tests/test_dryrun.py` checks the smoke tier's counts against what its notebooks print.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .assets.tasks import task_kind
from .grid import RunSpec

__all__ = ["probe_specs", "task_kind", "tier_probes", "tier_specs"]


def _main_results(p: Mapping[str, Any], budget: Any, plan: Any) -> list[RunSpec]:
    from .catalogue import get_method
    from .main_results import in_scope, seeds_of

    scope = set(in_scope())
    out = []
    for t in p["TASKS"]:
        model = budget.task_model[t]
        for m in p["TASK_METHODS"].get(t, p["METHODS"]):
            if m in scope and task_kind(t) in get_method(m).kinds:
                kw = plan.run(t, budget.run(model, m)) if plan is not None else budget.run(model, m)
                out += [RunSpec(task=t, model=model, method=m, rank=p["RANK"], seed=s, fraction=1.0, **kw)
                        for s in seeds_of(p, t, m, plan)]
    return out


def _sweep(axis: str, values_key: str):
    def build(p: Mapping[str, Any], budget: Any, plan: Any) -> list[RunSpec]:
        from . import sweeps

        return sweeps.sweep_specs(getattr(sweeps, axis), p["TASKS"], p[values_key], budget, p["SEEDS"], plan)
    return build


def _ablations(p: Mapping[str, Any], budget: Any, plan: Any) -> list[RunSpec]:
    from .ablations import GROUPS, ORDER, variants

    out = []
    for t, groups in p["TASKS"].items():
        model = budget.task_model[t]
        for v in (v for v in ORDER if any(v in GROUPS[g] for g in groups)):
            method, kw = variants(p["PENALTY_WEIGHT"])[v]
            seeds = p["SEEDS_BY_VARIANT"].get(v, p["SEEDS_BY_MODEL"].get(model, p["SEEDS"]))
            out += [RunSpec.make(t, model, method, rank=p["RANK"], seed=s, fraction=1.0, **budget.run(model, method),
                                 **kw) for s in seeds]
    return out


def _filter_spec(p: Mapping[str, Any], budget: Any, task: str, method: str, seed: int) -> RunSpec:
    model = budget.task_model[task]
    kw = {"keep_ratio": p["KEEP_RATIO"], **p["FILTER_OPTIONS"]} if method.startswith("filter_") else {}
    return RunSpec.make(task, model, method, rank=p["RANK"], seed=seed, fraction=1.0, **budget.run(model, method), **kw)


def _filters(p: Mapping[str, Any], budget: Any, plan: Any) -> list[RunSpec]:
    out = []
    for t in p["TASKS"]:
        model = budget.task_model[t]
        for m in list(p["STRATEGIES"]) + list(p["REFERENCE"]):
            seeds = p["SEEDS_BY_METHOD"].get(m, p["SEEDS_BY_MODEL"].get(model, p["SEEDS"]))
            out += [_filter_spec(p, budget, t, m, s) for s in seeds]
    return out


def probe_specs(p: Mapping[str, Any], budget: Any) -> list[RunSpec]:
    """Notebook 05's probed models (``PROBE_METHODS`` at ``PROBE_SEED`` on the first of ``TASKS``): runs
    that must also keep their trained weights (the direction-removal probe reads them)."""
    if not p.get("TASKS"):
        return []
    return [_filter_spec(p, budget, p["TASKS"][0], m, p["PROBE_SEED"]) for m in p.get("PROBE_METHODS", [])]


def tier_probes(tier: str, root: str | Path | None = None) -> list[RunSpec]:
    """The tier's probed models (notebook 05's `probe_specs`): trained with their weights kept."""
    from .notebook import load_budget, tier_params

    params = tier_params("05_filter_strategies", tier, root)
    return probe_specs(params, load_budget(tier, root)) if params else []


_BUILDERS = {"01_main_results": _main_results, "02_rank_sweep": _sweep("RANK", "RANKS"),
             "03_few_shot": _sweep("FRACTION", "FRACTIONS"), "04_ablations": _ablations,
             "05_filter_strategies": _filters}


def tier_specs(tier: str, root: str | Path | None = None) -> dict[str, list[RunSpec]]:
    """``{notebook: [RunSpec, ...]}`` of the notebooks that train (01-05; 06 reuses 01's runs), from
    ``params/<tier>/`` (the cpu tier: the notebooks' parameters cells) and the tier's plan."""
    from .notebook import load_budget, tier_params
    from .plan import load_plan

    budget, plan = load_budget(tier, root), load_plan(tier, root)
    out = {}
    for stem, build in _BUILDERS.items():
        params = tier_params(stem, tier, root)
        if params is None:
            raise FileNotFoundError(f"no parameters of {stem} for tier {tier!r}")
        out[stem] = build(params, budget, plan)
    return out

"""The paper tier's notebooks execute (issue 24: one GPU box runs ``reproduce --tier paper``).

Each of notebooks 01-05 runs through papermill (`reproduce.run_all`) with ``params/paper/``, records-only
(``TRAIN = False``) and offline, in a checkout whose results folder is EMPTY: it must complete, take each
task's model from the paper tier's budget (RoBERTa-base, TinyLlama, ViT-B/16: ``Budget.task_model``), list
its runs as pending for ``--train-pending``, write no record, and report every claim as pending: no verdict
is drawn without data. 01 runs in the default suite (~1 min: mostly the kernel's imports); 02-05 are ``slow``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEMS = ("01_main_results", "02_rank_sweep", "03_few_shot", "04_ablations", "05_filter_strategies")
FAST = "01_main_results"   # the one in the default suite: the main results, every hub task of the tier


def _empty_checkout(folder: Path) -> Path:
    """A checkout of this repository (its notebooks, package and params, linked) with no results at all."""
    for name in ("notebooks", "structlora", "params"):
        (folder / name).symlink_to(ROOT / name, target_is_directory=True)
    (folder / "results").mkdir()
    return folder


@pytest.mark.parametrize("stem", [pytest.param(s, marks=() if s == FAST else pytest.mark.slow) for s in STEMS])
def test_paper_tier_notebook_runs_records_only_and_draws_no_verdict(stem, tmp_path, monkeypatch):
    pytest.importorskip("papermill")
    from structlora.repro.claims import read_claims
    from structlora.repro.notebook import load_budget
    from structlora.repro.reproduce import pending_path, read_pending, run_all

    root = _empty_checkout(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")           # nothing is downloaded: no model, no data set
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))         # the kernel imports this checkout's structlora
    assert run_all("paper", only=[stem], root=root, ledger=False, force=True, records_only=True) == 0

    executed = json.loads((root / "results" / "executed" / f"{stem}.paper.ipynb").read_text(encoding="utf-8"))
    marker = executed["metadata"]["structlora"]
    assert (marker["tier"], marker["status"]) == ("paper", "records-only")
    claims = read_claims(root / "results", tier="paper")
    assert len(claims) and set(claims["notebook"]) == {stem}
    assert set(claims["verdict"]) == {"pending"}, claims[["claim_id", "verdict"]].to_string()
    assert claims["ours_value"].isna().all()
    # the runs it asked for are listed for --train-pending, each on the paper tier's model of its task
    task_model = load_budget("paper", root).task_model
    pending = read_pending(pending_path("paper", root))
    assert pending and all(spec.model == task_model[spec.task] for spec, _, _ in pending)
    assert not list((root / "results").glob("runs/**/*.json")), "records-only wrote a run record"

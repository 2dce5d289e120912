"""The job's modes travel as parameters, never as environment variables or globals: ``reproduce``
injects ``TRAIN`` / ``PENDING_FILE`` / ``RETRAIN_SINCE`` into the notebooks that declare them (papermill
parameters), does the same from the tier's specs for the others, and keeps the job-only parameters out
of the executed copies' metadata."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jupytext
import nbformat
import pytest

from structlora.repro import reproduce


def _repo(tmp_path: Path, declared: dict[str, str]) -> Path:
    """A repository with one notebook per ``{stem: extra parameters-cell lines}``."""
    (tmp_path / "notebooks").mkdir(parents=True)
    for stem, extra in declared.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        cell = nbformat.v4.new_code_cell('TIER = "cpu"\nTRAIN = False\n' + extra)
        cell.metadata["tags"] = ["parameters"]
        nb.cells = [cell, nbformat.v4.new_code_cell("print(TRAIN)")]
        jupytext.write(nb, tmp_path / "notebooks" / f"{stem}.py", fmt="py:percent")
    (tmp_path / "params" / "gpu").mkdir(parents=True)
    for stem in declared:
        (tmp_path / "params" / "gpu" / f"{stem}.yml").write_text("TIER: gpu\nTRAIN: true\n")
    return tmp_path


@pytest.fixture
def jobs_seen(monkeypatch):
    """``run_job`` replaced by a recorder of each job's parameters (nothing executes)."""
    seen: dict[str, dict] = {}

    def fake_run_job(job, root, cell_progress=True, log_output=False):
        seen[job.stem] = dict(job.parameters)
        job.status, job.wall_s = "ok", 0.0

    monkeypatch.setattr(reproduce, "run_job", fake_run_job)
    return seen


def test_records_only_injects_train_and_the_pending_file_without_the_environment(tmp_path, monkeypatch, jobs_seen):
    root = _repo(tmp_path, {"01_a": "PENDING_FILE = None\nRETRAIN_SINCE = None\n", "02_b": ""})
    line = json.dumps({"spec": {"task": "t", "model": "m", "method": "lora"}, "results_dir": "results/runs",
                       "weights": False}, sort_keys=True)
    asked = []

    def pending_lines(tier, root_, stems=None):
        asked.append(list(stems))
        return [line]

    monkeypatch.setattr(reproduce, "pending_lines", pending_lines)
    monkeypatch.setattr(reproduce, "read_pending", lambda path: [])
    env = dict(os.environ)
    assert reproduce.run_all("cpu", root=root, ledger=False, records_only=True) == 0
    assert dict(os.environ) == env                                   # no mode travels through the environment
    pending = reproduce.pending_path("cpu", root)
    assert jobs_seen["01_a"] == {"TIER": "cpu", "TRAIN": False, "PENDING_FILE": str(pending)}
    assert jobs_seen["02_b"] == {"TIER": "cpu", "TRAIN": False}     # it does not declare one: not injected
    assert asked == [["02_b"]]                                       # its runs listed from the tier's specs
    assert pending.read_text() == line + "\n"


def test_retrain_injects_its_start_time_or_retrains_from_the_tiers_specs(tmp_path, monkeypatch, jobs_seen):
    root = _repo(tmp_path, {"01_a": "PENDING_FILE = None\nRETRAIN_SINCE = None\n", "02_b": ""})
    retrained = []
    monkeypatch.setattr(reproduce, "retrain_runs",
                        lambda tier, stems, since, root_, n_jobs=2: retrained.append((tier, list(stems), since)))
    assert reproduce.run_all("cpu", root=root, ledger=False, retrain=True) == 0
    since = jobs_seen["01_a"]["RETRAIN_SINCE"]
    assert isinstance(since, float) and jobs_seen["01_a"]["TRAIN"] is True and "PENDING_FILE" not in jobs_seen["01_a"]
    assert "RETRAIN_SINCE" not in jobs_seen["02_b"]
    assert retrained == [("cpu", ["02_b"], since)]                   # before its notebook ran, at the same time
    with pytest.raises(SystemExit, match="contradict"):
        reproduce.run_all("cpu", root=root, ledger=False, retrain=True, records_only=True)


def test_job_parameters_need_no_params_entry_and_stay_out_of_the_copies(tmp_path):
    root = _repo(tmp_path, {"01_a": "PENDING_FILE = None\nRETRAIN_SINCE = None\n"})
    job = reproduce.plan("gpu", root=root)[0]                        # the params file sets neither
    before = reproduce.sources_sha256(job)
    job.parameters.update(PENDING_FILE="/tmp/x.jsonl", RETRAIN_SINCE=1.5)
    assert reproduce.sources_sha256(job) == before                  # an execution's path or time decide nothing
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"parameters": {"TIER": "gpu", "TRAIN": False, "PENDING_FILE": "/tmp/x.jsonl"}}
    src = tmp_path / "in.ipynb"
    nbformat.write(nb, src)
    reproduce.clean_executed(src, tmp_path / "out.ipynb", root, marker={"status": "records-only"})
    meta = json.loads((tmp_path / "out.ipynb").read_text())["metadata"]["structlora"]
    assert meta["parameters"] == {"TIER": "gpu", "TRAIN": False}

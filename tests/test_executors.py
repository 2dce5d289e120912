"""structlora.repro.executors: the grid through submitit's local executor (real separate processes, as a
SLURM job would be), with toy loaders.

Each job is a fresh Python process that imports torch/transformers (~5 s on an idle machine, ~20 s on a
busy 2-core one), so these tests start as few jobs as they can: two, one plus its retry, and two.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import dist_train
from structlora.repro import executors, grid
from structlora.repro.executors import ClusterOptions, SubmititOptions, load_cluster_options
from structlora.repro.grid import RunSpec, record_path, run, run_grid

pytestmark = pytest.mark.usefixtures("one_thread", "toy_loaders")

TESTS = Path(__file__).resolve().parent
SAME = ("spec", "key", "status", "metrics", "history", "best_step", "test_predictions_sha256", "trainable_params")


def _spec(seed: int = 0, **kw) -> RunSpec:
    base = dict(rank=2, max_steps=6, eval_every=3, lr=1e-2, batch_size=16, max_length=16)
    return RunSpec.make("toy-seq", "toy-bert", "lora", seed=seed, **{**base, **kw})


@pytest.fixture
def jobs_env(monkeypatch, tmp_path):
    """Jobs import this checkout and the toy loaders (``dist_train``), and build through the test hooks."""
    root = str(TESTS.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), root, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setitem(grid.LOADERS, "build_method", dist_train.hooked_build_method)

    def hooks(**values) -> None:
        monkeypatch.setenv(dist_train.HOOK_ENV, json.dumps(values))

    return hooks


def _local(tmp_path: Path, **kw) -> dict:
    return {"cluster": "local", "folder": str(tmp_path / "submitit"), "timeout_min": 10, "poll_s": 0.2, **kw}


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("values, expect", [
    ({}, {"cluster": None, "timeout_min": 120, "gpus_per_node": 0, "max_retries": 2}),
    ({"partition": "gpu", "gpus_per_node": 1, "mem_gb": 32, "partition_": None}, "unknown option"),
    ({"partiton": "gpu"}, "did you mean 'partition'"),
    ({"timeout_min": 0}, "timeout_min must be an int >= 1"),
    ({"cluster": "pbs"}, "cluster must be one of"),
    ({"partition": "gpu", "timeout_min": None, "slurm": {"account": "p42"}},
     {"partition": "gpu", "timeout_min": 120, "slurm": (("account", "p42"),)}),
])
def test_submitit_options_from_a_mapping(values, expect):
    if isinstance(expect, str):
        with pytest.raises(ValueError, match=expect):
            SubmititOptions.from_mapping(values)
        return
    opts = SubmititOptions.from_mapping(values)
    assert {k: getattr(opts, k) for k in expect} == expect


def test_cluster_yml_gives_per_model_resources_and_the_command_line_wins(tmp_path):
    (tmp_path / "params" / "t").mkdir(parents=True)
    (tmp_path / "params" / "t" / "cluster.yml").write_text(
        "default: {partition: gpu, timeout_min: 60, gpus_per_node: 1}\n"
        "models:\n  big-lm: {timeout_min: 600, mem_gb: 128}\n")
    opts = load_cluster_options("t", tmp_path)
    assert opts.for_model("roberta-base") == SubmititOptions(partition="gpu", timeout_min=60, gpus_per_node=1)
    big = opts.for_model("big-lm")
    assert (big.partition, big.timeout_min, big.mem_gb, big.gpus_per_node) == ("gpu", 600, 128, 1)
    cli = opts.override({"partition": "a100", "timeout_min": None})
    assert cli.for_model("big-lm").partition == cli.for_model("x").partition == "a100"
    assert cli.for_model("big-lm").timeout_min == 600
    assert load_cluster_options("none", tmp_path) == ClusterOptions()
    (tmp_path / "params" / "t" / "cluster.yml").write_text("defaults: {}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_cluster_options("t", tmp_path)


def test_an_unknown_executor_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="executor must be"):
        run_grid([_spec()], tmp_path, progress=False, executor="slurm")


# ------------------------------------------------------------------------------------------ real jobs
def test_submitit_records_equal_the_in_process_ones(tmp_path, jobs_env):
    jobs_env()
    specs = [_spec(seed=0), _spec(seed=1)]
    here = run_grid(specs, tmp_path / "here", progress=False)
    there = run_grid(specs, tmp_path / "there", progress=False, executor="submitit", executor_options=_local(tmp_path))
    assert list(there["key"]) == list(here["key"]) and list(there["status"]) == ["ok", "ok"]
    for spec in specs:
        a = json.loads(record_path(spec, tmp_path / "here").read_text())
        b = json.loads(record_path(spec, tmp_path / "there").read_text())
        assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}
        assert b["test_predictions_sha256"] and grid.read_record(record_path(spec, tmp_path / "there"), spec)
    assert not list((tmp_path / "there").glob("*.ckpt"))
    # a second submission finds every record: no job is started
    assert run_grid(specs, tmp_path / "there", progress=False, executor="submitit",
                    executor_options=_local(tmp_path, folder=str(tmp_path / "none")))["status"].eq("ok").all()
    assert not (tmp_path / "none").exists()


def test_a_killed_job_is_resubmitted_and_resumes_its_checkpoint(tmp_path, jobs_env):
    """SIGKILL of the job's process at step 5 (checkpoint of step 3 on disk): the submitter resubmits
    it, the new job resumes from step 3, and the record equals an uninterrupted run's."""
    spec = _spec(seed=2, max_steps=8, eval_every=3)
    marker, log_file = tmp_path / "hung.pid", tmp_path / "builds.log"
    jobs_env(hang_at=5, marker=str(marker), log=str(log_file))
    killed: list[int] = []
    thread = threading.Thread(target=_kill_when_hung, args=(marker, killed), daemon=True)
    thread.start()
    df = run_grid([spec], tmp_path / "runs", progress=False, executor="submitit",
                  executor_options=_local(tmp_path, max_retries=1))
    thread.join(5)
    assert killed and df["status"].tolist() == ["ok"]
    rec = json.loads(record_path(spec, tmp_path / "runs").read_text())
    assert rec["resumed_from"] == 3
    builds = log_file.read_text().splitlines()
    assert len(builds) == 2 and builds[0].endswith(f"pid={killed[0]}") and not builds[1].endswith(f"pid={killed[0]}")
    fresh = run(spec, tmp_path / "fresh", progress=False)       # marker exists: no hang in this process
    assert fresh["resumed_from"] is None
    assert {k: rec.get(k) for k in SAME} == {k: fresh.get(k) for k in SAME}


def test_a_job_killed_on_its_last_try_fails_the_grid_and_a_new_submission_resumes(tmp_path, jobs_env):
    spec = _spec(seed=3, max_steps=8, eval_every=3)
    marker = tmp_path / "hung.pid"
    jobs_env(hang_at=5, marker=str(marker))
    threading.Thread(target=_kill_when_hung, args=(marker, []), daemon=True).start()
    with pytest.raises(RuntimeError, match=f"run {spec.key()} failed: its job ended without a result after 1 try"):
        run_grid([spec], tmp_path / "runs", progress=False, executor="submitit",
                 executor_options=_local(tmp_path, max_retries=0))
    assert (tmp_path / "runs" / f"{spec.key()}.ckpt" / "state.pt").exists()
    assert not record_path(spec, tmp_path / "runs").exists()
    rec = run(spec, tmp_path / "runs", progress=False)           # the next attempt (here in process) resumes
    assert rec["resumed_from"] == 3


def _kill_when_hung(marker: Path, killed: list[int]) -> None:
    """SIGKILL the process whose pid the hook wrote to ``marker`` (it hangs at ``hang_at``, after a checkpoint)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        text = marker.read_text().strip() if marker.exists() else ""
        if text:
            os.kill(int(text), signal.SIGKILL)
            killed.append(int(text))
            return
        time.sleep(0.1)


def test_two_arrays_on_the_same_pending_runs_train_each_run_once(tmp_path, jobs_env):
    """Two submitters send the same run before either job starts; the run's lock makes one job train
    (pausing 2 s mid-run, so that the other arrives meanwhile) and the other read its record."""
    spec = _spec(seed=4)
    log_file = tmp_path / "builds.log"
    jobs_env(log=str(log_file), sleep_at=2, sleep_s=2.0)
    first = executors.submit_runs([spec], tmp_path / "runs", _local(tmp_path, folder=str(tmp_path / "a1")))
    second = executors.submit_runs([spec], tmp_path / "runs", _local(tmp_path, folder=str(tmp_path / "a2")))
    rec1, fail1 = executors.wait_runs(first, 0.2)
    rec2, fail2 = executors.wait_runs(second, 0.2)
    assert not fail1 and not fail2
    assert len(log_file.read_text().splitlines()) == 1            # trained once
    assert rec1[spec.key()] == rec2[spec.key()] == json.loads(record_path(spec, tmp_path / "runs").read_text())


def test_reproduce_train_pending_sends_the_pending_runs_to_submitit(tmp_path, monkeypatch, jobs_env):
    """``python -m structlora reproduce --train-pending --executor submitit``: the pending list's runs go
    through submitit (its in-process ``debug`` cluster here), with the tier's cluster.yml under the flags."""
    from structlora.repro import cli
    from structlora.repro.reproduce import pending_path

    jobs_env()
    for d in ("notebooks", "structlora", "params/smoke"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "params/smoke/cluster.yml").write_text("default: {timeout_min: 5, partition: cpu}\n")
    specs = [_spec(seed=5), _spec(seed=6)]
    pending_path("smoke", tmp_path).parent.mkdir(parents=True)
    pending_path("smoke", tmp_path).write_text("".join(
        json.dumps({"spec": s.to_dict(), "results_dir": "results/runs", "weights": False}) + "\n" for s in specs))
    seen = []
    real = executors.submit_runs
    monkeypatch.setattr(executors, "submit_runs",
                        lambda specs, d, opts, *a, **kw: seen.append(opts) or real(specs, d, opts, *a, **kw))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["reproduce", "--tier", "smoke", "--train-pending", "--executor", "submitit", "--cluster", "debug",
                     "--submitit-folder", str(tmp_path / "sub"), "--max-retries", "0"]) == 0
    for spec in specs:
        assert grid.read_record(record_path(spec, tmp_path / "results/runs"), spec)["status"] == "ok"
    (opts,) = seen
    assert (opts.default.cluster, opts.default.partition, opts.default.timeout_min, opts.default.max_retries) == \
        ("debug", "cpu", 5, 0)
    with pytest.raises(SystemExit, match="only --train-pending"):
        cli.main(["reproduce", "--tier", "smoke", "--executor", "submitit"])

"""Checks of the reproduction-notebook machinery (fast; no model is trained here).

* every ``notebooks/0*.py`` / ``.ipynb`` pair is in sync (jupytext: same cells, same sources, same tags);
* every notebook has one ``parameters`` cell holding the cpu tier in records-only mode (``TRAIN =
  False``), and one yml per other tier (smoke, gpu) whose keys are parameters of that cell;
* the committed ``.ipynb`` files carry the cpu tier's outputs (executed from the committed records)
  and no volatile metadata; nbval re-executes them and compares the checked cells;
* the claims ledger, the paper tables and the ``reproduce`` job (planning, resuming, failure report).

The notebooks' own outputs are checked by nbval:
``.venv/bin/python -m pytest --nbval-lax notebooks/ -p no:cacheprovider --nbval-sanitize-with notebooks/nbval_sanitize.cfg``
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
PARAMS = ROOT / "params"

jupytext = pytest.importorskip("jupytext")


def _stems() -> list[str]:
    return sorted({p.stem for p in NB_DIR.glob("0*.py")} | {p.stem for p in NB_DIR.glob("0*.ipynb")})


STEMS = _stems()


def _parameters_cell(nb) -> str:
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected exactly one cell tagged 'parameters', found {len(cells)}"
    return cells[0].source


def _assigned_names(source: str) -> dict[str, object]:
    tree = ast.parse(source)
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    try:
                        out[t.id] = ast.literal_eval(node.value)
                    except ValueError:
                        out[t.id] = None
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            out[node.target.id] = ast.literal_eval(node.value)
    return out


def test_notebooks_exist():
    assert STEMS, "no notebooks under notebooks/"
    for stem in STEMS:
        assert (NB_DIR / f"{stem}.py").exists(), f"{stem}: the jupytext .py source is missing"
        assert (NB_DIR / f"{stem}.ipynb").exists(), f"{stem}: the paired .ipynb is missing"


@pytest.mark.parametrize("stem", STEMS)
def test_pair_in_sync(stem):
    py, ipynb = NB_DIR / f"{stem}.py", NB_DIR / f"{stem}.ipynb"
    if not (py.exists() and ipynb.exists()):
        pytest.skip("pair incomplete (see test_notebooks_exist)")
    a, b = jupytext.read(py), jupytext.read(ipynb)
    ca = [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in a.cells]
    cb = [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in b.cells]
    assert len(ca) == len(cb), (f"{stem}: {len(ca)} cells in the .py, {len(cb)} in the .ipynb; "
                                f"run `.venv/bin/jupytext --sync notebooks/{stem}.py`")
    for i, (x, y) in enumerate(zip(ca, cb)):
        assert x == y, (f"{stem}: cell {i} differs between .py and .ipynb; "
                        f"run `.venv/bin/jupytext --sync notebooks/{stem}.py`\n.py:   {x[1][:200]!r}\n.ipynb: {y[1][:200]!r}")


@pytest.mark.parametrize("stem", STEMS)
def test_parameters_cell_is_the_cpu_tier_from_records(stem):
    nb = jupytext.read(NB_DIR / f"{stem}.py")
    params = _assigned_names(_parameters_cell(nb))
    assert params.get("TIER") == "cpu", f"{stem}: the parameters cell must hold the cpu tier (TIER = 'cpu')"
    assert params.get("TRAIN") is False, f"{stem}: 'Run all' must read the records and train nothing (TRAIN = False)"
    rd = params.get("RESULTS_DIR")
    if rd is not None:
        assert not str(rd).startswith("results/smoke"), f"{stem}: cpu runs must not use results/smoke"
    assert not (PARAMS / "cpu" / f"{stem}.yml").exists(), f"{stem}: the cpu tier lives in the cell only"


@pytest.mark.parametrize("tier", ["smoke", "gpu", "paper"])
@pytest.mark.parametrize("stem", STEMS)
def test_tier_params(stem, tier):
    import yaml

    path = PARAMS / tier / f"{stem}.yml"
    assert path.exists(), f"missing {path.relative_to(ROOT)}"
    text = path.read_text(encoding="utf-8")
    if tier != "smoke":
        assert re.search(r"(?im)^#.*(expected|wall).*\d", text), f"{path.name}: add a comment with the expected wall time"
    values = yaml.safe_load(text) or {}
    assert values.get("TIER") == tier, f"{path}: TIER must be {tier!r}"
    nb = jupytext.read(NB_DIR / f"{stem}.py")
    known = set(_assigned_names(_parameters_cell(nb)))
    unknown = set(values) - known
    assert not unknown, f"{path}: {sorted(unknown)} are not parameters of {stem} (parameters cell has {sorted(known)})"
    assert set(values) == known, f"{path}: sets {sorted(values)}, the parameters cell has {sorted(known)}"
    if "RESULTS_DIR" in values:
        assert str(values["RESULTS_DIR"]).startswith("results/smoke") == (tier == "smoke"), \
            f"{path}: only the smoke tier's runs live under results/smoke"


_VOLATILE_CELL_META = ("execution", "papermill", "ExecuteTime", "collapsed", "scrolled")


@pytest.mark.parametrize("stem", STEMS)
def test_committed_ipynb_is_cpu_and_clean(stem):
    path = NB_DIR / f"{stem}.ipynb"
    if not path.exists():
        pytest.skip("no .ipynb")
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert any(c.get("outputs") for c in code), (f"{stem}.ipynb carries no outputs: python -m structlora reproduce "
                                                 "--tier cpu --records-only --update-notebooks")
    assert "papermill" not in nb.get("metadata", {}), f"{stem}.ipynb: strip the papermill metadata"
    for i, c in enumerate(nb["cells"]):
        bad = [k for k in _VOLATILE_CELL_META if k in c.get("metadata", {})]
        assert not bad, f"{stem}.ipynb cell {i}: volatile metadata {bad}"
    text = path.read_text(encoding="utf-8")
    for tier in ("smoke", "gpu", "paper"):
        assert f"TIER = \"{tier}\"" not in text and f"TIER = '{tier}'" not in text, \
            f"{stem}.ipynb was executed with tier {tier}; commit the cpu tier's outputs only"
    assert nb.get("metadata", {}).get("structlora", {}).get("status") == "records-only", \
        f"{stem}.ipynb: commit the records-only execution (--tier cpu --records-only --update-notebooks)"
    for c in code:
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                pytest.fail(f"{stem}.ipynb: committed with an error output ({o.get('ename')}: {o.get('evalue')})")


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_writes_claims_and_figure(stem):
    src = (NB_DIR / f"{stem}.py").read_text(encoding="utf-8")
    assert "write_claims(" in src, f"{stem}: must end by writing its claims (structlora.repro.claims.write_claims)"
    assert "save_figure(" in src or "savefig(" in src, f"{stem}: must save a figure under results/figures/"
    assert "NBVAL_CHECK_OUTPUT" in src, f"{stem}: mark the deterministic cells with # NBVAL_CHECK_OUTPUT"


# ------------------------------------------------------------------------------------------------ claims
def _claim(i="a", tier="cpu", nb="01_x", verdict="inconclusive", **kw):
    from structlora.repro.claims import Claim

    return Claim(claim_id=i, notebook=nb, claim="StructLoRA > LoRA", paper_value="+1.0", ours="+0.5",
                 ours_value=kw.get("ours_value", 0.5), ci_low=-1.0, ci_high=2.0, n=3, tier=tier, verdict=verdict)


def test_claims_roundtrip_and_tiers(tmp_path):
    from structlora.repro.claims import build_ledger, read_claims, write_claims

    p = write_claims("01_x", "cpu", [_claim("a"), _claim("b", verdict="reproduced")], root=tmp_path)
    assert p == tmp_path / "claims" / "01_x.cpu.json"
    write_claims("01_x", "smoke", [_claim("a", tier="smoke", verdict="not reproduced")], root=tmp_path)
    df = build_ledger(tmp_path)  # default: cpu tier
    assert list(df["claim_id"]) == ["a", "b"] and set(df["tier"]) == {"cpu"}
    md = (tmp_path / "CLAIMS.md").read_text()
    assert "Verdict rule" in md and "| a |" in md and "reproduced" in md
    assert (tmp_path / "claims.csv").exists()
    smoke = build_ledger(tmp_path, tier="smoke")
    assert list(smoke["verdict"]) == ["not reproduced"]
    assert (tmp_path / "CLAIMS.smoke.md").exists()
    assert "not reproduced" not in (tmp_path / "CLAIMS.md").read_text().split("## 01_x")[1]
    assert len(read_claims(tmp_path, tier=None)) == 3


def test_claims_validation(tmp_path):
    from structlora.repro.claims import write_claims

    with pytest.raises(ValueError):
        _claim(verdict="great")
    with pytest.raises(ValueError):
        write_claims("01_x", "cpu", [_claim("a"), _claim("a")], root=tmp_path)
    with pytest.raises(ValueError):
        write_claims("01_x", "cpu", [_claim("a", tier="smoke")], root=tmp_path)
    c = _claim(ours_value=float("nan"))
    assert c.ours_value is None  # NaN never reaches the JSON


def test_format_diff():
    from structlora.repro.claims import format_diff

    assert format_diff(0.8, 1.2, -1.1, 2.7) == "+0.8 ± 1.2 (95% CI [-1.1, 2.7])"
    assert format_diff(float("nan")) == "n/a"
    assert format_diff(-0.04) == "-0.0"


# ------------------------------------------------------------------------------------------------- paper
def test_paper_tables_match_printed_deltas():
    from structlora.repro import paper

    # the "(+d)" printed in Tables 3/4 and the Δ column of Table 5
    printed3 = {"boolq": [2.3, 2.3, 2.2, 1.4, 0.9], "cifar100": [1.8, 2.5, 2.6, 1.5, 1.1],
                "coco_caption": [3.1, 3.2, 6.2, 5.5, 4.9]}
    for d, gains in printed3.items():
        assert [round(paper.TABLE3[d][r]["structlora"] - paper.TABLE3[d][r]["lora"], 1) for r in (2, 4, 8, 16, 32)] == gains
    printed4 = {"boolq": [2.7, 3.1, 2.5, 2.2], "cifar100": [2.7, 2.5, 1.9, 2.6], "coco_caption": [3.5, 4.1, 3.9, 6.2]}
    for d, gains in printed4.items():
        assert [round(paper.TABLE4[d][f]["structlora"] - paper.TABLE4[d][f]["lora"], 1)
                for f in (0.1, 0.25, 0.5, 1.0)] == gains
    t5 = paper.table_frame(5)
    assert t5.loc["structlora_no_gate", "delta_boolq"] == -1.9 and t5.loc["lora", "delta_coco_caption"] == -6.2
    assert all(round(v["structlora"] - v["lora"], 2) == v["change"] for k, v in paper.TABLE13.items()
               if k not in ("3-4",))  # 0.63 - 0.34 = 0.29 as printed
    assert paper.paper_diff(1, "boolq") == 3.0 and paper.paper_diff(2, "rte") == 2.9
    assert paper.paper_diff(3, "fmnist-transfer", rank=2) == 1.8
    assert paper.paper_diff(4, "boolq", fraction=0.1) == 2.7
    for t in (1, 2, 3, 4, 5, 6, 7, 9, 13):
        assert len(paper.table_frame(t)) > 0


def test_paper_methods_are_registered():
    from structlora.repro import paper

    methods = pytest.importorskip("structlora.repro.methods")
    known = set(methods.list_methods())
    assert set(paper.TABLE1) <= known
    assert set(paper.TABLE2) <= known


# --------------------------------------------------------------------------------------------- reproduce
def _fake_repo(tmp_path: Path, cells: list[str], stem: str = "01_toy") -> Path:
    import nbformat

    (tmp_path / "notebooks").mkdir(parents=True)
    (tmp_path / "structlora").mkdir(parents=True)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = nbformat.v4.new_code_cell('TIER = "smoke"\nX = 1')
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p] + [nbformat.v4.new_code_cell(c) for c in cells]
    jupytext.write(nb, tmp_path / "notebooks" / f"{stem}.py", fmt="py:percent")
    (tmp_path / "params" / "gpu").mkdir(parents=True)
    (tmp_path / "params" / "gpu" / f"{stem}.yml").write_text("# expected wall time: 1 s\nTIER: gpu\nX: 2\n")
    return tmp_path


def test_plan_selects_and_reads_params(tmp_path):
    from structlora.repro.reproduce import plan

    root = _fake_repo(tmp_path, ["print(X)"])
    (root / "notebooks" / "02_other.py").write_text("# %%\nTIER = 'smoke'\n")
    jobs = plan("gpu", only=["01"], root=root)
    assert [j.stem for j in jobs] == ["01_toy"] and jobs[0].parameters == {"TIER": "gpu", "X": 2}
    assert jobs[0].output == root / "results" / "executed" / "01_toy.gpu.ipynb"
    assert plan("cpu", root=root)[0].parameters == {"TIER": "cpu"}  # cpu: the notebook's own parameters cell
    with pytest.raises(SystemExit, match="missing parameter file"):
        plan("gpu", only=["02"], root=root)
    with pytest.raises(SystemExit, match="no notebook matches"):
        plan("gpu", only=["07"], root=root)


def test_reproduce_runs_resumes_and_reports_failures(tmp_path, capsys):
    pytest.importorskip("papermill")
    from structlora.repro.reproduce import run_all

    root = _fake_repo(tmp_path, ["Y = X * 10", "print('Y is', Y)"])
    assert run_all("gpu", root=root, ledger=False) == 0
    out = root / "results" / "executed" / "01_toy.gpu.ipynb"
    nb = json.loads(out.read_text())
    assert "Y is 20" in json.dumps(nb["cells"])
    # up to date -> skipped; --force reruns
    capsys.readouterr()
    assert run_all("gpu", root=root, ledger=False) == 0
    assert "up to date" in capsys.readouterr().out
    # a failing cell: non-zero exit, message names notebook, cell and first source line
    time.sleep(0.01)
    root2 = _fake_repo(tmp_path / "b", ["a = 1", "# NBVAL_CHECK_OUTPUT\nraise RuntimeError('boom')\nb = 2"])
    assert run_all("gpu", root=root2, ledger=False) == 1
    err = capsys.readouterr().err
    assert "01_toy" in err and "cell 2" in err and "raise RuntimeError('boom')" in err and "boom" in err
    assert "01_toy.gpu.ipynb" in err


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "structlora", "reproduce", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "--tier" in r.stdout and "--only" in r.stdout and "--force" in r.stdout


# ------------------------------------------------------------------------------------------ Colab cell
_INSTALL_MARK = 'importlib.util.find_spec("structlora") is None'


def _first_code_cell(stem: str) -> str:
    nb = jupytext.read(NB_DIR / f"{stem}.py")
    return next(c.source for c in nb.cells if c.cell_type == "code")


def test_every_notebook_starts_with_the_same_install_cell():
    cells = {stem: _first_code_cell(stem) for stem in STEMS}
    assert all(_INSTALL_MARK in c for c in cells.values()), [s for s, c in cells.items() if _INSTALL_MARK not in c]
    assert len(set(cells.values())) == 1, "the install cells of the notebooks differ"


def test_install_cell_is_a_no_op_where_structlora_is_importable(tmp_path: Path):
    code = _first_code_cell(STEMS[0]) + "\nimport os\nprint(os.getcwd())\n"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path) and res.stderr == ""   # no chdir, nothing printed
    assert list(tmp_path.iterdir()) == []                              # nothing cloned or written


def test_install_cell_installs_where_structlora_is_missing(tmp_path: Path):
    """Without site-packages (``-S``) structlora is not importable: the cell goes for the clone."""
    code = _first_code_cell(STEMS[0])
    env = {**os.environ, "STRUCTLORA_REPO": str(tmp_path / "no-such-repo"), "GIT_TERMINAL_PROMPT": "0"}
    res = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode != 0 and "no-such-repo" in res.stderr, res.stderr


# ------------------------------------------------------------------------- params and deterministic copies
def test_a_mistyped_or_missing_parameter_fails_before_any_run(tmp_path):
    from structlora.repro.reproduce import plan

    root = _fake_repo(tmp_path, ["print(X)"])
    pfile = root / "params" / "gpu" / "01_toy.yml"
    pfile.write_text("TIER: gpu\nXX: 2\n")  # XX for X
    with pytest.raises(SystemExit) as e:
        plan("gpu", root=root)
    msg = str(e.value)
    assert "01_toy.yml" in msg and "unknown parameter 'XX'" in msg and "did you mean 'X'" in msg
    assert "missing parameter 'X'" in msg
    pfile.write_text("TIER: gpu\n")
    with pytest.raises(SystemExit, match="missing parameter 'X'"):
        plan("gpu", root=root)


def test_every_committed_params_file_matches_its_notebook():
    from structlora.repro.reproduce import plan

    for tier in ("smoke", "cpu", "gpu", "paper"):
        assert len(plan(tier, root=ROOT)) == len(STEMS)  # raises SystemExit on an unknown / missing key


def test_executed_copies_are_deterministic_and_carry_no_machine_paths(tmp_path):
    import nbformat

    from structlora.repro.reproduce import clean_executed

    home = str(Path.home())
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x = 1")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text=(
            f"{ROOT}/.venv/lib/python3.11/site-packages/x.py:3: FutureWarning: old\n  warnings.warn(\n")),
        nbformat.v4.new_output("stream", name="stderr", text=" 50%|#####     | 1/2 [00:01<00:01]\r"),
        nbformat.v4.new_output("stream", name="stderr", text="\n[transformers] X LOAD REPORT from: /a/b\n"
                               "Key | Status\nclassifier.bias | MISSING\n\nNotes:\n- MISSING: new\n"),
        nbformat.v4.new_output("stream", name="stdout", text=f"wrote {ROOT}/results/figures/a.png\n"),
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "ab"},
                                                     "text/plain": "  3%|"}),
        nbformat.v4.new_output("stream", name="stderr", text="a real error message\n"),
    ]
    nb.cells = [cell]
    nb.metadata["papermill"] = {"start_time": "2026-12-01T00:00:00", "parameters": {"X": 2},
                                "input_path": f"{home}/tmp/x.ipynb"}
    src = tmp_path / "in.ipynb"
    nbformat.write(nb, src)
    clean_executed(src, tmp_path / "a.ipynb", ROOT, marker={"status": "ok"})
    clean_executed(src, tmp_path / "b.ipynb", ROOT, marker={"status": "ok"})
    a = (tmp_path / "a.ipynb").read_text()
    assert a == (tmp_path / "b.ipynb").read_text()
    assert str(ROOT) not in a and home not in a and "Warning" not in a and "LOAD REPORT" not in a
    assert "widget-view" not in a and "50%" not in a and "2026-12-01" not in a
    out = json.loads(a)
    texts = ["".join(o["text"]) for o in out["cells"][0]["outputs"]]
    assert texts == ["wrote results/figures/a.png\n", "a real error message\n"]   # errors and results stay
    assert out["cells"][0]["id"] == "cell-000" and out["metadata"]["structlora"]["parameters"] == {"X": 2}


def test_reproduce_says_what_it_serves_and_how_to_retrain(tmp_path, capsys):
    pytest.importorskip("papermill")
    from structlora.repro.reproduce import run_all

    root = _fake_repo(tmp_path, ["Y = X * 10"])
    runs = root / "results" / "runs"
    runs.mkdir(parents=True)
    for i in range(3):
        (runs / f"run{i}.json").write_text("{}")
    (runs / ".run0.json.123.tmp").write_text("")
    assert run_all("gpu", root=root, ledger=False) == 0
    out = capsys.readouterr().out
    assert "serving 3 run record(s) from results/runs" in out and "--retrain" in out
    first = (root / "results" / "executed" / "01_toy.gpu.ipynb").read_bytes()
    assert run_all("gpu", root=root, ledger=False, force=True) == 0
    assert (root / "results" / "executed" / "01_toy.gpu.ipynb").read_bytes() == first  # same bytes on a re-run


# ------------------------------------------------------------------------------------ one budget per tier
def test_one_budget_file_per_tier_and_no_copies():
    from structlora.repro.notebook import load_budget

    for tier in ("smoke", "cpu", "gpu"):
        budget = load_budget(tier, ROOT)
        assert {"minilm-l6", "vit-tiny-fmnist"} <= set(budget)
        for params in (PARAMS / tier).glob("0*.yml"):
            import yaml

            assert "BUDGET" not in (yaml.safe_load(params.read_text()) or {}), f"{params}: BUDGET belongs in budget.yml"
    for stem in STEMS:
        nb = jupytext.read(NB_DIR / f"{stem}.py")
        assert "BUDGET" not in _assigned_names(_parameters_cell(nb)), f"{stem}: BUDGET belongs in budget.yml"
        assert any("load_budget(TIER)" in c.source for c in nb.cells), f"{stem} does not load the tier's budget"


def test_budget_gives_each_method_its_rate_and_the_variants_structloras(tmp_path):
    from structlora.repro.notebook import load_budget

    (tmp_path / "params" / "x").mkdir(parents=True)
    (tmp_path / "params" / "x" / "budget.yml").write_text(
        "models:\n  m: {max_steps: 5, batch_size: 2, max_length: 8, eval_every: 5, max_eval_examples: null}\n"
        "lr:\n  m: {default: 0.001, structlora: 0.0002, lora: 0.0005}\nseed_cap: 4\n")
    b = load_budget("x", tmp_path)
    assert b.run("m", "lora")["lr"] == 5e-4 and b.run("m", "structlora_no_gate")["lr"] == 2e-4
    assert b.run("m", "dora")["lr"] == 1e-3 and b["m"]["max_steps"] == 5 and b.seed_cap == 4
    (tmp_path / "params" / "x" / "budget.yml").write_text("models: {}\nlr: {}\nSEEDS: [1]\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_budget("x", tmp_path)


def test_run_summary_counts_converged_skipped_and_diverged_runs():
    import pandas as pd

    from structlora.repro.notebook import run_summary

    df = pd.DataFrame({"status": ["ok", "ok", "ok", "skipped", "diverged"],
                       "converged": [True, False, None, None, None]})
    assert run_summary(df) == ("3 runs ok (1 converged: best validation step before the last evaluation), "
                               "1 skipped, 1 diverged")


# ------------------------------------------------------------------------------------------ thin notebooks
MAX_CODE_LINES = 150  # a notebook is its parameters, calls, tables, figures and prose; logic lives in the package


@pytest.mark.parametrize("stem", STEMS)
def test_notebooks_stay_thin(stem):
    nb = jupytext.read(NB_DIR / f"{stem}.py")
    n = sum(1 for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()
            if line.strip() and not line.strip().startswith("#"))
    assert n <= MAX_CODE_LINES, (f"{stem} has {n} code lines (non-blank, non-comment) > {MAX_CODE_LINES}: "
                                 "move the logic into structlora.repro with a test")


def test_smoke_tier_trains_every_notebook():
    """The smoke tier drives every training path of every notebook through papermill: seconds-long
    runs under results/smoke/, executed copies results/executed/*.smoke.ipynb (neither is committed)."""
    pytest.importorskip("papermill")
    from structlora.repro.reproduce import run_all

    assert run_all("smoke", root=ROOT, ledger=False, force=True) == 0
    for stem in STEMS:
        nb = json.loads((ROOT / "results" / "executed" / f"{stem}.smoke.ipynb").read_text())
        assert nb["metadata"]["structlora"]["tier"] == "smoke" and nb["metadata"]["structlora"]["status"] == "ok"


def test_records_only_reexecution_rewrites_no_committed_byte():
    """`make reproduce`'s notebook step, on one notebook: re-executed from the committed records with
    TRAIN = False (run_grid trains nothing: a run without a record comes back pending), the committed
    notebook and its claims come out byte for byte as committed."""
    pytest.importorskip("papermill")
    from structlora.repro.reproduce import run_all

    paths = [NB_DIR / "03_few_shot.ipynb", ROOT / "results" / "claims" / "03_few_shot.cpu.json"]
    touched = [p for d in (NB_DIR, *(ROOT / "results" / k for k in ("claims", "executed", "figures")))
               for p in d.glob("03_*") if p.is_file()]
    before = {p: p.read_bytes() for p in touched}
    try:
        assert run_all("cpu", only=["03"], root=ROOT, ledger=False, force=True, records_only=True,
                       update_notebooks=True) == 0
        changed = [p for p in paths if p.read_bytes() != before[p]]
    finally:  # a failing check leaves the checkout as it was
        for p, data in before.items():
            if p.read_bytes() != data:
                p.write_bytes(data)
    assert not changed, f"{[str(p.relative_to(ROOT)) for p in changed]} changed on a records-only re-execution"

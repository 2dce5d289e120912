"""Executing one notebook: the source converted in memory (jupytext, fixed cell ids), run with papermill
in a ``python3`` kernel, a failing cell described by its number in the source, and the executed copy
cleaned of everything volatile (timings, paths, warnings, progress bars) so a re-run writes the same bytes.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from .._io import atomic_write
from .jobs import NotebookJob, kept_parameters, sources_sha256
from .layout import repo_root

__all__ = ["run_job", "strip_noise", "clean_executed"]


def _input_notebook(job: NotebookJob, tmpdir: Path) -> Path:
    """The notebook papermill executes: the .py converted by jupytext, else the .ipynb itself."""
    if job.source.suffix == ".py":
        import jupytext

        nb = jupytext.read(job.source)
        nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    else:
        import nbformat

        nb = nbformat.read(job.source, as_version=4)
    for i, cell in enumerate(nb.cells):  # jupytext draws random ids: fixed ones keep executed copies diffable
        cell["id"] = f"cell-{i:03d}"
    path = tmpdir / f"{job.stem}.ipynb"
    import nbformat

    nbformat.write(nb, path)
    return path


def _describe_failure(job: NotebookJob, err: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        src = (err.source or "").strip().splitlines()
        first = next((ln for ln in src if ln.strip() and not ln.startswith("# NBVAL")), src[0] if src else "")
        idx = err.cell_index
        try:  # papermill inserts an "injected-parameters" cell: count cells as in the source notebook
            cells = json.loads(job.output.read_text(encoding="utf-8"))["cells"]
            injected = sum(1 for c in cells[:idx] if "injected-parameters" in c.get("metadata", {}).get("tags", []))
        except (OSError, ValueError, KeyError, TypeError):
            injected = 0
        return (f"notebook {job.stem} failed in cell {idx - injected} of {job.source.name} (counting from 0; cell "
                f"{idx} of the executed notebook, execution count {err.exec_count}): `{first.strip()}`\n"
                f"  {err.ename}: {err.evalue}\n  executed notebook: {job.output}")
    return f"notebook {job.stem} failed: {type(err).__name__}: {err}\n  executed notebook: {job.output}"


def run_job(job: NotebookJob, root: Path, cell_progress: bool = True, log_output: bool = False) -> None:
    """Execute ``job``'s notebook with papermill (cwd ``root``) into its executed copy, cleaned by
    `clean_executed`; sets ``job.status`` (``ok`` / ``failed``), ``job.message`` and ``job.wall_s``."""
    import papermill as pm

    job.output.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="structlora-nb-") as td:
        src = _input_notebook(job, Path(td))
        try:
            pm.execute_notebook(
                str(src), str(job.output), parameters=job.parameters or None, kernel_name="python3",
                progress_bar={"leave": False, "desc": f"  {job.stem}", "position": 1} if cell_progress else False,
                log_output=log_output, cwd=str(root), request_save_on_cell_execute=True,
                # the kernel's own log: errors only (it warns on every start that local TCP is unencrypted)
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
            job.status = "ok"
            # a records-only copy is never "up to date" for a job that trains (its pending runs are missing)
            clean_executed(job.output, job.output, root,
                           marker={"status": "ok" if job.parameters.get("TRAIN") is not False else "records-only",
                                   "tier": job.parameters.get("TIER", "smoke"), "sources_sha256": sources_sha256(job)})
        except BaseException as err:  # noqa: BLE001 - reported, then re-raised as a job failure
            job.status = "failed"
            job.message = _describe_failure(job, err)
            if isinstance(err, KeyboardInterrupt):
                raise
        finally:
            job.wall_s = time.perf_counter() - t0


_VOLATILE_CELL_META = ("papermill", "execution", "ExecuteTime")
_WIDGET = "application/vnd.jupyter.widget-view+json"
_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")
_PROGRESS = re.compile(r"\r|\d+%\|")
# timings of this execution (wall time, load average): shown live, not kept in the committed copies,
# so re-executing from the same records rewrites the same bytes
_TIMING_LINE = re.compile(r"^(notebook wall time|probe time|benchmark time)\b.*\n?", re.M)


def strip_noise(text: str) -> str:
    """stderr text without what is not a result: python warnings (``file:line: XWarning: message`` and
    the source line below it), transformers' load report (a fresh classification head is "MISSING", as
    expected) and text progress bars."""
    lines, out, i = text.splitlines(keepends=True), [], 0
    while i < len(lines):
        ln = lines[i]
        if "LOAD REPORT" in ln:
            i += 1
            while i < len(lines) and not lines[i].startswith("Notes:"):
                i += 1
            i += 1
            while i < len(lines) and lines[i].startswith("- "):
                i += 1
            continue
        if _WARNING.match(ln):
            for k in range(i + 1, min(i + 6, len(lines))):
                if lines[k].startswith("  "):
                    i = k
                    break
            i += 1
            continue
        if not _PROGRESS.search(ln):
            out.append(ln)
        i += 1
    return "".join(out) if "".join(out).strip() else ""


def _clean_outputs(outputs: list, root: Path) -> list:
    kept = []
    prefixes = sorted({str(root.resolve()) + os.sep, str(root) + os.sep, str(Path.home()) + os.sep}, key=len,
                      reverse=True)

    def rel(text: str) -> str:
        for p in prefixes:
            text = text.replace(p, "")
        return text

    for out in outputs:
        if out.get("output_type") == "stream":
            text = out.get("text", "")
            if out.get("name") == "stderr":
                text = strip_noise(text)
            out["text"] = rel(_TIMING_LINE.sub("", text))
            if not out["text"].strip():
                continue
        elif "data" in out:
            if _WIDGET in out["data"]:
                continue  # a live progress bar: its state is not saved, its text fallback is a timing
            for mime, val in list(out["data"].items()):
                if isinstance(val, str) and mime.startswith("text/"):
                    out["data"][mime] = rel(val)
        elif out.get("output_type") == "error":
            out["traceback"] = [rel(t) for t in out.get("traceback", [])]
        kept.append(out)
    return kept


def clean_executed(src: Path, dst: Path, root: Path | None = None, marker: dict[str, Any] | None = None,
                   drop_injected: bool = False) -> None:
    """Copy an executed notebook to ``dst`` without volatile content: papermill timings and paths,
    execution timestamps, widget state, library warnings and progress bars on stderr, the machine's
    absolute paths (made relative to the repository), empty tag lists. ``marker`` is stored as
    ``metadata.structlora`` (what `up_to_date` reads). A re-run from the same records and sources thus
    writes the same bytes. ``drop_injected`` removes papermill's injected-parameters cell (the committed
    notebooks: they were executed with their own parameters cell's values, so they pair with the .py)."""
    import nbformat

    root = root or repo_root()
    nb = nbformat.read(src, as_version=4)
    pm_meta = nb.metadata.pop("papermill", {}) or {}
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("structlora", None)  # replaced by ``marker`` (how this copy was executed), if given
    if marker is not None:
        kept = kept_parameters(pm_meta.get("parameters", marker.get("parameters", {})) or {})
        nb.metadata["structlora"] = {**marker, "parameters": kept}
    if drop_injected:
        nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:03d}"
        for k in _VOLATILE_CELL_META:
            cell.metadata.pop(k, None)
        if "tags" in cell.metadata and not cell.metadata["tags"]:
            del cell.metadata["tags"]
        if cell.cell_type == "code":
            cell.outputs = _clean_outputs(cell.outputs, root)
    text = nbformat.writes(nb)
    atomic_write(dst, text if text.endswith("\n") else text + "\n")

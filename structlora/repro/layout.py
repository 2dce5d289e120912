"""Where things are in the repository: its root, the tiers, and a notebook's parameters cell.

The bottom of the reproduction's imports (it imports nothing of structlora), so the notebook helpers,
the plan and the job runner can all ask where the repository is without importing each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["OWN_CELL_TIER", "TIERS", "notebook_parameters", "params_path", "repo_root"]

TIERS = ("smoke", "cpu", "gpu", "paper")
OWN_CELL_TIER = "cpu"  # the tier of the notebooks' own parameters cell (and of their committed outputs)


def repo_root() -> Path:
    """The repository root: the first parent of the cwd (or of this file) holding ``notebooks/``."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        for p in (base, *base.parents):
            if (p / "notebooks").is_dir() and (p / "structlora").is_dir():
                return p
    return Path.cwd()



def params_path(tier: str, name: str, root: str | Path | None = None) -> Path:
    """``<repo>/params/<tier>/<name>`` (``budget.yml``, ``plan.yml``, ``<notebook>.yml``)."""
    return Path(root or repo_root()) / "params" / tier / name


def notebook_parameters(source: Path) -> dict[str, Any]:
    """The names (and literal cpu-tier values) assigned in the notebook's ``parameters`` cell."""
    import ast

    if source.suffix == ".py":
        import jupytext

        nb = jupytext.read(source)
    else:
        import nbformat

        nb = nbformat.read(source, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise SystemExit(f"{source}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    names: dict[str, Any] = {}
    for node in ast.parse(cells[0].source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name):
                try:
                    names[t.id] = ast.literal_eval(node.value) if node.value is not None else None
                except ValueError:
                    names[t.id] = None
    return names

"""The environment: the installed versions are the locked ones, the method is light, the layout has no
import circles, and a bare ``pip install .`` (no extras) runs the README's "your own model" snippet."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the method must never load: the reproduction's packages (scipy comes with peft itself; where
# they are installed, peft and transformers import bitsandbytes, torchvision and yaml on their own, and
# transformers' Trainer imports datasets and pandas, so `structlora.integrations` is not checked here)
HEAVY = ["papermill", "seaborn", "matplotlib", "datasets", "timm", "pandas", "nbval", "nbformat", "jupytext",
         "sklearn", "gguf", "structlora.repro"]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if m:
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _local(version: str) -> str:
    return version.split("+", 1)[0]


@pytest.mark.parametrize("lock", ["requirements.lock", "requirements-assets.txt"])
def test_installed_versions_equal_the_lock(lock: str):
    pins = _pins(ROOT / lock)
    assert len(pins) > (100 if lock == "requirements.lock" else 3), f"{lock} looks empty"
    wrong = {name: (want, _installed(name)) for name, want in pins.items()
             if _installed(name) is None or _local(_installed(name)) != _local(want)}
    assert not wrong, (f"installed versions differ from {lock} (package: (locked, installed)): {wrong}; "
                       "run `make setup` (or `make lock` after changing pyproject.toml / requirements.in)")


def test_lock_pins_the_reported_stack():
    pins = _pins(ROOT / "requirements.lock")
    for name in ("torch", "torchvision", "transformers", "peft", "accelerate", "datasets", "safetensors"):
        assert name in pins, f"{name} is not pinned in requirements.lock"
    assert "structlora" not in pins and "/work" not in (ROOT / "requirements.lock").read_text()


def _snippet(name: str) -> str:
    """The python block of the README that follows the heading ``name``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(name)
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, f"no python block after {name!r} in README.md"
    return block.group(1)


# a tiny random BERT and a few batches: what the README calls `base_model` and `loader`
_TOY_PRELUDE = textwrap.dedent("""
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    base_model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32, num_labels=2))
    loader = [{"input_ids": torch.randint(0, 64, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long),
               "labels": torch.randint(0, 2, (4,))} for _ in range(3)]
    import os; os.chdir(__import__("tempfile").mkdtemp())
""")

_CHECK_LIGHT = textwrap.dedent("""
    import sys
    heavy = {heavy!r}
    loaded = sorted(h for h in heavy if h in sys.modules)
    assert not loaded, f"the method loaded the reproduction's packages: {{loaded}}"
    print("LIGHT-OK")
""")


def _run(code: str, python: str = sys.executable, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def test_import_structlora_loads_no_reproduction_package():
    res = _run("import structlora, structlora.diagnostics, structlora.export, structlora.lowrank\n"
               + _CHECK_LIGHT.format(heavy=HEAVY))
    assert "LIGHT-OK" in res.stdout, res.stderr[-3000:]


def test_readme_own_model_snippet_runs_as_printed_and_stays_light():
    code = _TOY_PRELUDE + _snippet("## Using StructLoRA on your own model") + _CHECK_LIGHT.format(heavy=HEAVY)
    res = _run(code)
    assert "LIGHT-OK" in res.stdout, res.stderr[-3000:]


def _imports(path: Path) -> set[str]:
    """Modules of the structlora package imported by ``path`` anywhere (lazy and TYPE_CHECKING imports count)."""
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg = pkg.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = _resolve(path, node)
            if mod.startswith("structlora"):
                if not pkg.startswith(mod + ".") and mod != pkg:  # `from . import x` imports x, not the parent
                    out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("structlora"))
    return out


def test_no_import_circles_and_arrows_point_down():
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "structlora").rglob("*.py")}
    graph = {m: {d for d in _imports(p) if d in files and d != m} for m, p in files.items()}
    for mod, deps in graph.items():
        if not mod.startswith("structlora.repro"):
            bad = sorted(d for d in deps if d.startswith("structlora.repro"))
            assert not bad or mod == "structlora.__main__", f"the method module {mod} imports the reproduction: {bad}"
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1 and not (d == m.rsplit(".", 1)[0]):
                cycle = stack[stack.index(d):] + [d] if d in stack else [m, d]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name that ``node`` (``from X import ...``, relative or not) imports from."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    base = parts[:-1]  # the package holding ``path`` (for an ``__init__.py``, the package itself)
    if not node.level:
        return node.module or ""
    parent = base[: len(base) - node.level + 1]
    return ".".join(parent + ([node.module] if node.module else []))


def _private_uses(path: Path, modules: set[str]) -> list[str]:
    """Where ``path`` uses a private name (``_x``, not ``__x__``) of another structlora module.

    Counts ``from structlora.m import _x``, ``from .m import _x`` and ``alias._x`` where ``alias`` is bound
    to a structlora module (by ``import structlora.m as alias``, ``from structlora import m`` or
    ``from . import m``, also ``structlora.m._x`` after ``import structlora.m``). A private *module* of the
    package (``structlora/_io.py``) is a package-internal module, not a private name of another module.
    """
    me = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}  # a local name -> the structlora module it is bound to
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = _resolve(path, node)
            if not mod.startswith("structlora"):
                continue
            for a in node.names:
                if f"{mod}.{a.name}" in modules:  # a submodule
                    aliases[a.asname or a.name] = f"{mod}.{a.name}"
                elif _is_private(a.name) and mod != me:
                    bad.append(f"line {node.lineno}: from {mod} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("structlora"):
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases[a.name.split(".")[0]] = a.name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            chain, inner = [], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in aliases:
                target = ".".join([aliases[inner.id], *reversed(chain)])
                if target in modules and target != me:
                    bad.append(f"line {node.lineno}: {target}.{node.attr}")
    return bad


def test_no_module_uses_a_private_name_of_another():
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "structlora").rglob("*.py")}
    uses = {m: _private_uses(p, set(files)) for m, p in sorted(files.items())}
    bad = {m: u for m, u in uses.items() if u}
    assert not bad, f"modules use private names of other modules (give them public names): {bad}"


@pytest.mark.slow
def test_bare_pip_install_runs_the_readme_snippet(tmp_path: Path):
    """``pip install .`` (no extras) into an empty venv: the README snippet runs and loads nothing heavy.

    torch comes from this machine's CPU wheel (the same range pyproject.toml declares); everything else
    is resolved by pip from pyproject.toml's ranges, as a library user would get it.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    wheels = sorted(Path("/opt/wheels").glob("torch-*cpu*.whl")) if Path("/opt/wheels").is_dir() else []
    if wheels:
        subprocess.run([py, "-m", "pip", "install", "-q", str(wheels[-1])], check=True)
    res = subprocess.run([py, "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    freeze = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True).stdout.lower()
    for pkg in ("pandas", "matplotlib", "papermill", "datasets", "timm", "seaborn", "jupyterlab"):
        assert f"\n{pkg}==" not in "\n" + freeze, f"`pip install .` pulled {pkg}"
    code = _TOY_PRELUDE + _snippet("## Using StructLoRA on your own model") + _CHECK_LIGHT.format(heavy=HEAVY)
    out = _run(code, python=py, timeout=600)
    assert "LIGHT-OK" in out.stdout, out.stderr[-3000:]

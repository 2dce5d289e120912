# The README's two commands: `make reproduce` (main job, cpu tier) and `make test`.
PY := .venv/bin/python
TIER ?= cpu

.PHONY: setup lock lab test test-slow reproduce bench
setup:
	bash scripts/setup.sh

# Re-resolve requirements.lock from pyproject.toml (all extras) + requirements.in (the pins), with
# pip-tools; the project itself is installed editable by setup, so its own line is dropped.
lock: setup
	$(PY) -m piptools compile -q --all-extras --strip-extras --allow-unsafe --no-emit-index-url \
	  --no-emit-find-links --no-emit-trusted-host -o requirements.lock pyproject.toml requirements.in
	sed -i '/^structlora @ /d' requirements.lock

# JupyterLab from .venv, opened on the notebooks folder
lab: setup
	$(PY) -m jupyter lab notebooks

# the unit/integration tests and the notebooks (smoke tier) under nbval, in one pytest run
test: setup
	$(PY) -m pytest -q tests notebooks --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg; \
	rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected" >&2; exit 1; }; exit $$rc

test-slow: setup
	$(PY) -m pytest -q -m slow tests

reproduce: setup
	$(PY) -m structlora reproduce --tier $(TIER) $(if $(ONLY),--only $(ONLY)) $(if $(RETRAIN),--retrain)

bench: setup
	$(PY) benchmarks/overhead.py

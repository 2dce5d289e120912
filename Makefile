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

# the unit/integration tests (the smoke tier of every notebook among them) and nbval over the committed
# notebooks (the cpu tier re-executed from the committed records, checked cells compared), in one pytest run
test: setup
	$(PY) -m pytest -q tests notebooks --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg; \
	rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected" >&2; exit 1; }; exit $$rc

test-slow: setup
	$(PY) -m pytest -q -m slow tests

# cpu / gpu tier: re-execute the notebooks from the committed run records (minutes: runs without a
# record are shown as pending and listed in results/pending.<tier>.jsonl); TRAIN=1 first trains the
# pending runs (hours, resumable, the pre-registered primary family first); RETRAIN=1 trains every run
# again. The smoke tier always trains (seconds-long runs, never committed).
ONLY_ARG = $(if $(ONLY),--only $(ONLY))
reproduce: setup
ifeq ($(TIER),smoke)
	$(PY) -m structlora reproduce --tier smoke $(ONLY_ARG) $(if $(RETRAIN),--retrain)
else ifdef RETRAIN
	$(PY) -m structlora reproduce --tier $(TIER) $(ONLY_ARG) --retrain
else
	$(if $(TRAIN),$(PY) -m structlora reproduce --tier $(TIER) $(ONLY_ARG) --records-only --no-ledger && \
	  $(PY) -m structlora reproduce --tier $(TIER) --train-pending &&) \
	$(PY) -m structlora reproduce --tier $(TIER) $(ONLY_ARG) --records-only $(if $(filter cpu,$(TIER)),--update-notebooks)
endif

bench: setup
	$(PY) benchmarks/overhead.py

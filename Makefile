# The README's two commands: `make reproduce` (main job, cpu tier) and `make test`.
PY := .venv/bin/python
TIER ?= cpu

.PHONY: setup test test-slow reproduce bench
setup:
	bash scripts/setup.sh

# the unit/integration tests and the notebooks (smoke tier) under nbval, in one pytest run
test: setup
	$(PY) -m pytest -q tests notebooks --nbval-lax --nbval-sanitize-with notebooks/nbval_sanitize.cfg; \
	rc=$$?; [ $$rc -eq 5 ] && { echo "no tests collected" >&2; exit 1; }; exit $$rc

test-slow: setup
	$(PY) -m pytest -q -m slow tests

reproduce: setup
	$(PY) -m structlora reproduce --tier $(TIER) $(if $(ONLY),--only $(ONLY))

bench: setup
	$(PY) benchmarks/overhead.py

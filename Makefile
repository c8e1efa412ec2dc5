# Everything a fresh machine needs goes through these targets.
#   make demo   - fetch a real model, export it, run the daemon on 3 local RTSP cameras
#   make test   - the whole test suite
#   make bench  - throughput and freshness: raw ONNX Runtime vs streamd vs Ultralytics
#                 (BENCH_ARGS="--sizes 320 --cameras 4" to narrow it, "--record" to keep it,
#                 "--backends" for ONNX Runtime vs OpenVINO side by side)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BENCH_ARGS ?=

.PHONY: setup system venv demo test bench clean

setup: system venv

system:
	@bash tools/setup_system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[export,test]'
	@touch $@

demo: setup
	$(PY) tools/demo.py

test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf demo-out .pytest_cache

# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Both do their own set-up: a virtual environment, the package, and the offline assets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow assets bench

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

assets: $(STAMP)
	$(PY) launch/prepare_assets.py

demo: assets
	$(VENV)/bin/deepspeed --num_gpus $$($(PY) launch/train.py --config configs/demo.yaml --world-size) \
		launch/train.py --config configs/demo.yaml

test: $(STAMP)
	$(PY) launch/prepare_assets.py --stages tokenizers
	$(PY) -m pytest

test-slow: assets
	$(PY) -m pytest -m slow

bench: assets
	$(PY) benchmarks/alignment.py
	$(PY) benchmarks/fused_loss.py
	$(PY) benchmarks/dispatch.py
	$(PY) benchmarks/packing.py

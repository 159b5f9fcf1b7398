# fastclr developer commands. Each target creates .venv (Python 3.11, pip) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint format bench bench-loss bench-pipeline bench-cpu-augment bench-train bench-gpu bench-demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## The main job: SimCLR pretraining on the embedded default data set (a few minutes on a CPU).
demo: $(STAMP)
	$(VENV)/bin/fastclr pretrain --preset cpu-demo

## The test suite CI runs (slow checks excluded: run them with `make test-all`).
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-loss: $(STAMP)
	$(PY) bench/bench_loss.py

bench-pipeline: $(STAMP)
	$(PY) bench/bench_pipeline.py

bench-cpu-augment: $(STAMP)
	$(PY) bench/bench_cpu_augment.py

bench-train: $(STAMP)
	$(PY) bench/bench_train.py

## Everything a GPU must confirm (correctness, kernel timings, DALI GPU pipeline, ResNet-50 steps) in one run.
bench-gpu: $(STAMP)
	$(PY) bench/gpu_check.py

## The demo over seeds 0-4: kNN before/after and total time per seed (bench/results/bench_demo.csv).
bench-demo: $(STAMP)
	$(PY) bench/bench_demo.py

bench: bench-loss bench-pipeline bench-cpu-augment bench-train

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

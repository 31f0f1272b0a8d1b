# Everyday commands; each is also written out in the README.
PY ?= .venv/bin/python
DATA ?= ../shared/data/fer2013

.PHONY: setup test test-fast lint train-reference bench

setup:
	python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
	.venv/bin/pip install -e ".[dev]"

test:
	FERKIT_DATA=$(DATA) $(PY) -m pytest -q -n 2 --dist loadfile

test-fast:
	FERKIT_DATA=$(DATA) $(PY) -m pytest -q -m "not slow"

lint:
	.venv/bin/ruff check . && .venv/bin/mypy

train-reference:
	$(PY) -m ferkit train --data $(DATA) --preset reference --run-dir runs/reference

bench:
	$(PY) benchmarks/bench_train_throughput.py --data $(DATA)

# Everyday commands; each is also written out in the README.
PY ?= .venv/bin/python
DATA ?= ../shared/data/fer2013

.PHONY: setup test lint train-seed bench

setup:
	python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
	.venv/bin/pip install -e ".[dev]"

test:
	FERKIT_DATA=$(DATA) $(PY) -m pytest -q

lint:
	.venv/bin/ruff check . && .venv/bin/mypy

train-seed:
	$(PY) -m ferkit train --data $(DATA) --preset seed --out runs/seed

bench:
	$(PY) benchmarks/bench_train_throughput.py --data $(DATA)

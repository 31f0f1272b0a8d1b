# Everyday commands; each is also written out in the README. From a fresh clone, `make demo` and `make test` each
# set up what they need first (a .venv with the README's CPU setup commands), once.
PY ?= .venv/bin/python
DATA ?= $(or $(FERKIT_DATA),$(abspath ../shared/data/fer2013))
SETUP = .venv/.ferkit-setup

.PHONY: setup demo test test-fast lint train-reference bench bench-cli

# The README's CPU setup, word for word; the stamp is written only once both installs succeed.
$(SETUP): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
	.venv/bin/pip install -e ".[dev]"
	touch $(SETUP)

setup: $(SETUP)

# The main job on the sample photo that ships with the repository (examples/README.md names its source):
# the table of faces, and an annotated copy in annotated/.
demo: $(SETUP)
	.venv/bin/ferkit predict examples/astronaut.jpg --annotate annotated/

test: $(SETUP)
	FERKIT_DATA=$(DATA) $(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: $(SETUP)
	FERKIT_DATA=$(DATA) $(PY) -m pytest -q -m "not slow"

lint: $(SETUP)
	.venv/bin/ruff check . && .venv/bin/mypy

train-reference: $(SETUP)
	$(PY) -m ferkit train --data $(DATA) --preset reference --run-dir runs/reference

bench: $(SETUP)
	$(PY) benchmarks/bench_train_throughput.py --data $(DATA)

bench-cli: $(SETUP)
	$(PY) benchmarks/cli_latency.py --out docs/results/cli/cli_latency.json

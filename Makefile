# Two commands on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtualenv in .venv and install what they need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEV_STAMP := $(VENV)/.mlpool-dev-installed

.PHONY: demo quickstart test bench bench-batching bench-payload bench-memory chaos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## The main job: the demo API under load, scoring in-process and then on mlpool.
demo: $(DEV_STAMP)
	$(BIN)/python examples/demo.py

## Every API family on the seed's models, in one script (ten seconds).
quickstart: $(DEV_STAMP)
	$(BIN)/python examples/quickstart.py

## The whole test suite (real worker processes).
test: $(DEV_STAMP)
	$(BIN)/python -m pytest

## Per-job overhead against the raw pipe and ProcessPoolExecutor.
bench: $(DEV_STAMP)
	$(BIN)/python bench/overhead.py

## Batched against unbatched scoring of a scikit-learn RandomForest.
bench-batching: $(DEV_STAMP)
	$(BIN)/python bench/batching.py

## Large arrays in and out: shared memory against the pipe.
bench-payload: $(DEV_STAMP)
	$(BIN)/python bench/payload.py

## Memory and restart time of share_models against spawned workers.
bench-memory: $(DEV_STAMP)
	$(BIN)/python bench/memory.py

## Sustained load while workers are SIGKILLed at random (20 s).
chaos: $(DEV_STAMP)
	$(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache examples/models

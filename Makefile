# Two commands on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtualenv in .venv and install what they need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEV_STAMP := $(VENV)/.mlpool-dev-installed
DEMO_STAMP := $(VENV)/.mlpool-demo-installed
BENCH_STAMP := $(VENV)/.mlpool-bench-installed
PEERS := bench/.peers

.PHONY: demo quickstart test soak dist bench bench-overhead bench-instructions bench-batching bench-payload bench-arrays bench-memory bench-reload bench-fairness bench-streaming bench-shared chaos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The demo needs only the demo extra (no pytest, Ray, pandas or pyarrow); a dev install has it too.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	if [ -f $(DEV_STAMP) ] && [ $(DEV_STAMP) -nt pyproject.toml ]; then :; \
	else $(BIN)/python -m pip install --quiet -e '.[demo]'; fi
	touch $@

## The main job: the demo API under load, scoring in-process and then on mlpool.
demo: $(DEMO_STAMP)
	$(BIN)/python examples/demo.py

## Every API family on the demo's models, in one script (ten seconds).
quickstart: $(DEMO_STAMP)
	$(BIN)/python examples/quickstart.py

## Lint and type checks (configured in pyproject.toml), then the whole test suite (real worker processes).
## The test files run in TEST_PROCESSES processes at once (pytest-xdist), each file's tests in one of them
## in order, so a module's shared pool or server is started once; most tests wait on their workers.
TEST_PROCESSES ?= 2
test: $(DEV_STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/mypy src/mlpool
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile

## The soak tests the default run leaves out: the same checks as some of `make test`'s at
## 3 to 10 times the count (200 worker restarts, 100,000 unfetched results); a few minutes.
soak: $(DEV_STAMP)
	$(BIN)/python -m pytest -m soak

## The release: the sdist and the wheel in dist/ (python -m build), their metadata checked
## (twine check). `make test` installs such a wheel in a fresh virtualenv (tests/test_wheel.py).
dist: $(DEV_STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

$(BENCH_STAMP): pyproject.toml $(DEV_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(PEERS)/mlpool-0.1.0 mlpool==0.1.0
	touch $@

## mlpool against in-process, ProcessPoolExecutor, loky, mpire, Ray actors and
## mlpool 0.1.0 on five workloads (about 3 minutes); installs the peers first.
bench: $(BENCH_STAMP)
	$(BIN)/python bench/suite.py

## Per-job overhead against the raw pipe and ProcessPoolExecutor.
bench-overhead: $(DEV_STAMP)
	$(BIN)/python bench/overhead.py

## The hot path against another commit (OLD=<rev>, default 7ddd685): instructions per job
## under callgrind (deterministic; needs valgrind), then 5 interleaved timed rounds.
OLD ?= 7ddd685
bench-instructions: $(DEV_STAMP)
	$(BIN)/python bench/instructions.py $(OLD) --timed 5

## Batched against unbatched scoring of a scikit-learn RandomForest.
bench-batching: $(DEV_STAMP)
	$(BIN)/python bench/batching.py

## Large arrays in and out: shared memory against the pipe.
bench-payload: $(DEV_STAMP)
	$(BIN)/python bench/payload.py

## Large arrays (8 MB, 64 MB, both ways) against another commit (OLD=<rev>), interleaved.
bench-arrays: $(DEV_STAMP)
	$(BIN)/python bench/arrays_ab.py $(OLD) --rounds 7

## A new model version under load: reload_models (surge=1, surge=0) against restarting the pool.
bench-reload: $(DEV_STAMP)
	$(BIN)/python bench/reload.py

## Memory and restart time of share_models against spawned workers.
bench-memory: $(DEV_STAMP)
	$(BIN)/python bench/memory.py

## Two tenants, one flooding: quiet tenant's p99 and Jain's index, sessions against a FIFO;
## memory of 3 models x 4 workers with and without worker groups.
bench-fairness: $(DEV_STAMP)
	$(BIN)/python bench/fairness.py

## Streams: time to first item, items/s and the worker CPU spent after the client left,
## against a Ray actor generator and Gunicorn's dirty workers (installed next to the bench).
bench-streaming: $(DEV_STAMP)
	[ -d $(PEERS)/gunicorn/gunicorn/dirty ] || $(BIN)/python -m pip install --quiet --no-deps --target $(PEERS)/gunicorn 'gunicorn>=25'
	$(BIN)/python bench/streaming.py

## Several API processes: uvicorn --workers 2/4 sharing one pool, against a pool per process and
## Gunicorn's dirty workers (installed next to the bench): req/s, /healthz p99, PSS (about 3 minutes).
bench-shared: $(DEV_STAMP)
	[ -d $(PEERS)/gunicorn/gunicorn/dirty ] || $(BIN)/python -m pip install --quiet --no-deps --target $(PEERS)/gunicorn 'gunicorn>=25'
	$(BIN)/python bench/shared_serving.py

## Sustained load while workers are SIGKILLed at random (20 s).
chaos: $(DEV_STAMP)
	$(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache examples/models $(PEERS)

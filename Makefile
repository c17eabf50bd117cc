# The two commands of the README, and the chores around them.
#   make serve   set up, build the example models, serve them (Ctrl-C stops everything)
#   make test    set up, then lint, type-check and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TF_STAMP := $(VENV)/.tensorflow

.PHONY: serve test test-unit lint types pytest bench sidebyside models clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[cpu,torch,test,analyze]"
	touch $(STAMP)

# TensorFlow only for the tests of `natron convert`'s TensorFlow sources: serving needs none of it.
$(TF_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[tensorflow]"
	touch $(TF_STAMP)

models: $(STAMP)
	$(BIN)/python examples/build_models.py --out examples/models
	$(BIN)/python examples/build_backend_models.py --out examples/models
	$(BIN)/python examples/build_text_models.py --out examples/models

serve: models
	$(BIN)/natron serve examples/models

test: lint types pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

types: $(STAMP)
	$(BIN)/mypy

# Two tiers: `unit` starts no process (seconds), `mesh` runs real nats-server and natron processes.
pytest: $(STAMP) $(TF_STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -m unit
	$(BIN)/python -m pytest -p no:cacheprovider -m mesh --durations=20

test-unit: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -m unit

# The benchmark needs wrk, Debian's package.
bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench.bench

# natron beside Triton (bench/sidebyside.py); Triton and perf_analyzer go to .venv-triton.
sidebyside: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	scripts/install_triton.sh
	$(BIN)/python -m bench.sidebyside

clean:
	rm -rf $(VENV) examples/models bench/results .mypy_cache .ruff_cache .pytest_cache

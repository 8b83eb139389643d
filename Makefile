# make demo: set up .venv (if missing) and run the default job on the built-in synthetic category.
# make test: same set-up, then the test suite.
# make bench [BENCH=name]: run every benchmark (or one) and assemble benchmarks/RESULTS.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-fast lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m mvtec_seg

test: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

test-fast: install   # the suite without the tests that start the CLI or several processes
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench: install   # every benchmarks/<name>.py (or BENCH=<name>), then benchmarks/RESULTS.md
	WANDB_MODE=disabled $(BIN)/python benchmarks/run_all.py $(if $(BENCH),--only $(BENCH))

clean:
	rm -rf outputs multirun .pytest_cache

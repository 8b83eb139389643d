# make demo: set up .venv (if missing) and run the whole comparison (teacher, pseudo masks, U-Net on GT and on
#   PSEUDO, TransFusion, report) on the built-in synthetic category; prints the headline table.
# make test: same set-up, then the test suite.
# make bench [SUITE=quality|speed|metrics]: run the benchmark suites (or one), then benchmarks/RESULTS.md.
# make report-screenshots: report.html of fabricated runs rendered by headless Chromium at 1400 and 900 px
#   into outputs/report_screenshots/ (look at them: every figure whole, long labels wrapped).
# make wheels: .whl/ with the pure-Python dependencies, for installing on a machine without an index.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-fast lint format bench report-screenshots wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m mvtec_seg.compare experiment=demo

test: install
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

test-fast: install   # the suite without the tests marked slow (over 3 s each on 2 CPU cores)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench: install   # benchmarks/suites/*.yaml -> benchmarks/results/*.csv -> benchmarks/RESULTS.md
	WANDB_MODE=disabled $(BIN)/python -m benchmarks $(or $(SUITE),all)

report-screenshots: install   # needs chromium (apt-get install chromium)
	mkdir -p outputs/report_screenshots
	REPORT_SCREENSHOTS=$(CURDIR)/outputs/report_screenshots WANDB_MODE=disabled $(BIN)/python -m pytest -q \
		tests/test_report_render.py -rs
	ls outputs/report_screenshots

# torch, Lightning, torchmetrics and scikit-image come as platform wheels; these four are pure Python.
WHEELS := hydra-core|omegaconf|segmentation.models.pytorch|antlr4-python3-runtime
wheels: install
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip freeze | grep -i -E '^($(WHEELS))==' > .whl/requirements.txt
	grep -v antlr4 .whl/requirements.txt | xargs $(BIN)/python -m pip download -q --no-deps -d .whl
	grep antlr4 .whl/requirements.txt | xargs $(BIN)/python -m pip wheel -q --no-deps -w .whl   # sdist only
	ls .whl

clean:
	rm -rf outputs multirun .pytest_cache

# Two commands do everything: `make run` (all notebooks, default profile) and `make test`.
# Both create .venv with the pinned versions on first use and skip the install when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROFILE ?= default
ONLY ?=
PYTEST_ARGS ?=

.PHONY: run test install lint data-check notebooks-strip clean-figures

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## make run [PROFILE=smoke|default|full] [ONLY=01]: execute the notebooks, write figures/ and metrics.json
run: $(STAMP)
	$(BIN)/cellkit run-notebooks --profile $(PROFILE) $(if $(ONLY),--only $(ONLY))

## make test: unit tests, CLI tests, and every notebook in the smoke profile on real data
test: $(STAMP) data-check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

data-check: $(STAMP)
	$(BIN)/cellkit data check

lint: $(STAMP)
	$(BIN)/ruff check .

## make notebooks-strip: remove outputs from notebooks before committing
notebooks-strip: $(STAMP)
	$(BIN)/python -m cellkit.notebooks strip notebooks/*.ipynb

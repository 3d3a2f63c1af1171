# Two commands do everything: `make run` (all notebooks, default profile) and `make test`.
# Both create .venv with the pinned versions on first use and skip the install when nothing changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROFILE ?= default
ONLY ?=
PYTEST_ARGS ?=

CHROMIUM ?= /usr/bin/chromium

.PHONY: run test install lint data-check notebooks-strip browser models app site

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The default profile's whole run first trains the models notebook 07 reuses (make models), when the data are there.
MODELS_FIRST := $(if $(and $(filter default,$(PROFILE)),$(if $(ONLY),,all)),models)

## make run [PROFILE=smoke|default|full] [ONLY=01]: execute the notebooks, write figures/ and metrics.json; the
## default profile's whole run trains models/ first (make models) unless they exist
run: $(STAMP)
	@$(BIN)/cellkit data check --fetch || echo "WARNING: the real datasets are missing and could not be fetched: \
	the notebooks fall back to the simulated stand-in and say so in their records and figures" >&2
	@if [ -n "$(MODELS_FIRST)" ]; then if $(BIN)/cellkit data check > /dev/null 2>&1; then \
	  $(MAKE) --no-print-directory models; else echo "WARNING: no real data: models/ is not trained and \
	notebook 07 trains its own model" >&2; fi; fi
	$(BIN)/cellkit run-notebooks --profile $(PROFILE) $(if $(ONLY),--only $(ONLY))
	$(if $(filter default,$(PROFILE)),$(BIN)/cellkit report --write)

## make test: unit tests, CLI tests, the app in a browser, and every notebook in the smoke profile on real data
test: $(STAMP) data-check browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make browser: Debian's Chromium for the app's browser test (Playwright's own download is not used)
browser:
	@test -x $(CHROMIUM) || { export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends chromium < /dev/null || \
	  { apt-get update < /dev/null && apt-get install -y --no-install-recommends chromium < /dev/null; }; }
	@test -x $(CHROMIUM) || { echo "error: $(CHROMIUM) missing; install Debian's chromium package" >&2; exit 1; }

## make models: the default classifier and U-Net in models/ (on 2 idle cores about half an hour with bfloat16, about an
## hour in float32, most of it the U-Net's 40 epochs); skips a model that exists
models: models/cellnet.keras models/unet.keras

models/cellnet.keras: | $(STAMP)
	$(BIN)/cellkit train classifier --out $@

models/unet.keras: | $(STAMP)
	$(BIN)/cellkit train unet --out $@

## make site [PROFILE=default]: the course website in site/ from the notebooks make run executed (open site/index.html)
site: $(STAMP)
	$(BIN)/cellkit site --profile $(PROFILE) --out site

## make app: the interactive app on http://127.0.0.1:8000 (models from models/)
app: $(STAMP)
	$(BIN)/cellkit app

## make data-check: find the datasets (CELLKIT_DATA_DIR, then data/); fetch the missing ones, or stop in one line
data-check: $(STAMP)
	$(BIN)/cellkit data check --fetch

lint: $(STAMP)
	$(BIN)/ruff check .

## make notebooks-strip: remove outputs from notebooks before committing
notebooks-strip: $(STAMP)
	$(BIN)/python -m cellkit.notebooks strip notebooks/*.ipynb

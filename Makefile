# The two commands README promises: `make demo` (the main job on the sample data) and `make test`.
# `make demo` runs the whole KFP pipeline with kfp.local and MLflow on demo-output/mlflow.db.
# Both create .venv and install what they need; the install is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
DEMO_OUT ?= demo-output

.PHONY: demo test lint install clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	$(BIN)/shopvision pipeline run --demo --data data/sample/raw --taxonomy data/sample/taxonomy.csv \
		--workdir $(DEMO_OUT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The browser tests (tests/test_pages.py) drive Debian's chromium through chromedriver, and the alert
# rule tests (tests/test_alert_rules.py) run promtool from Debian's prometheus; CI runs as root.
test: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && apt-get install -y chromium chromium-driver)
	command -v promtool >/dev/null || (apt-get update && apt-get install -y --no-install-recommends prometheus)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean-demo:
	rm -rf $(DEMO_OUT)

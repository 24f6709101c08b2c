# The two commands README promises: `make demo` (the main job on the sample data) and `make test`.
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
	$(BIN)/shopvision clean data/sample/raw $(DEMO_OUT)/clean --size 224
	$(BIN)/shopvision split $(DEMO_OUT)/clean $(DEMO_OUT)/split --val 0.15 --test 0.15
	$(BIN)/shopvision balance $(DEMO_OUT)/split $(DEMO_OUT)/balance --percentile 98
	$(BIN)/shopvision augment $(DEMO_OUT)/balance $(DEMO_OUT)/augment
	@echo "demo: data steps done; training data in $(DEMO_OUT)/augment/{train,val,test}"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean-demo:
	rm -rf $(DEMO_OUT)

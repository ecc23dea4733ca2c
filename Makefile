# Two commands on a fresh machine: `make demo` and `make test`. Each does all set-up itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch: on a box with no GPU a bare `torch` requirement pulls a multi-GB CUDA
# build. Here a CPU wheel of 2.13.0 lies in pip's find-links; elsewhere set TORCH_PIP_ARGS, e.g.
#   make test TORCH_PIP_ARGS="--index-url <your PyTorch CPU wheel index>"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast lint typecheck pytest demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing torch from the default index"; \
	else \
		echo "no GPU: installing the CPU build of torch ($(TORCH_SPEC))"; \
		$(BIN)/pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS); \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	@# The browser test drives Debian's chromium (never a downloaded browser); it skips without it.
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium not installed: the browser test will skip"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q -ra

test: lint typecheck pytest

# The inner loop: every test not marked slow (CI and `make test` run them all).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/sae demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

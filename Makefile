# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on these machines' disk; a bare `torch` requirement
# resolved from scratch would pull a multi-GB CUDA build, so pin it first.
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast gpu-check install install-dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.torch: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/qdistill study configs/demo.toml --out runs/demo

# Two workers, one torch thread each (tests/conftest.py): the 2-core machine, fully used.
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test: $(VENV)/.installed-dev
	$(PYTEST)

test-fast: $(VENV)/.installed-dev  # the inner loop: everything but the tests marked slow
	$(PYTEST) -m "not slow"

gpu-check: $(VENV)/.installed-dev  # one line per check; on a machine with a CUDA GPU (scripts/gpu-check.sh)
	PYTHON=$(BIN)/python bash scripts/gpu-check.sh

clean:
	rm -rf $(VENV) runs

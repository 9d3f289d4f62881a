# Two entry points (the README's Quickstart): `make demo` and `make test`; each creates the venv it needs.
# CONSTRAINTS pins the CPU build of torch on CPU-only machines; elsewhere run `make test CONSTRAINTS=`.
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PIP_C = $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(PIP_C) -e '.[dev,eval,nudenet,onnx]'
	$(VENV)/bin/pip install -q $(PIP_C) --no-deps clean-fid  # its torchvision dependency is never imported here
	touch $@

.PHONY: install test test-slow demo lint
install: $(VENV)/.installed

# the fast set (a few minutes on 2 cores); CI also runs the slow end-to-end tests and the linter
test: $(VENV)/.installed
	$(VENV)/bin/pytest -m "not slow"

test-slow: $(VENV)/.installed  # exit code 5 = no test is marked slow
	$(VENV)/bin/pytest -m slow || [ $$? -eq 5 ]

demo: $(VENV)/.installed
	$(VENV)/bin/safeprune demo --out runs/demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks

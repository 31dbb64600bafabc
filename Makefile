# nnunetv2_macl: build / test entry points (CI runs .ci/run -> `make test`).
#   make venv       create $(VENV) with the pinned stack (constraints-ci.txt) + this package (editable)
#   make test       full suite incl. the e2e and realdata tiers (skips if ../shared/data is absent);
#                   prints the 20 slowest tests
#   make test-fast  everything except the e2e and realdata tiers (one full pipeline, the demo, stays in)
#   make demo       the end-to-end demo on the embedded synthetic dataset
#   make clean      remove caches, build artefacts and demo/work outputs (keeps $(VENV))
# Use an existing environment with e.g. `make test VENV=/path/to/venv`.

VENV ?= .venv
PYTHON ?= python3
CONSTRAINTS := constraints-ci.txt
STAMP := $(VENV)/.macl-installed
PYTEST_ARGS ?=

export nnUNet_def_n_proc ?= 2
export nnUNet_n_proc_DA ?= 2

.PHONY: venv test test-fast demo clean

venv: $(STAMP)

# Re-installs only when the pins or the package metadata change.
$(STAMP): setup.py $(CONSTRAINTS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -c $(CONSTRAINTS) torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/python -m pip install -q -c $(CONSTRAINTS) -e . pytest
	touch $(STAMP)

test: venv
	$(VENV)/bin/python -m pytest -q -ra --durations=20 $(PYTEST_ARGS)

test-fast: venv
	$(VENV)/bin/python -m pytest -q -ra --durations=20 -m "not realdata and not e2e" $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/macl_demo

clean:
	rm -rf build dist *.egg-info .pytest_cache demo_output work_dirs
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

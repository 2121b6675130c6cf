# Everything creates and uses a local virtual environment (.venv) by itself.
# `make demo` runs the toy table on CPU; `make test` runs the test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pfdiff-bench-installed
SHELL := /bin/bash
# Where pip's config lists file:// extra indexes (see `pip config list`), pip warns "Location
# 'file:///.../simple/<pkg>/' is ignored" once per package missing there: only those lines are dropped;
# every other line and pip's exit status (pipefail) are kept.
PIP_INSTALL = set -o pipefail; $(BIN)/python -m pip install -q --disable-pip-version-check
PIP_QUIET = 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }

.PHONY: setup demo test verify reproduce-table2 reproduce-table3 reproduce-lsun reproduce-scoresde reproduce-imagenet256 reproduce-sd reproduce-toy bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned to the release whose wheels are on the build machines' disk
	$(PIP_INSTALL) torch==2.14.1 torchvision==0.29.1 $(PIP_QUIET)
	$(PIP_INSTALL) -e '.[test]' $(PIP_QUIET)
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/pfdiff-bench demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

verify: $(STAMP)
	$(BIN)/pfdiff-bench verify samplers
	$(BIN)/pfdiff-bench verify arch

clean:
	rm -rf $(VENV) build *.egg-info

reproduce-toy: $(STAMP)
	$(BIN)/pfdiff-bench reproduce toy

reproduce-table2: $(STAMP)
	$(BIN)/pfdiff-bench reproduce table2

reproduce-table3: $(STAMP)
	$(BIN)/pfdiff-bench reproduce table3

reproduce-lsun: $(STAMP)
	$(BIN)/pfdiff-bench reproduce lsun_bedroom
	$(BIN)/pfdiff-bench reproduce lsun_church

reproduce-scoresde: $(STAMP)
	$(BIN)/pfdiff-bench reproduce scoresde

reproduce-imagenet256: $(STAMP)
	$(BIN)/pfdiff-bench reproduce imagenet256

# Stable Diffusion v1.4 (CFG 7.5 and 1.5): needs the SD weights, COCO captions and coco2014_val statistics
CAPTIONS ?= captions_val2014.json
reproduce-sd: $(STAMP)
	$(BIN)/pfdiff-bench reproduce sd_cfg7.5 --captions $(CAPTIONS)
	$(BIN)/pfdiff-bench reproduce sd_cfg1.5 --captions $(CAPTIONS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

gpu-check: $(STAMP)
	bash scripts/gpu_check.sh

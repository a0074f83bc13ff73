# `make test` and `make bench` work on a fresh clone on a machine that has only Python:
# they create .venv, install torch (unless a torch >= 2.13 is already importable), the package
# editable with its test, bench (matplotlib) and onnx extras, then run.
# make bench       the headline set (whole networks and one row per op, original vs fast) in minutes
# make bench-full  every benchmark case, provider, mode and dtype (python -m bench.run --all)
# make ci-wheel    the wheel built, installed into a fresh venv outside the tree and used from
#                  there (.ci/wheel; .ci/run runs it after the tests)
# make ci-newest-torch  the newest torch of the range (2.14.1) with nnU-Net in a fresh venv: every
#                  extension built, verify, a test subset and the nnU-Net tests (.ci/newest-torch)
PYTHON       ?= python3
TORCH_VERSION ?= 2.13.0
VENV         := .venv
VPY          := $(VENV)/bin/python
STAMP        := $(VENV)/.installed

.PHONY: test bench bench-full build venv clean gpu-test ci-wheel ci-newest-torch

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(VPY) -c "import torch, sys; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 13) else 1)" 2>/dev/null \
	  || $(VPY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(VPY) -m pip install -q -e ".[test,bench,onnx]"
	@touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q -n 2

bench: $(STAMP)
	$(VPY) -m medattn_fast.cli bench

bench-full: $(STAMP)
	$(VPY) -m medattn_fast.cli bench --all

build: $(STAMP)
	$(VPY) -m medattn_fast.cli build

ci-wheel: $(STAMP)
	bash .ci/wheel $(VPY)

ci-newest-torch:
	bash .ci/newest-torch

gpu-test: $(STAMP)
	$(VPY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) .venv-newest-torch build *.egg-info

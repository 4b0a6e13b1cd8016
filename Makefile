# Two entry points for a fresh machine: `make demo` and `make test`. Each does its own set-up.
PY ?= python3

.PHONY: setup demo test info

# torch: keep an installed build (a GPU machine's CUDA torch); otherwise take the CPU build 2.13.0.
setup:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"

demo: setup
	$(PY) -m vstar_kernels demo

# -n auto: one test process per core (pytest-xdist); --dist loadfile keeps a file's tests, and its module
# fixtures (a multi-process run, a compiled library), in one process
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

info:
	$(PY) -m vstar_kernels info

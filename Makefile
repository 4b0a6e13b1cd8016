# Two entry points for a fresh machine: `make demo` and `make test`. Each installs what it needs, once.
PY ?= python3
# What an install was made from: setup.py's content and the interpreter PY is. A stamp under SETUP_DIR
# (git-ignored) per install says it was done; a change of either installs again (rm -r .setup forces it).
SETUP_DIR ?= .setup
KEY := $(shell { cat setup.py; command -v $(PY); } | cksum | cut -d' ' -f1)

.PHONY: demo test info setup-demo setup-test

# demo: the package and its requirements (torch, numpy, triton); test: every extra and pytest too.
INSTALL_demo := .
INSTALL_test := .[test]

# torch: keep an installed build (a GPU machine's CUDA torch); otherwise take 2.13.0: the CPU build where pip
# finds one (our machines' wheel directory), else PyPI's CUDA build and the Triton it pins (3.7.1); the suite
# passes with either.
$(SETUP_DIR)/%-$(KEY):
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e "$(INSTALL_$*)"
	@mkdir -p $(SETUP_DIR) && touch $@

# the test install holds the demo's
setup-demo: $(if $(wildcard $(SETUP_DIR)/test-$(KEY)),,$(SETUP_DIR)/demo-$(KEY))
setup-test: $(SETUP_DIR)/test-$(KEY)

demo: setup-demo
	$(PY) -m vstar_kernels demo

# -n auto: one test process per core (pytest-xdist); --dist loadfile keeps a file's tests, and its module
# fixtures (a multi-process run, a compiled library), in one process. Progress: a count at the end of each
# line of dots; the slowest tests are listed at the end.
test: setup-test
	$(PY) -m pytest -q -o console_output_style=count --durations=15 -n auto --dist loadfile --no-loadscope-reorder

info:
	$(PY) -m vstar_kernels info

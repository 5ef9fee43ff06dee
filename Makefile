# Two commands, each doing its own set-up on a fresh machine: `make bench` (the main job) and `make test`.
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qlora-kernels-installed
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/kernels/*.cu csrc/kernels/*.h)
# Without a GPU the Triton kernels run through Triton's interpreter (tests/conftest.py sets it for pytest).
TEST_ARGS ?=

.PHONY: test bench bench-quick install clean

$(STAMP): requirements.txt requirements-dev.txt setup.py pyproject.toml $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(TEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench

bench-quick: $(STAMP)
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info qlora_kernels/_C*.so

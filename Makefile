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
	@echo "set-up of $(VENV): about 15 minutes on a fresh 2-core machine, mostly downloads; done once, and again"
	@echo "only when requirements*.txt, setup.py or csrc/ change"
	@echo "[1/4 $$(date +%T)] virtual environment $(VENV)"
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	@echo "[2/4 $$(date +%T)] pip upgrade"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "[3/4 $$(date +%T)] requirements-dev.txt: torch, triton, bitsandbytes, transformers, peft, trl, ..."
	@echo "          (several GB: the long step)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@echo "[4/4 $$(date +%T)] qlora_kernels, editable, building its extension qlora_kernels._C"
	@echo "          (C++; CUDA too where nvcc is found)"
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)
	@echo "set-up done at $$(date +%T); run anything else with $(PY) (or: source $(VENV)/bin/activate)"

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(TEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench

bench-quick: $(STAMP)
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) build *.egg-info qlora_kernels/_C*.so

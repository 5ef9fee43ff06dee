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

# The optimizer/paged-memory tests and the NF4 CPU kernels' tests (awkward shapes, hostile storage: the SIMD loops read
# raw pointers) against an AddressSanitizer + UBSan build of the extension's CPU code, built by
# tests/build_asan_extension.py into build/asan (the normal in-tree qlora_kernels/_C*.so is not touched) and loaded
# through QLORA_KERNELS_EXTENSION. python is not instrumented, so the ASan runtime is preloaded; leak checking is off
# (the interpreter keeps its allocations at exit). Two loader tests are left out: extension_first loads the in-tree
# build by path, import_without_the_extension hides the installed one; neither is about memory safety.
# libstdc++ is preloaded too: python does not link it, and ASan's __cxa_throw interceptor must find it at start-up
# (else its first C++ exception, inside torch, aborts with "real___cxa_throw != 0").
ASAN_DIR := build/asan
ASAN_CXX ?= c++
ASAN_TESTS := tests/test_optim_paged.py tests/test_paged_memory.py tests/test_optim_hostile.py tests/test_cpu_kernels.py \
	tests/test_hostile_nf4.py
ASAN_DESELECT := not extension_first and not import_without_the_extension

.PHONY: test-asan
test-asan: $(STAMP)
	$(PY) tests/build_asan_extension.py $(ASAN_DIR)
	QLORA_KERNELS_EXTENSION=$(ASAN_DIR)/_C.so \
		LD_PRELOAD="$$($(ASAN_CXX) -print-file-name=libasan.so) $$($(ASAN_CXX) -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(PY) -m pytest -q -p no:cacheprovider $(ASAN_TESTS) -k "$(ASAN_DESELECT)" $(TEST_ARGS)

# The Triton 3.6 leg (the H200's Triton; CI and this venv run 3.9): a second venv with torch 2.13 (CPU) and
# triton==3.6.0, the package installed editable without building the extension (the NF4/linear kernels and their
# tests do not need qlora_kernels._C). Runs the sm_90 compile check of every kernel under 3.6 (through
# tests/test_sm90_compile.py) and the kernels' interpreter tests.
VENV36 := .venv-triton36
PY36 := $(VENV36)/bin/python
STAMP36 := $(VENV36)/.qlora-kernels-installed
TRITON36_TESTS := tests/test_sm90_compile.py tests/test_nf4_api.py tests/test_nf4_bnb.py tests/test_nf4_format.py \
	tests/test_lora_linear.py tests/test_int64_offsets.py tests/test_sass_model.py tests/test_nf4_asm.py \
	tests/test_dense_route.py tests/test_mma_order.py tests/test_split_k.py

$(STAMP36): requirements-triton36.txt setup.py pyproject.toml
	test -x $(PY36) || $(PYTHON_SYS) -m venv $(VENV36)
	$(PY36) -m pip install --quiet -r requirements-triton36.txt
	QLORA_KERNELS_NO_EXTENSION=1 $(PY36) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP36)

.PHONY: test-triton36
test-triton36: $(STAMP36)
	$(PY36) -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
	$(PY36) -m pytest -q $(TRITON36_TESTS)

"""Build qlora_kernels._C with AddressSanitizer (+ UBSan) into a directory of its own, for `make test-asan`.

    python tests/build_asan_extension.py build/asan     # builds build/asan/_C.so and prints its path

The normal build (``pip install -e .``, the in-tree ``qlora_kernels/_C*.so``) is not touched: the tests pick this one
up through ``QLORA_KERNELS_EXTENSION=<path>`` (qlora_kernels/_extension.py) and need the ASan runtime preloaded
(``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``) because python itself is not instrumented. CPU sources only: the
CUDA kernels are not built (ASan and the CUDA driver do not mix without more options than this check needs).
The semantic flags of setup.py are kept (-ffp-contract=off, -fno-math-errno, OpenMP) so that the bit-exact tests
still hold.
"""

from __future__ import annotations

import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


# cpp_extension.load imports what it builds: without the runtime preloaded, that works once the runtime is told not
# to insist on coming first. It reads its options from the environment the process started with (/proc/self/environ),
# so main() re-executes this script with them when they are missing.
BUILD_ASAN_OPTIONS = "verify_asan_link_order=0:detect_leaks=0"


def main(build_directory: str) -> str:
    from torch.utils import cpp_extension

    build_directory = os.path.abspath(build_directory)
    os.makedirs(build_directory, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    cpp_extension.load(
        name="_C",
        sources=sources,
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O1", "-g", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", *SANITIZE],
        extra_ldflags=["-fopenmp", *SANITIZE],
        build_directory=build_directory,
        with_cuda=False,
        is_python_module=True,
        verbose=False,
    )
    library = os.path.join(build_directory, "_C.so")  # the name cpp_extension.load gives it; the Makefile uses it
    if not os.path.isfile(library):
        raise SystemExit(f"the ASan build did not produce {library}")
    return library


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/build_asan_extension.py BUILD_DIRECTORY")
    if os.environ.get("ASAN_OPTIONS") != BUILD_ASAN_OPTIONS:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "ASAN_OPTIONS": BUILD_ASAN_OPTIONS})
    print(main(sys.argv[1]), flush=True)
    # The instrumented library loaded here without its runtime first cannot be torn down cleanly (glibc's free of
    # an ASan allocation at exit): the build is done, skip the interpreter's teardown.
    os._exit(0)

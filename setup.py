"""Build and install qlora_kernels.

Installs two Python packages: ``qlora_kernels`` and ``qlora_kernels.triton_kernels`` (from the top-level
``triton_kernels/`` folder; a top-level import name ``triton_kernels`` would clash with the Triton project's own).
Builds the extension ``qlora_kernels._C`` from ``csrc/`` when torch is importable at build time (use
``pip install --no-build-isolation``): CUDA + C++ when torch has CUDA and nvcc is found, C++ only otherwise. Without
torch in the build environment (plain ``pip install .`` with build isolation) the package installs without the
extension, and ``qlora_kernels.extension_available()`` says so.
"""

from __future__ import annotations

import glob
import os
import re

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(ROOT, "qlora_kernels", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def extension_build():
    """(ext_modules, cmdclass) for qlora_kernels._C, or nothing when it cannot be built here."""
    sources_cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources_cpp or os.environ.get("QLORA_KERNELS_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("qlora_kernels: torch is not importable at build time; installing without the extension _C")
        return [], {}
    sources_cu = sorted(glob.glob(os.path.join("csrc", "kernels", "*.cu")))
    # -fopenmp: the CPU kernels use at::parallel_for, whose OpenMP backend is inlined from ATen's headers and runs
    # serially unless this translation unit is compiled with OpenMP (torch ships and loads libgomp.so.1 itself).
    # -ffp-contract=off (host) and --fmad=false (device): no fused multiply-adds, so the optimizer step rounds the
    # same on every CPU ISA, on the GPU and in the Python reference (bit-identical results; the kernels are
    # memory-bound, FMAs would buy nothing). -fno-math-errno lets sqrtf vectorise. No -std: torch's build adds the
    # standard its own headers need (C++17 up to torch 2.12, C++20 from 2.13); the sources compile as either.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    link_flags = ["-fopenmp"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and bool(sources_cu)
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        # No --use_fast_math: the optimizers must track torch.optim.AdamW, which needs IEEE sqrt and division.
        nvcc_flags = ["-O3", "-lineinfo", "--fmad=false"]
        if not archs:
            nvcc_flags += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        ext = cpp_extension.CUDAExtension(
            "qlora_kernels._C",
            sources_cpp + sources_cu,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("QLORA_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "qlora_kernels._C",
            sources_cpp,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()

setup(
    name="qlora-kernels",
    version=read_version(),
    description="Fused QLoRA kernels for PyTorch: NF4 + LoRA linear in Triton, paged optimizers in C++/CUDA",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["qlora_kernels", "qlora_kernels.optim", "qlora_kernels.integrations", "qlora_kernels.triton_kernels"],
    package_dir={"qlora_kernels.triton_kernels": "triton_kernels"},
    package_data={"qlora_kernels.triton_kernels": ["sass_model.json"]},  # the static H200 model's committed counts
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton>=3.2"], "bnb": ["bitsandbytes>=0.43"], "peft": ["peft>=0.13"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)

"""Loads the optional C++/CUDA extension ``qlora_kernels._C``; importing qlora_kernels never fails because of it."""

from __future__ import annotations

from typing import Optional

_C = None
_IMPORT_ERROR: Optional[BaseException] = None
try:
    from . import _C  # type: ignore[attr-defined,no-redef]  # noqa: F811
except ImportError as exc:  # not built (pure-Python install) or built against another torch
    _IMPORT_ERROR = exc


def extension_available() -> bool:
    """True when the compiled extension ``qlora_kernels._C`` is loaded."""
    return _C is not None


def require_extension(what: str) -> None:
    """Raise a RuntimeError that says how to get the extension, when ``what`` needs it and it is missing."""
    if _C is None:
        raise RuntimeError(
            f"{what} needs the compiled extension qlora_kernels._C, which is not available ({_IMPORT_ERROR}). "
            "Build it with `pip install --no-build-isolation -e .` in an environment that has torch "
            "(and nvcc for the CUDA kernels)."
        )

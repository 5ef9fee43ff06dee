"""Loads the optional C++/CUDA extension ``qlora_kernels._C``; importing qlora_kernels never fails because of it.

``QLORA_KERNELS_EXTENSION=/path/to/_C.so`` loads that build instead of the installed one (``make test-asan`` uses it
for an AddressSanitizer build kept outside the source tree); a path that does not load is an ImportError, never a
silent fall-back to the installed build.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

EXTENSION_PATH_VARIABLE = "QLORA_KERNELS_EXTENSION"

_C = None
_IMPORT_ERROR: Optional[BaseException] = None


def _load_from(path: str):
    """Import the extension at ``path`` under the name qlora_kernels._C (its init function is PyInit__C)."""
    if not os.path.isfile(path):
        raise ImportError(f"{EXTENSION_PATH_VARIABLE}={path!r} is not a file")
    spec = importlib.util.spec_from_file_location(f"{__package__}._C", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{EXTENSION_PATH_VARIABLE}={path!r} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that `import qlora_kernels._C` elsewhere finds this build, not another
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


if os.environ.get(EXTENSION_PATH_VARIABLE):
    _C = _load_from(os.environ[EXTENSION_PATH_VARIABLE])
else:
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

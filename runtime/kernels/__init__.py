"""Triton kernels (each in its own file: the Triton interpreter reads kernel source).

Kernel modules are imported on first use, not with the package: `triton.jit` decides at
decoration time whether to compile or interpret (TRITON_INTERPRET=1), so tests on CPU can set
the variable before the first triton call.
"""

from __future__ import annotations

import importlib.util



def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None

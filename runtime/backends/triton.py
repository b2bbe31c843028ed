"""triton: Triton kernels forward and backward (runtime/kernels/); runs where triton imports
(on CPU under TRITON_INTERPRET=1, for tests)."""

from . import Backend


def _available() -> bool:
    from ..kernels import triton_available

    return triton_available()


def _load():
    from ..kernels import triton_backend

    return triton_backend


ENTRY = Backend(name="triton", summary="Triton kernels (opt-in; where triton imports)", load=_load,
                available=_available, order=2)

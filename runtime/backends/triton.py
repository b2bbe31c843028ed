"""triton: Triton kernels forward and backward (runtime/kernels/); runs where triton imports
(on CPU under TRITON_INTERPRET=1, for tests)."""

from . import Backend


def _available() -> bool:
    from ..kernels import triton_available

    return triton_available()


def triton_forward(experts, x, indices, weights):
    """The `triton` expert backend: x [T, D], indices/weights [T, K] -> [T, D], through the
    grouped path with the kernels (runtime/kernels/backend.py) forward and backward."""
    from ..grouped import grouped_forward

    return grouped_forward(experts, x, indices, weights, strategy="triton")


def _load():
    return triton_forward


ENTRY = Backend(name="triton", summary="Triton kernels (opt-in; where triton imports)", load=_load,
                available=_available, order=2)

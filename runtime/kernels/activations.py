"""Elementwise activations and their derivatives for Triton kernels, selected by a constexpr code.

Codes follow `ACT_CODES` (names from runtime.activations). All math is in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..activations import REGISTRY

ACT_CODES = {name: a.triton_code for name, a in REGISTRY.items()}  # the branches below, by code

# constants are written as literals: a plain float global is rejected by the compiler (not by
# the interpreter), and a tl.constexpr global breaks the interpreter. 0.70710678 = 1/sqrt(2),
# 0.39894228 = 1/sqrt(2 pi), 0.79788456 = sqrt(2/pi), 0.044715 = the tanh-GELU cubic coefficient.


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def act_fwd(x, ACT: tl.constexpr):
    """act(x) for an fp32 tile."""
    if ACT == 0:
        y = x * tl.sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == 3:
        y = x * tl.sigmoid(1.702 * x)
    elif ACT == 4:
        y = tl.maximum(x, 0.0)
    else:
        r = tl.maximum(x, 0.0)
        y = r * r
    return y


@triton.jit
def act_grad(x, ACT: tl.constexpr):
    """act'(x) for an fp32 tile."""
    if ACT == 0:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        d = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = _tanh(inner)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACT == 3:
        s = tl.sigmoid(1.702 * x)
        d = s + 1.702 * x * s * (1.0 - s)
    elif ACT == 4:
        d = tl.where(x > 0.0, 1.0, 0.0)
    else:
        d = 2.0 * tl.maximum(x, 0.0)
    return d

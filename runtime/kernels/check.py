"""Compile the Triton kernels for a GPU target without a GPU (front end, PTX, and cubin through the
ptxas bundled with triton). The interpreter runs kernels as Python and misses what only the
compiler rejects (e.g. non-constexpr globals), so CPU-only CI runs this too.

    python -m upcycle.runtime.kernels.check [--all] [--arch 90]

Must run without TRITON_INTERPRET (the kernels must be real `triton.jit` functions).
"""

from __future__ import annotations

import argparse
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .activations import ACT_CODES
from .down_backward import down_backward_kernel
from .expert_wgrad import expert_wgrad_kernel
from .gate_up import gate_up_kernel
from .scatter_gemm import scatter_gemm_kernel

_INDEX = {"token_ptr": "*i64", "order_ptr": "*i64", "offsets_ptr": "*i64", "a_idx_ptr": "*i64",
          "b_idx_ptr": "*i64", "block_expert_ptr": "*i32", "block_row_ptr": "*i32",
          "scale_ptr": "*fp32", "dw_ptr": "*fp32", "out_ptr": "*fp32"}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = _INDEX.get(name, f"*{dtype}")
        else:
            sig[name] = "i32"
    return sig


def variants(full: bool):
    """(kernel, dtype, constexprs) to compile; `full` = every activation x dtype x flag."""
    dtypes = ("fp32", "bf16", "fp16") if full else ("bf16",)
    acts = range(len(ACT_CODES)) if full else (ACT_CODES["gelu_tanh"],)
    for dt in dtypes:
        prec = "ieee" if dt == "fp32" else "tf32"
        for act in acts:
            for gated in (True, False):
                yield gate_up_kernel, dt, dict(GATED=gated, HAS_GB=gated, HAS_UB=True, SAVE=True, ACT=act,
                                               PREC=prec, BM=64, BN=64, BK=32)
                yield down_backward_kernel, dt, dict(GATED=gated, ACT=act, PREC=prec, BM=64, BN=64, BK=32)
        for second in (True, False):
            yield scatter_gemm_kernel, dt, dict(HAS_SECOND=second, HAS_BIAS=not second, HAS_SCALE=not second,
                                                PREC=prec, BM=64, BN=64, BK=32)
        for gather_a in (True, False):
            yield expert_wgrad_kernel, dt, dict(GATHER_A=gather_a, GATHER_B=not gather_a, HAS_SCALE=gather_a,
                                                PREC=prec, BM=32, BP=64, BQ=64)
    if not full:  # every activation once, in the smallest kernel that has it
        for act in range(len(ACT_CODES)):
            yield gate_up_kernel, "fp32", dict(GATED=False, HAS_GB=False, HAS_UB=False, SAVE=False, ACT=act,
                                               PREC="ieee", BM=16, BN=16, BK=16)


def compile_kernels(full: bool = False, arch: int = 90) -> int:
    target = GPUTarget("cuda", arch, 32)
    n = 0
    for fn, dtype, constexprs in variants(full):
        triton.compile(ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs),
                       target=target)
        n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="every activation, dtype and flag (minutes)")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100)")
    args = ap.parse_args(argv)
    t0 = time.time()
    n = compile_kernels(args.all, args.arch)
    print(f"compiled {n} kernel variants for sm{args.arch} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

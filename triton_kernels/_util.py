"""Small Triton helpers shared by the kernels of this package."""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (CPU tests) a float32 -> bfloat16 cast truncates instead of rounding to
# nearest even (triton 3.9's interpreter), which would double the rounding error of every stored
# bfloat16 result. Read at import: the interpreter must be chosen before any kernel is created.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


def interpreted() -> bool:
    return bool(INTERPRETED.value)


@triton.jit
def to_storage(value, dtype: tl.constexpr):
    """``value.to(dtype)`` rounding to nearest even, as the GPU does, also under the interpreter."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            value = bits.to(tl.float32, bitcast=True)
    return value.to(dtype)

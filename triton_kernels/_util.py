"""Small Triton helpers shared by the kernels of this package."""
from __future__ import annotations

import os

import torch
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


def pow2_at_least_16(n: int) -> int:
    """Block size for a dimension that enters ``tl.dot``: a power of two, at least 16 (its minimum)."""
    return max(16, triton.next_power_of_2(n))


def dot_precision(dtype) -> str:
    """``input_precision`` of the kernels' dots: float32 inputs must not silently drop to TF32
    (PyTorch's float32 matmuls do not either); 16-bit inputs use the tensor cores (TF32 for the
    float32 operands such as probabilities)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b of two input-dtype tiles, accumulated in float32. ``UPCAST``: multiply float32 copies
    (exact for 16-bit inputs, whose products fit float32) — the interpreter's tl.dot misreads
    bfloat16 operands in triton 3.9."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def dot_f32(p, x, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """p @ x for a float32 tile p (probabilities, score gradients) and an input-dtype tile x: p keeps
    its float32 value and x is widened (TF32 dots for 16-bit inputs, IEEE for float32)."""
    if UPCAST:
        return tl.dot(p, x.to(tl.float32), input_precision="ieee")
    return tl.dot(p, x.to(tl.float32), input_precision=PRECISION)


@triton.jit
def load_tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """A (len(rows), len(cols)) tile of a strided matrix; out-of-range entries read as 0."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def store_tile(base, value, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """Store a float32 tile into a strided matrix of base's dtype (rounded to nearest even)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(base + rows[:, None] * stride_r + cols[None, :] * stride_c,
             to_storage(value, base.dtype.element_ty), mask=mask)


def multiprocessor_count(device) -> int:
    """SMs of the GPU the kernels will run on: 1 under the interpreter (its "grid" runs serially),
    else the CUDA device's count; for a CPU tensor without the interpreter (only the offline compile
    check, tests/_sm90_compile.py, gets that far) the active Triton driver's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if interpreted():
        return 1
    from triton.runtime import driver

    return int(driver.active.utils.get_device_properties(0)["multiprocessor_count"])

"""Small Triton helpers shared by the kernels of this package."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (CPU tests) a float32 -> bfloat16 cast truncates instead of rounding to
# nearest even (triton 3.9's interpreter), which would double the rounding error of every stored
# bfloat16 result. Read at import: the interpreter must be chosen before any kernel is created.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


def interpreted() -> bool:
    return bool(INTERPRETED.value)


# torch.library.wrap_triton (torch >= 2.6) makes a launch visible to torch.compile's tracing: the
# custom ops around these kernels are then torch.library.triton_ops (medattn_fast.ops._custom_op,
# kernel_op), whose kernels inductor sees and schedules. Under the interpreter a kernel is an
# InterpretedFunction, which cannot be traced: the launches stay direct and the ops custom_ops.
_WRAP = getattr(torch.library, "wrap_triton", None) if not interpreted() else None


def launch(kernel):
    """``kernel`` ready for ``kernel[grid](...)``: through ``torch.library.wrap_triton`` on a GPU,
    itself under the interpreter (see ``medattn_fast.ops._custom_op.traceable_triton``)."""
    return _WRAP(kernel) if _WRAP is not None else kernel


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


FP32_PRECISIONS = ("tf32x3", "ieee", "tf32")


def _torch_allows_tf32() -> bool:
    """Whether PyTorch's own float32 matmuls may use TF32: ``set_float32_matmul_precision("high")``
    or ``"medium"``, ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or the legacy
    ``allow_tf32 = True``. (Reading the legacy flag raises once the two APIs were mixed: then the
    new one has the say.)"""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the legacy spellings are deprecated in newer torch
        matmul = torch.backends.cuda.matmul
        explicit = getattr(matmul, "fp32_precision", "none")
        if explicit != "none":
            return explicit == "tf32"
        if torch.get_float32_matmul_precision() in ("high", "medium"):
            return True
        try:
            return bool(matmul.allow_tf32)
        except RuntimeError:
            return False


def fp32_precision(split_default: bool = True, forced: Optional[str] = None) -> str:
    """How the kernels multiply float32 tiles:

    * ``"tf32x3"`` (the default): each operand split as ``a = a_hi + a_lo`` with ``a_hi`` rounded to
      TF32 (10 mantissa bits) and ``a_lo = tf32(a - a_hi)``, then ``a_lo·b_hi + a_hi·b_lo + a_hi·b_hi``
      as three TF32 tensor-core products accumulated in float32 (``a_lo·b_lo`` ~2⁻²² relative is
      dropped). Its error vs float64 stays at float32 level (within the float32 tests' bound, about
      the IEEE product's: tests/test_fp32_precision.py) for 3x the tensor-core work of one TF32
      product — several times the rate of FMA-only ``ieee`` on Hopper. Used whenever PyTorch's
      own float32 matmuls do not allow TF32 (its default ``"highest"``, or ``fp32_precision =
      "ieee"``): what those promise is float32 accuracy, and this keeps it.
    * ``"ieee"``: plain float32 FMAs, no tensor cores (bit-level IEEE products, e.g. to compare
      against a CPU run).
    * ``"tf32"``: one TF32 product (~2⁻¹¹ relative per operand): what PyTorch's own float32 matmuls
      do once TF32 is allowed (``set_float32_matmul_precision("high")``, ``fp32_precision =
      "tf32"``, ``allow_tf32 = True``), so it follows that setting.

    ``forced`` (one of the three; the caller's explicit choice, ``medattn_fast.KernelConfig``'s
    ``fp32_precision``) wins over PyTorch's setting.

    ``split_default=False``: a kernel whose float32 tiles spill more with the split's hi/lo copies
    than with FMA dots keeps ``"ieee"`` as its default until its tiles are re-tuned on a GPU (the
    external-attention backward: 168 B per thread spilled with ieee, 744 B with the split, triton
    3.6 on sm_90, tests/_sm90_compile.py), and the attention gate's output projection, where the
    split missed the float32 bound on a gradient that cancels to 0; ``forced`` and PyTorch's TF32
    setting still apply.
    """
    if forced:
        if forced not in FP32_PRECISIONS:
            raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {forced!r}")
        return forced
    if _torch_allows_tf32():
        return "tf32"
    return "tf32x3" if split_default else "ieee"


def dot_precision(dtype, split_default: bool = True, forced: Optional[str] = None) -> str:
    """``PRECISION`` of the kernels' dots for inputs of ``dtype``: float32 as :func:`fp32_precision`
    says; 16-bit inputs multiply natively on the tensor cores, and the float32 operands that meet
    them (probabilities, score gradients) go in as TF32."""
    return fp32_precision(split_default, forced) if dtype == torch.float32 else "tf32"


@triton.jit
def round_tf32(x):
    """float32 ``x`` rounded to TF32 (10 explicit mantissa bits; to nearest, ties away from zero, as
    ``cvt.rna.tf32.f32``), kept in a float32: the tensor cores then multiply it exactly."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def mma(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in float32. ``PRECISION``: ``tl.dot``'s ``input_precision``, or "tf32x3" for
    float32 tiles (see :func:`fp32_precision`): split into TF32 parts explicitly, so the products
    are exact on the tensor cores and under the interpreter alike (whose tl.dot ignores the input
    precision and multiplies in float32), and both compute the same sums. Under the interpreter a
    "tf32" product rounds its operands to TF32 first, as the tensor cores do."""
    if PRECISION == "tf32x3":
        a_hi = round_tf32(a)
        b_hi = round_tf32(b)
        a_lo = round_tf32(a - a_hi)
        b_lo = round_tf32(b - b_hi)
        acc = tl.dot(a_lo, b_hi, input_precision="tf32")     # small terms first
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    elif PRECISION == "tf32" and INTERPRETED:
        # the GPU's TF32 product, emulated: operands rounded to TF32 (a no-op for 16-bit values)
        return tl.dot(round_tf32(a), round_tf32(b), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b of two input-dtype tiles, accumulated in float32. ``UPCAST``: multiply float32 copies
    (exact for 16-bit inputs, whose products fit float32) — the interpreter's tl.dot misreads
    bfloat16 operands in triton 3.9."""
    if UPCAST:
        return mma(a.to(tl.float32), b.to(tl.float32), PRECISION)
    return mma(a, b, PRECISION)


@triton.jit
def dot_f32(p, x, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """p @ x for a float32 tile p (probabilities, score gradients) and an input-dtype tile x: x is
    widened, p enters as TF32 for 16-bit inputs (``PRECISION`` "tf32") and as
    :func:`fp32_precision` says for float32 ones. (``UPCAST``: unused, x is widened anyway; kept
    so that every dot helper takes the same arguments.)"""
    return mma(p, x.to(tl.float32), PRECISION)


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

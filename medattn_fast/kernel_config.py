"""Kernel variants as explicit configuration: :class:`KernelConfig`.

The Triton backends take the variants they run as arguments of their custom ops, read from the
configuration in force when the op is called: :func:`use_kernel_config` (a context manager) >
:func:`set_kernel_config` (process-wide) > the environment (:meth:`KernelConfig.from_environment`,
the one place that reads these variables) > the defaults. Every variant stays selectable, so a GPU
check can time them side by side::

    with medattn_fast.use_kernel_config(medattn_fast.KernelConfig(position_backward="fused")):
        out = model(x)

Under ``torch.compile`` the configuration is read once, when the graph is traced (like the backend).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import astuple, dataclass
from typing import Iterator, Optional, Tuple

import torch

__all__ = ["CHANNEL_GEMMS", "FP32_PRECISIONS", "GATE_KERNELS", "POSITION_BACKWARDS", "KernelConfig", "explicitly_set", "kernel_config",
           "set_kernel_config", "use_kernel_config"]

FP32_PRECISIONS = ("tf32x3", "ieee", "tf32")
POSITION_BACKWARDS = ("separate", "fused")
GATE_KERNELS = ("auto", "dot", "loop")
CHANNEL_GEMMS = ("float32", "16bit")


@dataclass(frozen=True)
class KernelConfig:
    """The variants of the Triton kernels (the defaults are the shipped choice; a later GPU
    measurement may retune them).

    ``fp32_precision``: how float32 tiles are multiplied — ``"tf32x3"`` (three TF32 tensor-core
    products of a hi/lo split: float32 accuracy), ``"ieee"`` (plain float32 FMAs) or ``"tf32"`` (one
    TF32 product); None (default): ``"tf32"`` where PyTorch's own float32 matmuls allow TF32, else
    ``"tf32x3"`` (``"ieee"`` for the two kernels whose tiles spill with the split: the external
    attention backward, the gate's output projection). Variable ``MEDATTN_FP32_PRECISION``.

    ``position_backward``: position attention's backward, ``"separate"`` (dS recomputed in a dq and a
    dk kernel; deterministic; default) or ``"fused"`` (dS once per tile, dq added with atomics).
    Variable ``MEDATTN_POSITION_BWD``.

    ``position_p16``: position attention on 16-bit inputs feeds P and dS to their dots rounded to
    bf16/fp16 (flash attention's choice, full tensor-core rate; default True: its errors stay within
    the tests' 2x PyTorch's own error) instead of as TF32 (False: about 8x less rounding in those
    products at half the rate). float32 inputs are not affected. Variable ``MEDATTN_POSITION_P16``
    (``0`` selects TF32).

    ``position_dv_split``: the width of the dv slice one program of position attention's P·V kernels
    produces (a power of two >= 16; 0, default: the default tiles', 128 for 16-bit dk <= 128). Each
    split recomputes QKᵀ, so 256 at dv = 512 computes the scores 2x instead of 4x (forward).

    ``position_hoist``: position attention's dq/dk kernels load the dv-wide operand that is invariant
    across their outer loop once before it (True) or re-read it in chunks every iteration (False);
    None (default): the default tiles' choice.

    ``gate_kernel``: how the Triton attention gate forms ``a = W·x`` (per position, Ci of them) —
    ``"dot"`` (a tile of positions × Cx times Wᵀ (Cx × Ci) as one ``tl.dot``, ψ·relu(a) summed over
    the Ci axis of the tile), ``"loop"`` (one multiply-reduce over Cx per intermediate channel, Ci
    of them in turn: the first kernels) or ``"auto"`` (default: ``"dot"`` where Ci ≥ 16, the
    smallest ``tl.dot`` width, and Cx ≤ 64, the widest x tile that compiles without spills on sm_90;
    else ``"loop"``). ``"dot"`` runs the dot kernels at any width (correct, but they spill past
    Cx = 64). Variable ``MEDATTN_GATE_KERNEL``.

    ``channel_gemm``: the GEMMs of channel attention's ``torch`` backend on 16-bit inputs —
    ``"float32"`` (default: X widened to float32, float32 GEMMs) or ``"16bit"`` (the cuBLAS path:
    X Xᵀ, A X and the backward's products as 16-bit GEMMs with float32 output, the softmax and the
    epilogue in float32; on a CPU the same roundings with float32 products, which are exact for
    16-bit operands). float32/float64 inputs run the default. Variable ``MEDATTN_CHANNEL_GEMM``.
    """

    fp32_precision: Optional[str] = None
    position_backward: str = "separate"
    position_p16: bool = True
    position_dv_split: int = 0
    position_hoist: Optional[bool] = None
    gate_kernel: str = "auto"
    channel_gemm: str = "float32"

    def __post_init__(self):
        if self.fp32_precision is not None and self.fp32_precision not in FP32_PRECISIONS:
            raise ValueError(f"KernelConfig: fp32_precision must be one of {FP32_PRECISIONS} or None, "
                             f"got {self.fp32_precision!r}")
        if self.position_backward not in POSITION_BACKWARDS:
            raise ValueError(f"KernelConfig: position_backward must be one of {POSITION_BACKWARDS}, "
                             f"got {self.position_backward!r}")
        if not isinstance(self.position_p16, bool):
            raise TypeError(f"KernelConfig: position_p16 must be a bool, got {self.position_p16!r}")
        split = self.position_dv_split
        power_of_two = (isinstance(split, int) and not isinstance(split, bool) and split >= 16
                        and not split & (split - 1))
        if split != 0 and not power_of_two:
            raise ValueError(f"KernelConfig: position_dv_split must be 0 or a power of two >= 16, got {split!r}")
        if self.position_hoist is not None and not isinstance(self.position_hoist, bool):
            raise TypeError(f"KernelConfig: position_hoist must be a bool or None, got {self.position_hoist!r}")
        if self.gate_kernel not in GATE_KERNELS:
            raise ValueError(f"KernelConfig: gate_kernel must be one of {GATE_KERNELS}, got {self.gate_kernel!r}")
        if self.channel_gemm not in CHANNEL_GEMMS:
            raise ValueError(f"KernelConfig: channel_gemm must be one of {CHANNEL_GEMMS}, got {self.channel_gemm!r}")

    @classmethod
    def from_environment(cls) -> "KernelConfig":
        """The defaults with the environment's choices applied (``MEDATTN_FP32_PRECISION``,
        ``MEDATTN_POSITION_BWD``, ``MEDATTN_POSITION_P16``, ``MEDATTN_GATE_KERNEL``, ``MEDATTN_CHANNEL_GEMM``); a bad value raises
        naming the variable."""
        precision = os.environ.get("MEDATTN_FP32_PRECISION", "").strip().lower() or None
        if precision is not None and precision not in FP32_PRECISIONS:
            raise ValueError(f"MEDATTN_FP32_PRECISION must be one of {FP32_PRECISIONS}, got {precision!r}")
        backward = os.environ.get("MEDATTN_POSITION_BWD", "").strip() or "separate"
        if backward not in POSITION_BACKWARDS:
            raise ValueError(f"KernelConfig: position_backward (MEDATTN_POSITION_BWD) must be one of "
                             f"{POSITION_BACKWARDS}, got {backward!r}")
        p16 = os.environ.get("MEDATTN_POSITION_P16", "1").strip() not in ("", "0")
        gate = os.environ.get("MEDATTN_GATE_KERNEL", "").strip().lower() or "auto"
        if gate not in GATE_KERNELS:
            raise ValueError(f"KernelConfig: gate_kernel (MEDATTN_GATE_KERNEL) must be one of {GATE_KERNELS}, "
                             f"got {gate!r}")
        gemm = os.environ.get("MEDATTN_CHANNEL_GEMM", "").strip() or "float32"
        if gemm not in CHANNEL_GEMMS:
            raise ValueError(f"KernelConfig: channel_gemm (MEDATTN_CHANNEL_GEMM) must be one of {CHANNEL_GEMMS}, "
                             f"got {gemm!r}")
        return cls(precision, backward, p16, gate_kernel=gate, channel_gemm=gemm)


_ctx_config: contextvars.ContextVar[Optional[KernelConfig]] = contextvars.ContextVar("medattn_kernel_config",
                                                                                     default=None)
_global_config: Optional[KernelConfig] = None


def _check(config) -> Optional[KernelConfig]:
    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"kernel config: expected a KernelConfig or None, got {type(config).__name__}")
    return config


def set_kernel_config(config: Optional[KernelConfig]) -> None:
    """Use ``config`` for every later call in this process (None: back to the environment's)."""
    global _global_config
    _global_config = _check(config)


@contextlib.contextmanager
def use_kernel_config(config: KernelConfig) -> Iterator[None]:
    """Context manager: the enclosed calls run the kernel variants of ``config``."""
    token = _ctx_config.set(_check(config))
    try:
        yield
    finally:
        _ctx_config.reset(token)


@torch.compiler.assume_constant_result   # dynamo cannot trace ContextVar.get: read it at trace time
def _fields() -> Tuple[Optional[str], str, bool, int, Optional[bool], str, str]:
    config = _ctx_config.get() or _global_config or KernelConfig.from_environment()
    return astuple(config)


# the environment variable of each field (KernelConfig.from_environment reads them)
ENVIRONMENT = {"fp32_precision": "MEDATTN_FP32_PRECISION", "position_backward": "MEDATTN_POSITION_BWD",
               "position_p16": "MEDATTN_POSITION_P16", "gate_kernel": "MEDATTN_GATE_KERNEL",
               "channel_gemm": "MEDATTN_CHANNEL_GEMM"}


def explicitly_set(field: str) -> bool:
    """Whether the user chose ``field`` (:func:`use_kernel_config` or :func:`set_kernel_config` in
    force, or the field's environment variable set): the autotune then never tries another value."""
    if field not in ENVIRONMENT:
        raise ValueError(f"explicitly_set: field must be one of {tuple(ENVIRONMENT)}, got {field!r}")
    if _ctx_config.get() is not None or _global_config is not None:
        return True
    return os.environ.get(ENVIRONMENT[field], "").strip() != ""


def kernel_config() -> KernelConfig:
    """The configuration in force: :func:`use_kernel_config` > :func:`set_kernel_config` > the
    environment > the defaults."""
    return KernelConfig(*_fields())

"""What every backend file's custom ops need, written once.

* :func:`accumulation_dtype`: the kernels' precision policy — float64 stays float64, every other
  dtype accumulates in float32;
* :func:`empty` / :func:`or_empty`: the ``(0,)`` placeholder a custom op returns for an output it
  did not compute (a ``torch.library`` op returns tensors, never None);
* :func:`wants_grad`: whether this call records a graph for any of its tensors (a forward then
  saves what its backward needs);
* :func:`triton_module` / :func:`extension`: the kernels, imported or built on first use (never at
  import: triton is optional, csrc builds lazily);
* :func:`with_inert`: a parameter that cancels in the math gets its exact gradient, zero;
* :func:`kernel_op`: the decorator of a Triton backend's custom ops — ``torch.library.triton_op``
  on a GPU (torch.compile/inductor then trace the kernels' launches, ``wrap_triton``, into the
  graph), ``torch.library.custom_op`` under the Triton interpreter.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "empty", "extension", "kernel_op", "or_empty", "traceable_triton", "triton_module",
           "wants_grad", "with_inert"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other (float32, float16, bfloat16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A (0,) tensor on ``like``'s device: a custom op's output that was not computed."""
    return like.new_empty((0,), dtype=dtype)


def or_empty(t: Optional[Tensor], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``t``, or :func:`empty` in its place when it is None."""
    return t if t is not None else empty(like, dtype)


def wants_grad(*tensors: Optional[Tensor]) -> bool:
    """Autograd is recording and some tensor (None allowed) requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def triton_module(family: str) -> Callable[[], ModuleType]:
    """A loader of ``triton_kernels/<family>.py``, imported on its first call (triton is optional)."""

    def load() -> ModuleType:
        return importlib.import_module(f"{__package__.rpartition('.')[0]}.triton_kernels.{family}")

    return load


def extension(kind: str, family: str) -> Callable[[], ModuleType]:
    """A loader of the csrc extension of ``family`` (``kind`` "cpu" or "cuda"), built on its first
    call (dispatch builds it before the backend's first run; see ``backend.Op.choose``)."""

    def load() -> ModuleType:
        from .. import _build

        return _build.load(kind, family)

    return load


class _Inert(torch.autograd.Function):
    """Returns ``value`` unchanged and gives ``inert`` a zero gradient."""

    @staticmethod
    def forward(ctx, value: Tensor, inert: Tensor) -> Tensor:
        ctx.inert_shape, ctx.inert_dtype = inert.shape, inert.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, grad.new_zeros(ctx.inert_shape, dtype=ctx.inert_dtype)


def with_inert(value: Tensor, inert: Optional[Tensor]) -> Tensor:
    """``value``, tied to a parameter ``inert`` that cancels in the op's math (Gaussian axial
    attention's ``bias``, external attention's key bias: a constant added inside a softmax) so that
    ``inert`` gets its exact gradient, 0. Autograd through the cancelling terms would return
    rounding-level values instead; checkpoints expect the parameter, and it trains."""
    if inert is None or not (torch.is_grad_enabled() and inert.requires_grad):
        return value
    return _Inert.apply(value, inert)


def traceable_triton() -> bool:
    """Whether a Triton backend's custom ops are ``torch.library.triton_op``s whose launches go
    through ``torch.library.wrap_triton`` (``triton_kernels._util.launch``): torch has both, triton
    is installed and the kernels are compiled, not interpreted.

    Under ``TRITON_INTERPRET=1`` (the CPU tests) the answer is no: there ``@triton.jit`` makes an
    ``InterpretedFunction``, which ``wrap_triton`` returns unwrapped, and ``triton_op`` registers the
    op's own body as its fake kernel, so tracing (``torch.compile`` on aot_eager, ``opcheck``'s fake
    test) would run the interpreter on FakeTensors, which have no data ("Cannot access data pointer
    of Tensor (e.g. FakeTensor ...)", checked with torch 2.13 / triton 3.9). Read once, at import,
    like the interpreter itself."""
    library = torch.library
    return (hasattr(library, "triton_op") and hasattr(library, "wrap_triton")
            and importlib.util.find_spec("triton") is not None
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


_TRACEABLE_TRITON = traceable_triton()


def kernel_op(name: str, *, mutates_args=()) -> Callable:
    """The decorator of a Triton backend's custom op ``name`` (``medattn::<family>_triton_<...>``):
    ``torch.library.triton_op`` where :func:`traceable_triton` (the body's kernel launches must then
    go through ``triton_kernels._util.launch``), else ``torch.library.custom_op``. Both give the op
    the same schema, ``register_fake`` and ``register_autograd``."""
    if _TRACEABLE_TRITON:
        return torch.library.triton_op(name, mutates_args=mutates_args)
    return torch.library.custom_op(name, mutates_args=mutates_args)

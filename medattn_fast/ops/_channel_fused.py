r"""The contract of channel attention's fused backends (``cpp``, ``triton``), written once: the
autograd of their custom ops and the dispatcher entry that calls them.

Every backend defines ``medattn::channel_<backend>_fwd(x, gamma?, residual?, multiply?, negate, save,
residual_is_x, fp32_precision?) -> (out, o, attention)`` and ``medattn::channel_<backend>_bwd(grad_out,
x, o, attention, gamma?, multiply?, negate, need_multiply_grad, residual_is_x, fp32_precision?)
-> [dx, dγ, df]`` (empty tensors for absent ones): ``residual_is_x`` says the residual is x itself
(DANet's ``γ·o + x``; ``residual`` is then None) and dx then includes the residual's gradient; ``o``
is what the backend's backward needs of the pre-epilogue output (each backend's docstring says
what it keeps); ``fp32_precision`` is the :class:`medattn_fast.KernelConfig`'s in force at the call
(tensor-core dots; the C++ kernels ignore it).
"""
from __future__ import annotations

from typing import Callable

from ..kernel_config import kernel_config
from ._custom_op import empty, wants_grad

__all__ = ["registrar"]


def registrar(backend: str, forward, backward, *, output_when_no_o: bool) -> Callable:
    """Completes a backend's two custom ops — ``backward``'s fake kernel, ``forward``'s autograd
    through ``backward`` — and returns its ``register(op)``, which adds the dispatcher entry
    ``(x, *, negate, gamma, residual, multiply)``. ``output_when_no_o``: a backend whose forward
    keeps no ``o`` without an epilogue saves the output in its place (its o is then out)."""

    @backward.register_fake
    def _(grad_out, x, o, attention, gamma, multiply, negate, need_multiply_grad, residual_is_x, fp32_precision):
        return [x.new_empty(x.shape), gamma.new_empty(gamma.shape) if gamma is not None else empty(x),
                x.new_empty(x.shape) if (multiply is not None and need_multiply_grad) else empty(x)]

    def setup_context(ctx, inputs, output):
        x, gamma, residual, multiply, negate, _save, residual_is_x, fp32_precision = inputs
        out, o, attention = output
        ctx.mark_non_differentiable(o, attention)
        has_epilogue = gamma is not None or residual is not None or multiply is not None or residual_is_x
        ctx.save_for_backward(x, out if (output_when_no_o and not has_epilogue) else o, attention, gamma, multiply)
        ctx.negate, ctx.has_residual, ctx.residual_is_x = negate, residual is not None, residual_is_x
        ctx.fp32_precision = fp32_precision

    def differentiate(ctx, grad_out, _grad_o, _grad_attention):
        x, o, attention, gamma, multiply = ctx.saved_tensors
        need_mul = multiply is not None and ctx.needs_input_grad[3]
        dx, d_gamma, d_mul = backward(grad_out, x, o, attention, gamma, multiply, ctx.negate, need_mul,
                                      ctx.residual_is_x, ctx.fp32_precision)
        return (dx, d_gamma if gamma is not None else None, grad_out if ctx.has_residual else None,
                d_mul if need_mul else None, None, None, None, None)

    forward.register_autograd(differentiate, setup_context=setup_context)

    def run(x, *, negate, gamma, residual, multiply):
        residual_is_x = residual is x
        out, _o, _attention = forward(x, gamma, None if residual_is_x else residual, multiply, bool(negate),
                                      wants_grad(x, gamma, residual, multiply), residual_is_x,
                                      kernel_config().fp32_precision)
        return out

    def register(op) -> None:
        op.register(backend)(run)

    return register

r"""The plan every fused backend of the attention gate (``cpp``, ``cuda``, ``triton``) shares, the
gate's parameter bundle (:class:`GateParams`) and the custom-op factory (:func:`define_custom_ops`).

Every fused backend (``ops/_attention_gate_<backend>.py``) runs the same plan; only the three kernels differ (``csrc/cpu/attention_gate.cpp``,
``triton_kernels/attention_gate.py``, ``csrc/cuda/attention_gate.cu``). With x (B, Cx, *S), g (B, Cg, *Sg):

1. **Coarse branch** (ordinary ops, it is small): ``G = BN_g(W_g·g + b_g)`` (B, Ci, *Sg), with BN
   folded into the conv in eval mode and ``F.batch_norm`` (batch statistics, running-stat update)
   in training mode.
2. **x branch normalisation** folded into ``W_x``: eval uses the running statistics; with batch
   statistics (training, or a BN without running statistics) the mean and biased variance of
   ``u = W_x·x + b_x`` come from x's channel moments — ``mean_u = W_x·mean_x + b_x``,
   ``var_u = diag(W_x·Cov_x·W_xᵀ)`` with ``Cov_x = Σ x xᵀ / N − mean_x mean_xᵀ`` (one Gram GEMM,
   accumulated in float32/float64) — so ``u`` itself is never materialised. The running
   statistics are then updated as ``nn.BatchNorm`` does (unbiased variance into ``running_var``).
   For a ``SyncBatchNorm`` in a process group, Σx, Σxxᵀ and the count are all-reduced over the
   group first (one collective forward, one for their gradients backward), on every backend; the
   other BNs (G, ψ, the output transform) go through :func:`._batch_norm.batch_norm`, which does the same with
   Σu, Σu².
3. **The fused pass** over x:

   * ψ-BN folded (eval): ``gate_forward`` computes, per position,
     ``a = W̃·x + b̃ + up(G)``, ``q = w̃·relu(a) + c̃``, ``α = σ(q)`` (σ∘σ with ``double_sigmoid``),
     ``out = α·x`` — x read once, out (and α) written once, ``a`` never stored;
   * ψ-BN with batch statistics: ``gate_logits`` writes ``q`` (B, 1, *S) only, whose statistics
     ``F.batch_norm`` takes (exact running-stat update); ``α`` and ``out = α·x`` follow as one
     elementwise pass (q is a single channel, 1/Cx of x).

Backward: each kernel's autograd formula calls ``gate_backward``, which recomputes ``a`` and
``q`` from x (nothing of size Ci·S is saved by the forward) and returns ``grad_x`` (including
``α·grad_out``), ``da`` (B, Ci, *S) in the accumulation dtype, and the sums giving the gradients
of ``w̃`` and ``c̃``. The tiny parameter gradients then come from ordinary ops: ``∂W̃ = Σ da·xᵀ``
(one GEMM), ``∂b̃ = Σ da``, ``∂G = up*(da)`` (the interpolation's adjoint). Gradients through
the folds and the batch statistics (step 2) are autograd of those few small ops. This is the
documented mix: fused kernels for the passes over x, matmuls for the parameter gradients.

The kernels take G, W̃, b̃, w̃, c̃ in the accumulation dtype (float32, or float64 for float64 x) and
x in its own dtype with any strides; ``out`` has x's dtype and memory format, α x's dtype.

**Grid mode** (Oktay's gate), on the same kernels plus one:

1. ``θ·x``, the k×k stride-k convolution, is an ordinary op: a GEMM over the k^d patches whose
   output is Cx·Πk / C_int times smaller than x (8× in 2-D at Oktay's C_int = Cx/2, k = 2).
2. The logits pass above runs on the coarse grid with ``x := θ·x`` and ``W_x = I`` (C_int² extra
   multiply-adds per coarse position, a fraction C_int / (Cx·Πk) of θ's own), so ``up(φ·g)``,
   ``a`` and ``relu(a)`` are never stored; α' = σ(BN_ψ(q)) (B, 1, *S') and ``α = up(α', S)`` are
   one channel each (1/Cx of x).
3. ``gate_project`` is one pass over x for the output transform,
   ``out = BN_out(W_out·(α⊙x)) = α·(W̃·x) + b̃`` (α is a scalar per position, so α⊙x is never
   stored; BN folded in eval, with batch statistics ``F.batch_norm`` normalises the pass's
   output). Without an output transform ``out = α⊙x`` is already one elementwise pass.
   Its backward kernel returns ``grad_x = α·W̃ᵀ·grad_out`` and ``∂α = Σ_c (W̃ᵀ·grad_out)·x``;
   ``∂W̃`` (one GEMM) and ``∂b̃`` are ordinary ops.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._batch_norm import (BatchNormParams, all_reduce_sums, batch_norm, conv, conv_batch_norm, foldable,
                          update_running_stats, uses_batch_stats)
from ..kernel_config import kernel_config
from ._custom_op import accumulation_dtype, kernel_op

__all__ = ["FusedKernels", "GateParams", "define_custom_ops", "fused_gate", "kernel_size", "registrar", "upsample"]

Tensor = torch.Tensor
Result = Union[Tensor, Tuple[Tensor, Tensor]]


class GateParams(NamedTuple):
    """The gate's weights, as one bundle every backend receives (shapes: ``attention_gate``'s).

    ``wx_*`` W_x (θ in grid mode), ``wg_*`` W_g, ``psi_*`` w_ψ, each followed by an optional
    :class:`BatchNormParams`; ``out_*``/``bn_out`` the optional output transform ``BN_out(W_out·)``.
    """

    wx_weight: Tensor
    wx_bias: Optional[Tensor]
    wg_weight: Tensor
    wg_bias: Optional[Tensor]
    psi_weight: Tensor
    psi_bias: Optional[Tensor]
    bn_x: Optional[BatchNormParams] = None
    bn_g: Optional[BatchNormParams] = None
    bn_psi: Optional[BatchNormParams] = None
    out_weight: Optional[Tensor] = None
    out_bias: Optional[Tensor] = None
    bn_out: Optional[BatchNormParams] = None

    def batch_norms(self) -> List[BatchNormParams]:
        return [bn for bn in (self.bn_x, self.bn_g, self.bn_psi, self.bn_out) if bn is not None]

    def in_mode(self, training: bool) -> "GateParams":
        """Every BN in its own mode: its ``training`` flag, or ``training`` where it has none."""
        def mode(bn: Optional[BatchNormParams]) -> Optional[BatchNormParams]:
            return None if bn is None else bn.in_mode(training)

        return self._replace(bn_x=mode(self.bn_x), bn_g=mode(self.bn_g), bn_psi=mode(self.bn_psi),
                             bn_out=mode(self.bn_out))

    def tensors(self) -> List[Tensor]:
        """Every tensor of the bundle: weights, biases and BatchNorm state."""
        own = [getattr(self, f) for f in ("wx_weight", "wx_bias", "wg_weight", "wg_bias", "psi_weight", "psi_bias",
                                          "out_weight", "out_bias")]
        return [t for t in own if t is not None] + [t for bn in self.batch_norms() for t in bn.tensors()]


def kernel_size(weight: Tensor, nd: int) -> Tuple[int, ...]:
    """The spatial kernel of a conv weight (C_out, C_in, *k), or 1s for a matrix (C_out, C_in)."""
    return tuple(weight.shape[2:]) if weight.dim() > 2 else (1,) * nd


def upsample(t: Tensor, size: Sequence[int]) -> Tensor:
    """(bi|tri)linear interpolation of a (B, C, *S) map to ``size``, ``align_corners=False``."""
    mode = "bilinear" if t.dim() == 4 else "trilinear"
    return F.interpolate(t, size=tuple(size), mode=mode, align_corners=False)


def _alpha_shape(x: Tensor) -> Tuple[int, ...]:
    return (x.shape[0], 1, *x.shape[2:])


def _grad_a_shape(x: Tensor, cint: int) -> Tuple[int, ...]:
    return (x.shape[0], cint, *x.shape[2:])


def _upsample_adjoint(grad_a: Tensor, coarse_shape) -> Tensor:
    """Adjoint of ``F.interpolate(G, size=S, mode=(bi|tri)linear, align_corners=False)``."""
    # plain ints: the C++ meta kernel of these ops rejects symbolic sizes (opcheck's dynamic-shape
    # trace); int() specialises the traced graph on the spatial sizes instead
    size = [int(s) for s in grad_a.shape[2:]]
    coarse = [int(s) for s in coarse_shape]
    if grad_a.dim() == 4:
        return torch.ops.aten.upsample_bilinear2d_backward.default(grad_a, size, coarse, False)
    return torch.ops.aten.upsample_trilinear3d_backward.default(grad_a, size, coarse, False)


def _parameter_grads(ctx, x: Tensor, grad_a: Tensor, weight: Tensor, G: Tensor):
    """∂W̃ = Σ_p da·xᵀ, ∂b̃ = Σ_p da, ∂G = up*(da); None for what needs no gradient."""
    need = ctx.needs_input_grad
    batch, cint = grad_a.shape[:2]
    flat_a = grad_a.reshape(batch, cint, -1)
    grad_w = grad_b = grad_g = None
    if need[2]:
        flat_x = x.reshape(batch, x.shape[1], -1).to(grad_a.dtype)
        grad_w = torch.bmm(flat_a, flat_x.transpose(1, 2)).sum(0).to(weight.dtype)
    if need[3]:
        grad_b = flat_a.sum((0, 2))
    if need[1]:
        grad_g = _upsample_adjoint(grad_a, G.shape).to(G.dtype)
    return grad_w, grad_b, grad_g


class FusedKernels(NamedTuple):
    """The five custom ops of one fused backend (``ops/_attention_gate_<backend>.py``).

    ``forward(x, G, W, b, w, c, double_sigmoid) -> (out, alpha)``,
    ``logits(x, G, W, b, w, c) -> q``,
    ``backward(x, G, W, b, w, c, grad_q, grad_out, grad_alpha, double_sigmoid)
    -> (grad_x, grad_a, grad_psi, grad_psi_bias)`` (the backward of both ``forward`` and ``logits``),
    ``project(x, alpha, W, b) -> out`` and ``project_backward(x, alpha, W, grad_out) -> (grad_x, grad_alpha)``.
    """

    forward: Callable
    logits: Callable
    backward: Callable
    project: Callable
    project_backward: Callable


def define_custom_ops(backend: str, kernels: Callable, *, precision_argument: bool = False) -> FusedKernels:
    """Declares the five custom ops of one fused backend around ``kernels()`` (a module or extension
    with ``gate_forward``, ``gate_logits``, ``gate_backward``, ``gate_project``,
    ``gate_project_backward``, loaded on first use), with their fake kernels and autograd formulas —
    the same for every fused backend, so they compile under ``torch.compile(fullgraph=True)`` (opaque
    nodes; the ``triton`` backend's are ``triton_op``s on a GPU, ``_custom_op.kernel_op``, whose kernel
    launches are traced) and ``torch.library.opcheck`` checks them:

    * ``medattn::attention_gate_<backend>_fwd(x, G, W, b, w, c, double_sigmoid) -> (out, alpha)``:
      the additive gate in one pass over x, ψ-BN folded (``a = W·x + b + up(G)``,
      ``α = σ(w·relu(a) + c)``, ``out = α·x``);
    * ``..._logits_fwd(x, G, W, b, w, c) -> q``: the logits only, for a ψ-BN with batch statistics;
    * ``..._bwd(...) -> (grad_x, grad_a, grad_psi, grad_psi_bias)``: the backward of both,
      recomputing ``a`` from x;
    * ``..._project_fwd(x, alpha, W, b, fp32_precision?) -> α·(W·x) + b`` and ``..._project_bwd``:
      the output transform of the grid gate. ``fp32_precision``: the
      :class:`medattn_fast.KernelConfig`'s in force at the call, passed on to the kernels of a backend
      with ``precision_argument`` (Triton's tensor-core dots; the C++ kernels multiply in IEEE).
    """
    name = f"medattn::attention_gate_{backend}"
    # the Triton backend's ops are triton_ops on a GPU (their launches traced by torch.compile); the
    # C++ backends' stay custom ops
    define = (kernel_op if backend == "triton" else
              (lambda op_name, mutates_args: torch.library.custom_op(op_name, mutates_args=mutates_args)))

    def precision(fp32_precision: Optional[str]) -> dict:
        return {"fp32_precision": fp32_precision} if precision_argument else {}

    def variant(fp32_precision: Optional[str], gate_kernel: str) -> dict:
        return {"fp32_precision": fp32_precision, "kernel": gate_kernel} if precision_argument else {}

    @define(f"{name}_fwd", mutates_args=())
    def forward(x: Tensor, G: Tensor, weight: Tensor, bias: Tensor, psi: Tensor, psi_bias: Tensor,
                double_sigmoid: bool, fp32_precision: Optional[str] = None,
                gate_kernel: str = "auto") -> Tuple[Tensor, Tensor]:
        out, alpha = kernels().gate_forward(x, G, weight, bias, psi, psi_bias, double_sigmoid,
                                            **variant(fp32_precision, gate_kernel))
        return out, alpha

    @define(f"{name}_logits_fwd", mutates_args=())
    def logits(x: Tensor, G: Tensor, weight: Tensor, bias: Tensor, psi: Tensor, psi_bias: Tensor,
               fp32_precision: Optional[str] = None, gate_kernel: str = "auto") -> Tensor:
        return kernels().gate_logits(x, G, weight, bias, psi, psi_bias, **variant(fp32_precision, gate_kernel))

    @define(f"{name}_bwd", mutates_args=())
    def backward(x: Tensor, G: Tensor, weight: Tensor, bias: Tensor, psi: Tensor, psi_bias: Tensor,
                 grad_q: Optional[Tensor], grad_out: Optional[Tensor], grad_alpha: Optional[Tensor],
                 double_sigmoid: bool, fp32_precision: Optional[str] = None,
                 gate_kernel: str = "auto") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        gx, ga, gpsi, gc = kernels().gate_backward(x, G, weight, bias, psi, psi_bias, grad_q, grad_out,
                                                   grad_alpha, double_sigmoid,
                                                   **variant(fp32_precision, gate_kernel))
        return gx, ga, gpsi, gc

    @define(f"{name}_project_fwd", mutates_args=())
    def project(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor, fp32_precision: Optional[str]) -> Tensor:
        return kernels().gate_project(x, alpha, weight, bias, **precision(fp32_precision))

    @define(f"{name}_project_bwd", mutates_args=())
    def project_backward(x: Tensor, alpha: Tensor, weight: Tensor, grad_out: Tensor,
                         fp32_precision: Optional[str]) -> Tuple[Tensor, Tensor]:
        grad_x, grad_alpha = kernels().gate_project_backward(x, alpha, weight, grad_out,
                                                             **precision(fp32_precision))
        return grad_x, grad_alpha

    k = FusedKernels(forward, logits, backward, project, project_backward)
    _define_fake_and_autograd(k)
    return k


def _define_fake_and_autograd(k: FusedKernels) -> None:
    """The fake kernels and the autograd formulas of one backend's ops."""

    @k.forward.register_fake
    def _(x, G, weight, bias, psi, psi_bias, double_sigmoid, fp32_precision=None, gate_kernel="auto"):
        return torch.empty_like(x), x.new_empty(_alpha_shape(x))

    @k.logits.register_fake
    def _(x, G, weight, bias, psi, psi_bias, fp32_precision=None, gate_kernel="auto"):
        return x.new_empty(_alpha_shape(x), dtype=accumulation_dtype(x.dtype))

    @k.backward.register_fake
    def _(x, G, weight, bias, psi, psi_bias, grad_q, grad_out, grad_alpha, double_sigmoid, fp32_precision=None,
          gate_kernel="auto"):
        acc = accumulation_dtype(x.dtype)
        return (torch.empty_like(x), x.new_empty(_grad_a_shape(x, G.shape[1]), dtype=acc),
                x.new_empty((G.shape[1],), dtype=acc), x.new_empty((1,), dtype=acc))

    @k.project.register_fake
    def _(x, alpha, weight, bias, fp32_precision):
        return torch.empty_like(x) if weight.shape[0] == x.shape[1] else x.new_empty(
            (x.shape[0], weight.shape[0], *x.shape[2:]))

    @k.project_backward.register_fake
    def _(x, alpha, weight, grad_out, fp32_precision):
        return torch.empty_like(x), torch.empty_like(alpha)

    def _save(ctx, inputs, double_sigmoid, variant):
        """``variant``: the (fp32_precision, gate_kernel) the forward ran, given to the backward."""
        ctx.double_sigmoid = bool(double_sigmoid)
        ctx.fp32_precision, ctx.gate_kernel = (tuple(variant) + (None, "auto")[len(variant):])[:2]
        ctx.save_for_backward(*inputs[:6])

    def _setup(ctx, inputs, output):      # forward's (x, G, W, b, w, c, double_sigmoid, fp32_precision, gate_kernel)
        _save(ctx, inputs, inputs[6], inputs[7:])

    def _logits_setup(ctx, inputs, output):   # logits' (x, G, W, b, w, c, fp32_precision, gate_kernel)
        _save(ctx, inputs, False, inputs[6:])

    def _finish(ctx, saved, grads):
        x, G, weight, bias, psi, psi_bias = saved
        grad_x, grad_a, grad_psi, grad_c = grads
        grad_w, grad_b, grad_g = _parameter_grads(ctx, x, grad_a, weight, G)
        need = ctx.needs_input_grad
        return (grad_x if need[0] else None, grad_g, grad_w, grad_b, grad_psi.to(psi.dtype) if need[4] else None,
                grad_c.to(psi_bias.dtype) if need[5] else None)

    def _forward_backward(ctx, grad_out, grad_alpha):
        saved = ctx.saved_tensors
        if grad_out is None and grad_alpha is None:
            return (None,) * 9
        grads = k.backward(*saved, None, grad_out, grad_alpha, ctx.double_sigmoid, ctx.fp32_precision,
                           ctx.gate_kernel)
        return (*_finish(ctx, saved, grads), None, None, None)

    def _logits_backward(ctx, grad_q):
        saved = ctx.saved_tensors
        grads = k.backward(*saved, grad_q, None, None, False, ctx.fp32_precision, ctx.gate_kernel)
        return (*_finish(ctx, saved, grads), None, None)

    k.forward.register_autograd(_forward_backward, setup_context=_setup)
    k.logits.register_autograd(_logits_backward, setup_context=_logits_setup)
    k.project.register_autograd(_project_backward(k), setup_context=_project_setup)


def _project_setup(ctx, inputs, output):
    x, alpha, weight, _bias, fp32_precision = inputs
    ctx.save_for_backward(x, alpha, weight)
    ctx.fp32_precision = fp32_precision


def _project_backward(k: FusedKernels) -> Callable:
    """Grid mode's output transform ``out = α·(W·x) + b``: the kernel gives ``grad_x = α·Wᵀ·grad_out``
    and ``∂α = Σ_c (Wᵀ·grad_out)·x``; ``∂W = Σ_p α·grad_out·xᵀ`` (one GEMM) and ``∂b = Σ_p grad_out``
    are ordinary ops."""

    def backward(ctx, grad_out):
        x, alpha, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_alpha = grad_w = grad_b = None
        if need[0] or need[1]:
            grad_x, grad_alpha = k.project_backward(x, alpha, weight, grad_out, ctx.fp32_precision)
        batch, co = grad_out.shape[:2]
        flat_go = grad_out.reshape(batch, co, -1).to(weight.dtype)
        if need[2]:
            scaled = flat_go * alpha.reshape(batch, 1, -1)
            flat_x = x.reshape(batch, x.shape[1], -1).to(weight.dtype)
            grad_w = torch.bmm(scaled, flat_x.transpose(1, 2)).sum(0)
        if need[3]:
            grad_b = flat_go.sum((0, 2))
        return (grad_x if need[0] else None, grad_alpha if need[1] else None, grad_w, grad_b, None)

    return backward


# ---------------------------------------------------------------------------------------------
# the plan shared by the fused backends
# ---------------------------------------------------------------------------------------------

class _ChannelGram(torch.autograd.Function):
    """``Σ_b flat_b·flat_bᵀ`` (C, C) of a (B, C, N) tensor; backward ``(dG + dGᵀ)·flat_b`` as one
    GEMM (autograd of ``bmm(flat, flatᵀ)`` would run two)."""

    @staticmethod
    def forward(ctx, flat: Tensor) -> Tensor:
        ctx.save_for_backward(flat)
        return torch.bmm(flat, flat.transpose(1, 2)).sum(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (flat,) = ctx.saved_tensors
        return torch.matmul(grad + grad.transpose(0, 1), flat)


def _projected_moments(x: Tensor, weight: Tensor, bias: Tensor, group=None):
    """Mean and biased variance over (B, *S) of each channel of ``u = W·x + b``, without ``u``,
    and the number of values per channel they cover.

    ``mean_u = W·mean_x + b``, ``var_u = diag(W·Cov_x·Wᵀ)``; ``Cov_x`` from one Gram GEMM in the
    accumulation dtype. Differentiable (the gradient through the statistics is autograd of these
    small ops). With a process ``group`` (a SyncBatchNorm), Σx, the Gram matrix Σxxᵀ and the count
    are summed over its ranks in one all_reduce (its backward all-reduces their gradients once),
    so the moments are the whole distributed batch's.
    """
    batch, channels = x.shape[:2]
    flat = x.reshape(batch, channels, -1).to(weight.dtype)
    count = flat.shape[0] * flat.shape[2]
    total, gram = flat.sum((0, 2)), _ChannelGram.apply(flat)
    if group is not None:
        (total, gram), count = all_reduce_sums([total, gram], count, group)
    mean_x = total / count
    cov = gram / count - torch.outer(mean_x, mean_x)
    mean_u = weight @ mean_x + bias
    var_u = ((weight @ cov) * weight).sum(1).clamp_min(0)
    return mean_u, var_u, count


def _fold_stats(weight: Tensor, bias: Tensor, bn: BatchNormParams, mean: Tensor, var: Tensor):
    """``γ/√(var+ε)·(W·x + b − mean) + β`` as one affine map (W̃, b̃), in weight's dtype."""
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(weight.dtype)
    shift = (bias - mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(weight.dtype)
    return weight * scale[:, None], shift


def _normalised_x_branch(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_x: Optional[BatchNormParams]):
    """(W̃, b̃) of ``BN_x(W·x + b)`` with running or batch statistics (weight (Ci, Cx) in acc)."""
    bias = bias.to(weight.dtype) if bias is not None else weight.new_zeros(weight.shape[0])
    if uses_batch_stats(bn_x):
        mean_u, var_u, count = _projected_moments(x, weight, bias, bn_x.process_group if bn_x.training else None)
        if bn_x.training:
            update_running_stats(bn_x, mean_u, var_u, count)
        return _fold_stats(weight, bias, bn_x, mean_u, var_u)
    if bn_x is not None:
        return bn_x.fold(weight, bias)
    return weight, bias


def _output_transform(kernels: FusedKernels, x: Tensor, alpha: Tensor, p: GateParams,
                      fp32_precision: Optional[str]) -> Tensor:
    """Grid mode's ``BN_out(W_out·(α⊙x))`` as the fused ``α·(W̃·x) + b̃`` (BN folded in eval; with
    batch statistics the BN normalises the fused pass's output, exactly as after the conv)."""
    acc = alpha.dtype
    weight = p.out_weight.reshape(p.out_weight.shape[0], x.shape[1]).to(acc)
    bias = p.out_bias.to(acc) if p.out_bias is not None else weight.new_zeros(weight.shape[0])
    fold = foldable(p.bn_out)
    if fold:
        weight, bias = p.bn_out.fold(weight, bias)
    out = kernels.project(x, alpha, weight, bias, fp32_precision)
    return out if fold else batch_norm(out, p.bn_out)


def _fused_grid_gate(kernels: FusedKernels, x: Tensor, g: Tensor, p: GateParams, *, double_sigmoid: bool,
                     return_alpha: bool, fp32_precision: Optional[str], gate_kernel: str) -> Result:
    """Oktay's grid gate: the additive gate's logits pass on the strided grid, then one fused pass
    over x for ``α⊙x`` and the output transform."""
    acc = accumulation_dtype(x.dtype)
    cint = p.wx_weight.shape[0]
    # θ·x: the strided k×k convolution is a GEMM over the k^d patches that shrinks x by Cx·Πk / C_int
    # (8× for Oktay's C_int = Cx/2, k = 2 in 2-D), an ordinary op; the logits kernel then runs the
    # additive gate on the coarse grid with W_x = I (C_int² multiply-adds per coarse position, a
    # fraction Ci / (Cx·Πk) of θ's own), so relu(θ·x + up(φ·g)) is never stored.
    theta = conv(x, p.wx_weight, None, kernel_size(p.wx_weight, x.dim() - 2))
    G = conv_batch_norm(g, p.wg_weight, p.wg_bias, p.bn_g).to(acc).contiguous()
    weight, bias = _normalised_x_branch(theta, torch.eye(cint, dtype=acc, device=x.device), p.wx_bias, p.bn_x)
    psi, psi_b = _psi(p, acc)
    batch_stats = uses_batch_stats(p.bn_psi)
    if p.bn_psi is not None and not batch_stats:
        psi, psi_b = p.bn_psi.fold(psi, psi_b)
    q = kernels.logits(theta, G, weight, bias, psi.reshape(cint), psi_b.reshape(1), fp32_precision, gate_kernel)
    # batch statistics: the BN normalises q in x's dtype, as it would the ψ conv's output
    alpha = torch.sigmoid(batch_norm(q.to(x.dtype), p.bn_psi) if batch_stats else q)
    if double_sigmoid:
        alpha = torch.sigmoid(alpha)
    if alpha.shape[2:] != x.shape[2:]:
        alpha = upsample(alpha, x.shape[2:])  # one channel: 1/Cx of x's traffic
    if p.out_weight is None:
        out = x * alpha.to(x.dtype)
    else:
        out = _output_transform(kernels, x, alpha.to(acc).contiguous(), p, fp32_precision)
    return (out, alpha.to(x.dtype)) if return_alpha else out


def _psi(p: GateParams, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """w_ψ as a (1, C_int) matrix and its bias (1,), in the accumulation dtype."""
    psi = p.psi_weight.reshape(1, p.psi_weight.shape[1]).to(acc)
    return psi, p.psi_bias.to(acc) if p.psi_bias is not None else psi.new_zeros(1)


def fused_gate(kernels: FusedKernels, x: Tensor, g: Tensor, p: GateParams, *, mode: str, double_sigmoid: bool,
               return_alpha: bool, fp32_precision: Optional[str] = None, gate_kernel: str = "auto") -> Result:
    """The gate on a fused backend (arguments as ``ops.attention_gate``'s backends; ``fp32_precision``
    and ``gate_kernel``: the :class:`medattn_fast.KernelConfig`'s, for the Triton kernels' float32
    products and their dot/loop variant; the C++ backends ignore them)."""
    if mode == "grid":
        return _fused_grid_gate(kernels, x, g, p, double_sigmoid=double_sigmoid, return_alpha=return_alpha,
                                fp32_precision=fp32_precision, gate_kernel=gate_kernel)
    variant = (fp32_precision, gate_kernel)
    acc = accumulation_dtype(x.dtype)
    cint, cx = p.wx_weight.shape[0], x.shape[1]

    # 1. the coarse branch with ordinary ops (BN folded in eval, batch statistics in training: per BN)
    G = conv_batch_norm(g, p.wg_weight, p.wg_bias, p.bn_g).to(acc).contiguous()

    # 2. the x branch's BN folded into W_x, with running or batch statistics
    weight, bias = _normalised_x_branch(x, p.wx_weight.reshape(cint, cx).to(acc), p.wx_bias, p.bn_x)
    psi, psi_b = _psi(p, acc)

    # 3. the fused pass
    if uses_batch_stats(p.bn_psi):
        q = kernels.logits(x, G, weight, bias, psi.reshape(cint), psi_b, *variant)
        alpha = torch.sigmoid(batch_norm(q.to(x.dtype), p.bn_psi))
        if double_sigmoid:
            alpha = torch.sigmoid(alpha)
        out = x * alpha
    else:
        if p.bn_psi is not None:
            psi, psi_b = p.bn_psi.fold(psi, psi_b)
        out, alpha = kernels.forward(x, G, weight, bias, psi.reshape(cint), psi_b.reshape(1), double_sigmoid,
                                     *variant)
    if p.out_weight is not None:
        out = conv_batch_norm(out, p.out_weight, p.out_bias, p.bn_out)
    return (out, alpha) if return_alpha else out


def registrar(backend: str, kernels: FusedKernels) -> Callable:
    """The ``register(op)`` of a fused backend: adds :func:`fused_gate` on ``kernels`` to the
    family's dispatcher as ``backend`` (reasons: its device and dtypes, and the table's limits)."""

    def impl(x: Tensor, g: Tensor, params: GateParams, **options) -> Result:
        config = kernel_config()
        return fused_gate(kernels, x, g, params, **options, fp32_precision=config.fp32_precision,
                          gate_kernel=config.gate_kernel)

    def register(op) -> None:
        op.register(backend)(impl)

    return register

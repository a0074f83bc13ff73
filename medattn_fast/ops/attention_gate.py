r"""Attention gate of Attention U-Net: validation, backend dispatch, and the
``reference`` and ``torch`` backends.

Math (``mode="additive"``: Attention U-Net, Oktay et al. 2018, as the widely copied blocks,
LeeJunHyun's and MONAI's write it)::

    a   = BN_x(W_x·x) + up(BN_g(W_g·g))          x (B, Cx, *S), g (B, Cg, *Sg), Sg <= S
    α   = σ(BN_ψ(w_ψ·relu(a)))                    (B, 1, *S)
    out = α ⊙ x                                   (B, Cx, *S)

``mode="grid"`` (Oktay's GridAttentionBlock): ``W_x`` is a strided conv (kernel = stride = k,
given by ``wx_weight``'s kernel shape), so ``a`` and α' live on the coarse grid S' = floor(S / k);
g is resampled to S' (any Sg, up- or down-sampled per axis, as Oktay's gate does), α = up(α', S),
and ``out = α ⊙ x``. Both modes may end with an output transform ``out = BN_out(W_out·out)`` (Oktay's ``W``).

``up`` is bilinear (2-D) / trilinear (3-D) interpolation with ``align_corners=False``; it is the
identity when the sizes already agree. Every BN is optional (``None``: no normalisation); each is
given as a :class:`BatchNormParams` and behaves exactly like ``nn.BatchNorm{2,3}d``: in training
mode it normalises with the batch statistics (biased variance) and updates ``running_mean`` /
``running_var`` in place with ``momentum`` (the unbiased variance goes into the running estimate),
and increments ``num_batches_tracked`` (``momentum=None``: cumulative average); in eval mode it
uses the running statistics (a BN built with ``track_running_stats=False`` uses batch statistics
in both modes, as torch does). A ``torch.nn.SyncBatchNorm`` (``BatchNormParams.process_group``)
takes its training-mode batch moments over every rank of its process group, as SyncBatchNorm
does — one all_reduce of the per-channel sums forward, one of their gradients backward — on
every backend, with gloo on CPU as with NCCL.

Backends:

``reference``
    the unfused module math, one tensor per step, exactly in the order the original modules
    compute it (interpolation always called, BN after every conv).
``torch``
    vectorised composite. Eval mode folds every BN that has running statistics into its 1×1 (or
    strided) conv — ``W' = γ/√(var+ε)·W``, ``b' = γ/√(var+ε)·(b − μ) + β`` — so the gate is three
    convolutions, one sigmoid and one product; the g branch is projected at its own (coarse)
    resolution and interpolated only when its size differs; sums and ReLU run in place. Training
    mode needs the batch statistics of each projection, so it runs conv → ``F.batch_norm``
    (which performs the exact running-stat update) per branch.

Fused kernels (``cpp``, ``cuda``, ``triton``; both modes) live in ``_attention_gate_<backend>.py``
and share one plan (``_attention_gate_fused.fused_gate``); ``medattn_fast.ops`` registers them on
``_op``. Every backend receives the same validated arguments: ``(x, g, params: GateParams, *, mode,
double_sigmoid, return_alpha)``, each BN of ``params`` in its own mode (``BatchNormParams.training``:
the BatchNorm module's own flag, never the gate module's). The BatchNorm maths is ``_batch_norm``'s.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import backend as B
from . import _validate as V
from ._families import dispatcher
from ._attention_gate_fused import GateParams, Result, kernel_size, upsample
from ._batch_norm import BatchNormParams, batch_norm, conv, conv_batch_norm

__all__ = ["BatchNormParams", "GateParams", "attention_gate", "MODES"]

OP = "attention_gate"
MODES = ("additive", "grid")

Tensor = torch.Tensor


_op = dispatcher(OP)   # its row in ops/_families.py: auto orders (a measured per-call hook), limits


# ---------------------------------------------------------------------------------------------
# reference backend: the unfused module math
# ---------------------------------------------------------------------------------------------

@_op.register("reference")
def _reference(x: Tensor, g: Tensor, p: GateParams, *, mode: str, double_sigmoid: bool, return_alpha: bool) -> Result:
    stride = kernel_size(p.wx_weight, x.dim() - 2)
    theta = batch_norm(conv(x, p.wx_weight, p.wx_bias, stride), p.bn_x)
    phi = batch_norm(conv(g, p.wg_weight, p.wg_bias), p.bn_g)
    phi = upsample(phi, theta.shape[2:])  # called unconditionally, as the seeds do
    f = torch.relu(theta + phi)
    alpha = torch.sigmoid(batch_norm(conv(f, p.psi_weight, p.psi_bias), p.bn_psi))
    if double_sigmoid:
        alpha = torch.sigmoid(alpha)
    if mode == "grid":
        alpha = upsample(alpha, x.shape[2:])
    out = alpha * x
    if p.out_weight is not None:
        out = batch_norm(conv(out, p.out_weight, p.out_bias), p.bn_out)
    return (out, alpha) if return_alpha else out


# ---------------------------------------------------------------------------------------------
# torch backend: vectorised composite, BN folded into the convs in eval mode
# ---------------------------------------------------------------------------------------------

@_op.register("torch")
def _torch(x: Tensor, g: Tensor, p: GateParams, *, mode: str, double_sigmoid: bool, return_alpha: bool) -> Result:
    stride = kernel_size(p.wx_weight, x.dim() - 2)
    a = conv_batch_norm(x, p.wx_weight, p.wx_bias, p.bn_x, stride)
    # The g branch is projected at its own (coarse) resolution: the 1×1 conv and the BN are
    # per-pixel affine maps, so they commute with interpolation only in eval — hence the original
    # order (project, normalise, then interpolate) is kept in both modes.
    phi = conv_batch_norm(g, p.wg_weight, p.wg_bias, p.bn_g)
    if phi.shape[2:] != a.shape[2:]:
        phi = upsample(phi, a.shape[2:])
    # ``a`` is a fresh conv / batch-norm output that no backward formula needs: sum and ReLU can
    # overwrite it (ReLU's backward uses its own output, which is what stays in ``a``).
    a = a.add_(phi).relu_()
    alpha = torch.sigmoid(conv_batch_norm(a, p.psi_weight, p.psi_bias, p.bn_psi))
    if double_sigmoid:
        alpha = torch.sigmoid(alpha)
    if alpha.shape[2:] != x.shape[2:]:
        alpha = upsample(alpha, x.shape[2:])
    out = x * alpha
    if p.out_weight is not None:
        out = conv_batch_norm(out, p.out_weight, p.out_bias, p.bn_out)
    return (out, alpha) if return_alpha else out


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _check_weight(name: str, w, out_ch: int, in_ch: int, kernel: Tuple[int, ...], x: Tensor, names: str) -> None:
    V.tensor(OP, name, w, (2, x.dim()))
    expected = (out_ch, in_ch) if w.dim() == 2 else (out_ch, in_ch, *kernel)
    V.shape(OP, name, w, expected, names)


def _check_vector(name: str, t, length: int, names: str) -> None:
    if t is None:
        return
    V.tensor(OP, name, t, 1)
    V.shape(OP, name, t, (length,), names)


def _check_bn(name: str, bn, channels: int, what: str) -> None:
    if bn is None:
        return
    if not isinstance(bn, BatchNormParams):
        raise TypeError(f"{OP}: argument '{name}' must be a BatchNormParams or None, got {type(bn).__name__}")
    for field in ("weight", "bias", "running_mean", "running_var"):
        _check_vector(f"{name}.{field}", getattr(bn, field), channels, f"({what},)")
    if (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(f"{OP}: argument '{name}' must have both running_mean and running_var or neither, "
                         f"got running_mean={'None' if bn.running_mean is None else 'a tensor'} and "
                         f"running_var={'None' if bn.running_var is None else 'a tensor'}")
    if not (isinstance(bn.eps, (int, float)) and bn.eps > 0):
        raise ValueError(f"{OP}: argument '{name}.eps' must be a positive number, got {bn.eps!r}")
    if bn.training not in (None, True, False):
        raise TypeError(f"{OP}: argument '{name}.training' must be a bool or None, got {bn.training!r}")


def _check(x, g, p: GateParams, *, training, mode, double_sigmoid, return_alpha) -> None:
    wx_weight, wx_bias, wg_weight, wg_bias, psi_weight, psi_bias, bn_x, bn_g, bn_psi, out_weight, out_bias, bn_out = p
    V.choice(OP, "mode", mode, MODES)
    V.tensor(OP, "x", x, (4, 5))
    nd = x.dim() - 2
    V.tensor(OP, "g", g, x.dim())
    batch, cx, size = x.shape[0], x.shape[1], tuple(x.shape[2:])
    if g.shape[0] != batch:
        raise ValueError(f"{OP}: argument 'g' must have the batch size of 'x' ({batch}), got shape {tuple(g.shape)}")
    cg = g.shape[1]

    # W_x: a 1×1 conv (additive) or a strided conv whose kernel is its stride (grid).
    V.tensor(OP, "wx_weight", wx_weight, (2, x.dim()))
    cint = wx_weight.shape[0]
    kernel = kernel_size(wx_weight, nd)
    if mode == "additive":
        _check_weight("wx_weight", wx_weight, cint, cx, (1,) * nd, x, "(C_int, Cx, 1...)")
    else:
        _check_weight("wx_weight", wx_weight, cint, cx, kernel, x, "(C_int, Cx, *stride)")
        if any(k > s for k, s in zip(kernel, size)):
            raise ValueError(f"{OP}: argument 'x' must be at least as large as the grid stride {kernel} "
                             f"(the kernel of 'wx_weight'), got spatial size {size}")
    grid = tuple(s // k for s, k in zip(size, kernel))
    _check_vector("wx_bias", wx_bias, cint, "(C_int,)")
    _check_weight("wg_weight", wg_weight, cint, cg, (1,) * nd, x, "(C_int, Cg, 1...)")
    _check_vector("wg_bias", wg_bias, cint, "(C_int,)")
    _check_weight("psi_weight", psi_weight, 1, cint, (1,) * nd, x, "(1, C_int, 1...)")
    _check_vector("psi_bias", psi_bias, 1, "(1,)")
    if out_weight is None:
        if out_bias is not None or bn_out is not None:
            raise ValueError(f"{OP}: arguments 'out_bias' and 'bn_out' need 'out_weight' (the output conv), "
                             f"got out_weight=None")
    else:
        _check_weight("out_weight", out_weight, cx, cx, (1,) * nd, x, "(Cx, Cx, 1...)")
        _check_vector("out_bias", out_bias, cx, "(Cx,)")
    _check_bn("bn_x", bn_x, cint, "C_int")
    _check_bn("bn_g", bn_g, cint, "C_int")
    _check_bn("bn_psi", bn_psi, 1, "1")
    _check_bn("bn_out", bn_out, cx, "Cx")

    # additive: the gating signal is never larger than x. grid: any size, resampled to the grid S'
    # as Oktay's gate does (unet_grid_attention_3D pools by (2, 2, 1): g keeps x's full depth
    # while the strided θ grid halves it, so g is downsampled along that axis)
    if mode == "additive" and any(sg > s for sg, s in zip(g.shape[2:], grid)):
        raise ValueError(f"{OP}: argument 'g' must have spatial size <= x's spatial size per dimension "
                         f"(B, Cg, *Sg) with Sg <= {grid}, got shape {tuple(g.shape)}")

    tensors = {"x": x, "g": g, "wx_weight": wx_weight, "wx_bias": wx_bias, "wg_weight": wg_weight,
               "wg_bias": wg_bias, "psi_weight": psi_weight, "psi_bias": psi_bias, "out_weight": out_weight,
               "out_bias": out_bias}
    for bn_name, bn in (("bn_x", bn_x), ("bn_g", bn_g), ("bn_psi", bn_psi), ("bn_out", bn_out)):
        if bn is not None:
            for field in ("weight", "bias", "running_mean", "running_var"):
                tensors[f"{bn_name}.{field}"] = getattr(bn, field)
    V.same_device_dtype(OP, **tensors)

    # nn.BatchNorm refuses to normalise a channel from a single value; say which BN would see one
    counts = (("bn_x", bn_x, batch * math.prod(grid)), ("bn_g", bn_g, batch * math.prod(g.shape[2:])),
              ("bn_psi", bn_psi, batch * math.prod(grid)), ("bn_out", bn_out, batch * math.prod(size)))
    for name, bn, count in counts:
        if bn is not None and bn.in_mode(training).uses_batch_stats and count == 1:
            raise ValueError(f"{OP}: training-mode '{name}' needs more than one value per channel "
                             f"(B * prod(spatial) > 1), got x {tuple(x.shape)} and g {tuple(g.shape)}")


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------

@B.autocast_entry(cast=False)  # mixed dtypes handled below: the BN state stays float32
def attention_gate(x: Tensor, g: Tensor, wx_weight: Tensor, wx_bias: Optional[Tensor], wg_weight: Tensor,
                   wg_bias: Optional[Tensor], psi_weight: Tensor, psi_bias: Optional[Tensor], *,
                   bn_x: Optional[BatchNormParams] = None, bn_g: Optional[BatchNormParams] = None,
                   bn_psi: Optional[BatchNormParams] = None, out_weight: Optional[Tensor] = None,
                   out_bias: Optional[Tensor] = None, bn_out: Optional[BatchNormParams] = None,
                   training: bool = False, mode: str = "additive", double_sigmoid: bool = False,
                   return_alpha: bool = False, backend: Optional[str] = None) -> Result:
    r"""Attention gate: ``α = σ(BN_ψ(w_ψ·relu(BN_x(W_x·x) + up(BN_g(W_g·g)))))``, ``out = α ⊙ x``.

    The additive gate of Attention U-Net (Oktay et al., "Attention U-Net: Learning Where to Look
    for the Pancreas", MIDL 2018) as the widely copied blocks, LeeJunHyun's Image_Segmentation
    and MONAI write it (``mode="additive"``), and Oktay's own ``GridAttentionBlock``
    (``mode="grid"``: θ a strided conv, α computed on the coarse grid and upsampled, then an
    output transform). ``up`` is (bi|tri)linear with ``align_corners=False``; every BN behaves
    exactly as ``nn.BatchNorm`` (batch statistics and in-place running-stat update in training).

    Args:
        x: (B, Cx, *S) skip-connection features, S = (H, W) or (D, H, W).
        g: (B, Cg, *Sg) gating signal, same rank as x, Sg <= S per dimension (``mode="grid"``:
            any Sg, linearly resampled to the grid S' = S // stride).
        wx_weight, wx_bias: W_x, (C_int, Cx, 1, 1[, 1]) or (C_int, Cx); bias (C_int,) or None.
            ``mode="grid"``: θ, (C_int, Cx, *k) applied with stride k (Oktay: no bias).
        wg_weight, wg_bias: W_g, (C_int, Cg, 1...) or (C_int, Cg); (C_int,) or None.
        psi_weight, psi_bias: w_ψ, (1, C_int, 1...) or (1, C_int); (1,) or None.
        bn_x, bn_g, bn_psi: :class:`BatchNormParams` of the BN after each conv, or None for none.
        out_weight, out_bias, bn_out: optional output transform ``BN_out(W_out·out)``,
            (Cx, Cx, 1...), (Cx,) (Oktay's ``W``).
        training: the mode of every BN given without its own (``BatchNormParams.training`` is
            None): batch statistics and the in-place running-stat update (as ``nn.BatchNorm`` in
            ``train()``), otherwise running statistics. A BN's own flag always wins
            (``BatchNormParams.from_module`` reads it), as each unfused BatchNorm follows its own.
        mode: ``"additive"`` (α at x's resolution) or ``"grid"`` (α on the strided grid, then
            upsampled to S).
        double_sigmoid: apply the sigmoid twice (the quirk of a widely copied Attention U-Net implementation).
        return_alpha: also return α, (B, 1, *S).
        backend: force a backend for this call (``"reference"``, ``"torch"``, ...).

    Returns:
        ``out`` (B, Cx, *S), or ``(out, alpha)`` with ``return_alpha=True``; dtype of x.

    Raises:
        TypeError / ValueError naming the argument, the expected and the received shape, before
        any computation; :class:`medattn_fast.BackendUnavailable` for a forced backend that
        cannot run the call.
    """
    options = dict(mode=mode, double_sigmoid=bool(double_sigmoid), return_alpha=bool(return_alpha))
    in_dtype = x.dtype if isinstance(x, Tensor) else None
    if _low_precision_activations(x, g, wx_weight):
        # Under AMP autocast the convolutions around the gate hand it float16/bfloat16 features
        # while its parameters and BatchNorm state stay float32: compute in float32 (the state is
        # updated in place, so it cannot be cast) and return the features' dtype.
        x, g = x.float(), g.float()
    params = GateParams(wx_weight, wx_bias, wg_weight, wg_bias, psi_weight, psi_bias, bn_x, bn_g, bn_psi,
                        out_weight, out_bias, bn_out)
    _check(x, g, params, training=training, **options)
    # every BN in its own mode from here on (a BatchNormParams without one takes ``training``)
    params = params.in_mode(training)
    result = _op(x, g, params, backend=backend, **options)
    if in_dtype is not None and x.dtype != in_dtype:
        result = tuple(r.to(in_dtype) for r in result) if isinstance(result, tuple) else result.to(in_dtype)
    return result


def _low_precision_activations(x, g, weight) -> bool:
    """x and g float16/bfloat16 while the parameters are float32 (the AMP autocast situation)."""
    half = (torch.float16, torch.bfloat16)
    return (isinstance(x, Tensor) and isinstance(g, Tensor) and isinstance(weight, Tensor)
            and x.dtype in half and g.dtype in half and weight.dtype == torch.float32)

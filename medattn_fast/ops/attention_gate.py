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
and share the plan at the end of this file (:func:`fused_gate`); ``medattn_fast.ops`` registers
them on ``_op``. They receive the same validated arguments as the two backends here.
"""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .. import backend as B
from . import _validate as V

__all__ = ["BatchNormParams", "attention_gate", "MODES"]

OP = "attention_gate"
MODES = ("additive", "grid")

Tensor = torch.Tensor
Result = Union[Tensor, Tuple[Tensor, Tensor]]


class BatchNormParams(NamedTuple):
    """The state of one BatchNorm layer, as the gate consumes it.

    ``weight``/``bias`` (C,) or None (``affine=False``); ``running_mean``/``running_var`` (C,) or
    None (``track_running_stats=False``), updated in place in training mode;
    ``num_batches_tracked`` 0-dim int64 or None, incremented in place in training mode;
    ``process_group``: None (statistics of this process's batch), or the ``torch.distributed``
    group across which training-mode batch statistics are synchronised (a ``SyncBatchNorm``).
    """

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor] = None
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    process_group: Optional[object] = None

    @classmethod
    def from_module(cls, bn: torch.nn.modules.batchnorm._BatchNorm) -> "BatchNormParams":
        """Views (not copies) of an ``nn.BatchNorm{1,2,3}d``'s parameters and buffers.

        A ``torch.nn.SyncBatchNorm`` inside an initialised process group of more than one rank
        gives ``process_group`` (its own group, or the default one), as SyncBatchNorm itself
        decides: training-mode batch statistics are then reduced across that group."""
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                   bn.momentum, bn.eps, _sync_group(bn))

    def tensors(self) -> List[Tensor]:
        return [t for t in (self.weight, self.bias, self.running_mean, self.running_var) if t is not None]

    def fold(self, weight: Tensor, bias: Optional[Tensor], *, out_dim: int = 0) -> Tuple[Tensor, Tensor]:
        r"""Eval-mode ``BN(conv(x))`` as one conv: ``W' = s·W`` (scaled along the output-channel dim
        ``out_dim``: 0 for Conv, 1 for ConvTranspose), ``b' = s·(b − μ) + β`` with
        ``s = γ/√(var + ε)`` (γ = 1, β = 0 without affine). Needs the running statistics; computed
        in at least float32, returned in the weight's dtype."""
        acc = torch.promote_types(weight.dtype, torch.float32)
        scale = torch.rsqrt(self.running_var.to(acc) + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(acc)
        shift = -self.running_mean.to(acc)
        if bias is not None:
            shift = shift + bias.to(acc)
        shift = shift * scale
        if self.bias is not None:
            shift = shift + self.bias.to(acc)
        view = [1] * weight.dim()
        view[out_dim] = -1
        return (weight.to(acc) * scale.view(view)).to(weight.dtype), shift.to(weight.dtype)


def _measured_auto_order(*args, training=False, bn_x=None, bn_g=None, bn_psi=None, **_kw):
    """``auto``'s order for one call: torch before cpp for a CPU training step with batch statistics.

    Measured on the project's 2-core CPU (bench/results/*attention_gate__acceptance-gate*, providers
    interleaved): a training step (batch-statistics BN, forward + backward) of the 2-D gate at
    B=2, C=64, 128² takes 36.4 ms on torch against 41.5 ms on cpp (3-D, 32³: 21.2 against 22.1 ms),
    and AttentionUNet's training step is 1.40x the reference on torch against 1.26x with the cpp
    gate; the cpp gate wins everywhere else (eval, inference, training forward without gradients).
    """
    x = args[0] if args else None   # (x, g, wx_weight, wx_bias, wg_weight, wg_bias, psi_weight, psi_bias)
    if not isinstance(x, Tensor) or x.device.type != "cpu" or not training or not torch.is_grad_enabled():
        return None
    batch_stats = any(bn is not None for bn in (bn_x, bn_g, bn_psi))
    wants_grad = any(isinstance(t, Tensor) and t.requires_grad for t in args)
    return ("torch", "cpp") if batch_stats and wants_grad else None


# auto order: CPU cpp -> torch (torch first for an additive training step, see above), CUDA triton -> cuda -> torch
_op = B.op(OP, auto_order=_measured_auto_order)


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------

def _conv(t: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int] = 1) -> Tensor:
    """1×1 (or strided k×k) convolution of a (B, C, *S) map; weight (C_out, C, *k) or (C_out, C)."""
    nd = t.dim() - 2
    if weight.dim() == 2:
        weight = weight.view(*weight.shape, *([1] * nd))
    conv = F.conv2d if nd == 2 else F.conv3d
    return conv(t, weight, bias, stride=stride)


def _interp_mode(nd: int) -> str:
    return "bilinear" if nd == 2 else "trilinear"


def _upsample(t: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(t, size=tuple(size), mode=_interp_mode(t.dim() - 2), align_corners=False)


def _sync_group(bn: torch.nn.Module):
    """The group a ``SyncBatchNorm`` synchronises over in training (None when it would not: not a
    SyncBatchNorm, no initialised process group, or a group of one rank)."""
    if not isinstance(bn, torch.nn.SyncBatchNorm):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` over a process group, differentiable: the backward all-reduces the
    gradient (every rank's loss depends on the summed statistics), as SyncBatchNorm's backward
    reduces its gradient sums."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = t.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sums(parts: Sequence[Tensor], count: int, group) -> Tuple[List[Tensor], Tensor]:
    """Sum ``parts`` (same dtype) and the element ``count`` over ``group`` in one collective:
    returns the summed parts (reshaped) and the total count (a 0-dim tensor of their dtype)."""
    ref = parts[0]
    flat = torch.cat([p.reshape(-1) for p in parts] + [ref.new_full((1,), float(count))])
    total = _AllReduceSum.apply(flat, group)
    out, start = [], 0
    for p in parts:
        out.append(total[start:start + p.numel()].view(p.shape))
        start += p.numel()
    return out, total[-1]


def update_running_stats(bn: BatchNormParams, mean: Tensor, var: Tensor, count) -> None:
    """``nn.BatchNorm``'s running-statistics update from batch moments (biased ``var``, over
    ``count`` values per channel): the unbiased variance goes into ``running_var``."""
    if bn.running_mean is None:
        return
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    count = float(count)
    with torch.no_grad():
        unbiased = var.detach() * (count / max(count - 1, 1))
        bn.running_mean.mul_(1 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def _sync_batch_norm(t: Tensor, bn: BatchNormParams) -> Tensor:
    """Training-mode BatchNorm with the batch moments of every rank of ``bn.process_group``, as
    ``torch.nn.SyncBatchNorm`` computes them (and on CPU with gloo too, where SyncBatchNorm itself
    refuses to run): one all_reduce of the per-channel sums Σt, Σt² and the count forward; the
    backward (autograd of the normalisation) all-reduces the gradients of those sums once.
    The moments are accumulated in float32 (float64 stays)."""
    acc = torch.promote_types(t.dtype, torch.float32)
    channels = t.shape[1]
    dims = [0, *range(2, t.dim())]
    ta = t.to(acc)
    (total, total_sq), count = all_reduce_sums([ta.sum(dims), (ta * ta).sum(dims)], t.numel() // channels,
                                               bn.process_group)
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0)
    update_running_stats(bn, mean, var, count)
    shape = (1, channels) + (1,) * (t.dim() - 2)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    return (ta * scale.view(shape) + shift.view(shape)).to(t.dtype)


def _batch_norm(t: Tensor, bn: Optional[BatchNormParams], training: bool) -> Tensor:
    """``nn.BatchNorm{2,3}d.forward`` on ``t``, including the in-place buffer updates
    (``SyncBatchNorm``'s, with batch moments over its process group, when ``bn.process_group``)."""
    if bn is None:
        return t
    if training and bn.process_group is not None:
        return _sync_batch_norm(t, bn)
    tracks = bn.running_mean is not None
    factor = 0.0 if bn.momentum is None else bn.momentum
    if training and tracks and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = training or not tracks
    return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, use_batch_stats, factor, bn.eps)


def _kernel(weight: Tensor, nd: int) -> Tuple[int, ...]:
    return tuple(weight.shape[2:]) if weight.dim() > 2 else (1,) * nd


# ---------------------------------------------------------------------------------------------
# reference backend: the unfused module math
# ---------------------------------------------------------------------------------------------

@_op.register("reference")
def _reference(x, g, wx_weight, wx_bias, wg_weight, wg_bias, psi_weight, psi_bias, *, bn_x, bn_g, bn_psi,
               out_weight, out_bias, bn_out, training, mode, double_sigmoid, return_alpha) -> Result:
    nd = x.dim() - 2
    stride = _kernel(wx_weight, nd)
    theta = _batch_norm(_conv(x, wx_weight, wx_bias, stride), bn_x, training)
    phi = _batch_norm(_conv(g, wg_weight, wg_bias), bn_g, training)
    phi = _upsample(phi, theta.shape[2:])  # called unconditionally, as the seeds do
    f = torch.relu(theta + phi)
    alpha = torch.sigmoid(_batch_norm(_conv(f, psi_weight, psi_bias), bn_psi, training))
    if double_sigmoid:
        alpha = torch.sigmoid(alpha)
    if mode == "grid":
        alpha = _upsample(alpha, x.shape[2:])
    out = alpha * x
    if out_weight is not None:
        out = _batch_norm(_conv(out, out_weight, out_bias), bn_out, training)
    return (out, alpha) if return_alpha else out


# ---------------------------------------------------------------------------------------------
# torch backend: vectorised composite, BN folded into the convs in eval mode
# ---------------------------------------------------------------------------------------------

def _foldable(bn: Optional[BatchNormParams], training: bool) -> bool:
    return bn is not None and not training and bn.running_mean is not None


def _pointwise(t: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int]) -> Tensor:
    """A 1×1 convolution as a batched matrix product over the flattened positions.

    On CPU oneDNN's 1×1 convolution is about 2× slower than ``bmm`` for the gate's shapes (few
    channels, many positions); the product reads t through a view, so only contiguous (NC*S)
    inputs take it — others (channels_last, strided) and strided kernels use the convolution.
    """
    kernel_is_1 = weight.dim() == 2 or all(k == 1 for k in weight.shape[2:])
    if not (kernel_is_1 and t.is_contiguous() and all(s == 1 for s in stride)):
        return _conv(t, weight, bias, stride)
    batch, channels = t.shape[:2]
    matrix = weight.reshape(weight.shape[0], channels).expand(batch, -1, -1)
    flat = t.view(batch, channels, -1)
    out = torch.bmm(matrix, flat) if bias is None else torch.baddbmm(bias.view(1, -1, 1), matrix, flat)
    return out.view(batch, weight.shape[0], *t.shape[2:])


def _project(t: Tensor, weight: Tensor, bias: Optional[Tensor], bn: Optional[BatchNormParams], training: bool,
             stride: Sequence[int] = (1,)) -> Tensor:
    """BN(conv(t)): one convolution with folded weights where the BN allows it."""
    if _foldable(bn, training):
        weight, bias = bn.fold(weight, bias)
        return _pointwise(t, weight, bias, stride)
    return _batch_norm(_pointwise(t, weight, bias, stride), bn, training)


@_op.register("torch")
def _torch(x, g, wx_weight, wx_bias, wg_weight, wg_bias, psi_weight, psi_bias, *, bn_x, bn_g, bn_psi,
           out_weight, out_bias, bn_out, training, mode, double_sigmoid, return_alpha) -> Result:
    nd = x.dim() - 2
    stride = _kernel(wx_weight, nd)
    a = _project(x, wx_weight, wx_bias, bn_x, training, stride)
    # The g branch is projected at its own (coarse) resolution: the 1×1 conv and the BN are
    # per-pixel affine maps, so they commute with interpolation only in eval — hence the original
    # order (project, normalise, then interpolate) is kept in both modes.
    phi = _project(g, wg_weight, wg_bias, bn_g, training)
    if phi.shape[2:] != a.shape[2:]:
        phi = _upsample(phi, a.shape[2:])
    # ``a`` is a fresh conv / batch-norm output that no backward formula needs: sum and ReLU can
    # overwrite it (ReLU's backward uses its own output, which is what stays in ``a``).
    a = a.add_(phi).relu_()
    alpha = torch.sigmoid(_project(a, psi_weight, psi_bias, bn_psi, training))
    if double_sigmoid:
        alpha = torch.sigmoid(alpha)
    if alpha.shape[2:] != x.shape[2:]:
        alpha = _upsample(alpha, x.shape[2:])
    out = x * alpha
    if out_weight is not None:
        out = _project(out, out_weight, out_bias, bn_out, training)
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


def _check(x, g, wx_weight, wx_bias, wg_weight, wg_bias, psi_weight, psi_bias, *, bn_x, bn_g, bn_psi,
           out_weight, out_bias, bn_out, training, mode, double_sigmoid, return_alpha) -> None:
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
    kernel = _kernel(wx_weight, nd)
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

    if training:
        # nn.BatchNorm refuses to normalise a channel from a single value; say which BN would see one
        counts = (("bn_x", bn_x, batch * math.prod(grid)), ("bn_g", bn_g, batch * math.prod(g.shape[2:])),
                  ("bn_psi", bn_psi, batch * math.prod(grid)), ("bn_out", bn_out, batch * math.prod(size)))
        for name, bn, count in counts:
            if bn is not None and count == 1:
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
        training: BN uses batch statistics and updates the running ones in place (as
            ``nn.BatchNorm`` in ``train()``); otherwise running statistics.
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
    kw = dict(bn_x=bn_x, bn_g=bn_g, bn_psi=bn_psi, out_weight=out_weight, out_bias=out_bias, bn_out=bn_out,
              training=bool(training), mode=mode, double_sigmoid=bool(double_sigmoid),
              return_alpha=bool(return_alpha))
    in_dtype = x.dtype if isinstance(x, Tensor) else None
    if _low_precision_activations(x, g, wx_weight):
        # Under AMP autocast the convolutions around the gate hand it float16/bfloat16 features
        # while its parameters and BatchNorm state stay float32: compute in float32 (the state is
        # updated in place, so it cannot be cast) and return the features' dtype.
        x, g = x.float(), g.float()
    args = (x, g, wx_weight, wx_bias, wg_weight, wg_bias, psi_weight, psi_bias)
    _check(*args, **kw)
    result = _op(*args, backend=backend, **kw)
    if in_dtype is not None and x.dtype != in_dtype:
        result = tuple(r.to(in_dtype) for r in result) if isinstance(result, tuple) else result.to(in_dtype)
    return result


def _low_precision_activations(x, g, weight) -> bool:
    """x and g float16/bfloat16 while the parameters are float32 (the AMP autocast situation)."""
    half = (torch.float16, torch.bfloat16)
    return (isinstance(x, Tensor) and isinstance(g, Tensor) and isinstance(weight, Tensor)
            and x.dtype in half and g.dtype in half and weight.dtype == torch.float32)


# ---------------------------------------------------------------------------------------------
# the fused backends (cpp, cuda, triton: ops/_attention_gate_<backend>.py) share one plan
# ---------------------------------------------------------------------------------------------
# Every backend runs the same plan; only the three kernels differ (``csrc/cpu/attention_gate.cpp``,
# ``triton_kernels/gate.py``, ``csrc/cuda/attention_gate.cu``). With x (B, Cx, *S), g (B, Cg, *Sg):
#
# 1. **Coarse branch** (ordinary ops, it is small): ``G = BN_g(W_g·g + b_g)`` (B, Ci, *Sg), with BN
#    folded into the conv in eval mode and ``F.batch_norm`` (batch statistics, running-stat update)
#    in training mode.
# 2. **x branch normalisation** folded into ``W_x``: eval uses the running statistics; with batch
#    statistics (training, or a BN without running statistics) the mean and biased variance of
#    ``u = W_x·x + b_x`` come from x's channel moments — ``mean_u = W_x·mean_x + b_x``,
#    ``var_u = diag(W_x·Cov_x·W_xᵀ)`` with ``Cov_x = Σ x xᵀ / N − mean_x mean_xᵀ`` (one Gram GEMM,
#    accumulated in float32/float64) — so ``u`` itself is never materialised. The running
#    statistics are then updated as ``nn.BatchNorm`` does (unbiased variance into ``running_var``).
#    For a ``SyncBatchNorm`` in a process group, Σx, Σxxᵀ and the count are all-reduced over the
#    group first (one collective forward, one for their gradients backward), on every backend; the
#    other BNs (G, ψ, the output transform) go through ``_batch_norm``, which does the same with
#    Σu, Σu².
# 3. **The fused pass** over x:
#
#    * ψ-BN folded (eval): ``gate_forward`` computes, per position,
#      ``a = W̃·x + b̃ + up(G)``, ``q = w̃·relu(a) + c̃``, ``α = σ(q)`` (σ∘σ with ``double_sigmoid``),
#      ``out = α·x`` — x read once, out (and α) written once, ``a`` never stored;
#    * ψ-BN with batch statistics: ``gate_logits`` writes ``q`` (B, 1, *S) only, whose statistics
#      ``F.batch_norm`` takes (exact running-stat update); ``α`` and ``out = α·x`` follow as one
#      elementwise pass (q is a single channel, 1/Cx of x).
#
# Backward: each kernel's autograd formula calls ``gate_backward``, which recomputes ``a`` and
# ``q`` from x (nothing of size Ci·S is saved by the forward) and returns ``grad_x`` (including
# ``α·grad_out``), ``da`` (B, Ci, *S) in the accumulation dtype, and the sums giving the gradients
# of ``w̃`` and ``c̃``. The tiny parameter gradients then come from ordinary ops: ``∂W̃ = Σ da·xᵀ``
# (one GEMM), ``∂b̃ = Σ da``, ``∂G = up*(da)`` (the interpolation's adjoint). Gradients through
# the folds and the batch statistics (step 2) are autograd of those few small ops. This is the
# documented mix: fused kernels for the passes over x, matmuls for the parameter gradients.
#
# The kernels take G, W̃, b̃, w̃, c̃ in the accumulation dtype (float32, or float64 for float64 x) and
# x in its own dtype with any strides; ``out`` has x's dtype and memory format, α x's dtype.
#
# **Grid mode** (Oktay's gate), on the same kernels plus one:
#
# 1. ``θ·x``, the k×k stride-k convolution, is an ordinary op: a GEMM over the k^d patches whose
#    output is Cx·Πk / C_int times smaller than x (8× in 2-D at Oktay's C_int = Cx/2, k = 2).
# 2. The logits pass above runs on the coarse grid with ``x := θ·x`` and ``W_x = I`` (C_int² extra
#    multiply-adds per coarse position, a fraction C_int / (Cx·Πk) of θ's own), so ``up(φ·g)``,
#    ``a`` and ``relu(a)`` are never stored; α' = σ(BN_ψ(q)) (B, 1, *S') and ``α = up(α', S)`` are
#    one channel each (1/Cx of x).
# 3. ``gate_project`` is one pass over x for the output transform,
#    ``out = BN_out(W_out·(α⊙x)) = α·(W̃·x) + b̃`` (α is a scalar per position, so α⊙x is never
#    stored; BN folded in eval, with batch statistics ``F.batch_norm`` normalises the pass's
#    output). Without an output transform ``out = α⊙x`` is already one elementwise pass.
#    Its backward kernel returns ``grad_x = α·W̃ᵀ·grad_out`` and ``∂α = Σ_c (W̃ᵀ·grad_out)·x``;
#    ``∂W̃`` (one GEMM) and ``∂b̃`` are ordinary ops.


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def define_custom_ops(backend: str, kernels: Callable) -> FusedKernels:
    """Declares the five custom ops of one fused backend around ``kernels()`` (a module or extension
    with ``gate_forward``, ``gate_logits``, ``gate_backward``, ``gate_project``,
    ``gate_project_backward``, loaded on first use), with their fake kernels and autograd formulas —
    the same for every fused backend, so they are opaque under ``torch.compile(fullgraph=True)`` and
    ``torch.library.opcheck`` checks them:

    * ``medattn::attention_gate_<backend>_fwd(x, G, W, b, w, c, double_sigmoid) -> (out, alpha)``:
      the additive gate in one pass over x, ψ-BN folded (``a = W·x + b + up(G)``,
      ``α = σ(w·relu(a) + c)``, ``out = α·x``);
    * ``..._logits_fwd(x, G, W, b, w, c) -> q``: the logits only, for a ψ-BN with batch statistics;
    * ``..._bwd(...) -> (grad_x, grad_a, grad_psi, grad_psi_bias)``: the backward of both,
      recomputing ``a`` from x;
    * ``..._project_fwd(x, alpha, W, b) -> α·(W·x) + b`` and ``..._project_bwd``: the output
      transform of the grid gate.
    """
    name = f"medattn::attention_gate_{backend}"

    @torch.library.custom_op(f"{name}_fwd", mutates_args=())
    def forward(x: Tensor, G: Tensor, weight: Tensor, bias: Tensor, psi: Tensor, psi_bias: Tensor,
                double_sigmoid: bool) -> Tuple[Tensor, Tensor]:
        out, alpha = kernels().gate_forward(x, G, weight, bias, psi, psi_bias, double_sigmoid)
        return out, alpha

    @torch.library.custom_op(f"{name}_logits_fwd", mutates_args=())
    def logits(x: Tensor, G: Tensor, weight: Tensor, bias: Tensor, psi: Tensor, psi_bias: Tensor) -> Tensor:
        return kernels().gate_logits(x, G, weight, bias, psi, psi_bias)

    @torch.library.custom_op(f"{name}_bwd", mutates_args=())
    def backward(x: Tensor, G: Tensor, weight: Tensor, bias: Tensor, psi: Tensor, psi_bias: Tensor,
                 grad_q: Optional[Tensor], grad_out: Optional[Tensor], grad_alpha: Optional[Tensor],
                 double_sigmoid: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        gx, ga, gpsi, gc = kernels().gate_backward(x, G, weight, bias, psi, psi_bias, grad_q, grad_out,
                                                   grad_alpha, double_sigmoid)
        return gx, ga, gpsi, gc

    @torch.library.custom_op(f"{name}_project_fwd", mutates_args=())
    def project(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return kernels().gate_project(x, alpha, weight, bias)

    @torch.library.custom_op(f"{name}_project_bwd", mutates_args=())
    def project_backward(x: Tensor, alpha: Tensor, weight: Tensor, grad_out: Tensor) -> Tuple[Tensor, Tensor]:
        grad_x, grad_alpha = kernels().gate_project_backward(x, alpha, weight, grad_out)
        return grad_x, grad_alpha

    k = FusedKernels(forward, logits, backward, project, project_backward)
    _define_fake_and_autograd(k)
    return k


def _define_fake_and_autograd(k: FusedKernels) -> None:
    """The fake kernels and the autograd formulas of one backend's ops."""

    @k.forward.register_fake
    def _(x, G, weight, bias, psi, psi_bias, double_sigmoid):
        return torch.empty_like(x), x.new_empty(_alpha_shape(x))

    @k.logits.register_fake
    def _(x, G, weight, bias, psi, psi_bias):
        return x.new_empty(_alpha_shape(x), dtype=_acc(x.dtype))

    @k.backward.register_fake
    def _(x, G, weight, bias, psi, psi_bias, grad_q, grad_out, grad_alpha, double_sigmoid):
        acc = _acc(x.dtype)
        return (torch.empty_like(x), x.new_empty(_grad_a_shape(x, G.shape[1]), dtype=acc),
                x.new_empty((G.shape[1],), dtype=acc), x.new_empty((1,), dtype=acc))

    @k.project.register_fake
    def _(x, alpha, weight, bias):
        return torch.empty_like(x) if weight.shape[0] == x.shape[1] else x.new_empty(
            (x.shape[0], weight.shape[0], *x.shape[2:]))

    @k.project_backward.register_fake
    def _(x, alpha, weight, grad_out):
        return torch.empty_like(x), torch.empty_like(alpha)

    def _setup(ctx, inputs, output):
        x, G, weight, bias, psi, psi_bias = inputs[:6]
        ctx.double_sigmoid = bool(inputs[6]) if len(inputs) > 6 else False
        ctx.save_for_backward(x, G, weight, bias, psi, psi_bias)

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
            return (None,) * 7
        grads = k.backward(*saved, None, grad_out, grad_alpha, ctx.double_sigmoid)
        return (*_finish(ctx, saved, grads), None)

    def _logits_backward(ctx, grad_q):
        saved = ctx.saved_tensors
        grads = k.backward(*saved, grad_q, None, None, False)
        return _finish(ctx, saved, grads)

    k.forward.register_autograd(_forward_backward, setup_context=_setup)
    k.logits.register_autograd(_logits_backward, setup_context=_setup)
    k.project.register_autograd(_project_backward(k), setup_context=_project_setup)


def _project_setup(ctx, inputs, output):
    x, alpha, weight, _bias = inputs
    ctx.save_for_backward(x, alpha, weight)


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
            grad_x, grad_alpha = k.project_backward(x, alpha, weight, grad_out)
        batch, co = grad_out.shape[:2]
        flat_go = grad_out.reshape(batch, co, -1).to(weight.dtype)
        if need[2]:
            scaled = flat_go * alpha.reshape(batch, 1, -1)
            flat_x = x.reshape(batch, x.shape[1], -1).to(weight.dtype)
            grad_w = torch.bmm(scaled, flat_x.transpose(1, 2)).sum(0)
        if need[3]:
            grad_b = flat_go.sum((0, 2))
        return (grad_x if need[0] else None, grad_alpha if need[1] else None, grad_w, grad_b)

    return backward


# ---------------------------------------------------------------------------------------------
# the plan shared by the fused backends
# ---------------------------------------------------------------------------------------------

def _uses_batch_stats(bn: Optional[BatchNormParams], training: bool) -> bool:
    return bn is not None and (training or bn.running_mean is None)


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


def _normalised_x_branch(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_x, training: bool):
    """(W̃, b̃) of ``BN_x(W·x + b)`` with running or batch statistics (weight (Ci, Cx) in acc)."""
    bias = bias.to(weight.dtype) if bias is not None else weight.new_zeros(weight.shape[0])
    if _uses_batch_stats(bn_x, training):
        mean_u, var_u, count = _projected_moments(x, weight, bias, bn_x.process_group if training else None)
        if training:
            update_running_stats(bn_x, mean_u, var_u, count)
        return _fold_stats(weight, bias, bn_x, mean_u, var_u)
    if bn_x is not None:
        return bn_x.fold(weight, bias)
    return weight, bias


def _output_transform(kernels: FusedKernels, x: Tensor, alpha: Tensor, out_weight, out_bias, bn_out,
                      training: bool) -> Tensor:
    """Grid mode's ``BN_out(W_out·(α⊙x))`` as the fused ``α·(W̃·x) + b̃`` (BN folded in eval; with
    batch statistics the BN normalises the fused pass's output, exactly as after the conv)."""
    acc = alpha.dtype
    weight = out_weight.reshape(out_weight.shape[0], x.shape[1]).to(acc)
    bias = out_bias.to(acc) if out_bias is not None else weight.new_zeros(weight.shape[0])
    fold = _foldable(bn_out, training)
    if fold:
        weight, bias = bn_out.fold(weight, bias)
    out = kernels.project(x, alpha, weight, bias)
    return out if fold else _batch_norm(out, bn_out, training)


def _fused_grid_gate(kernels: FusedKernels, x, g, wx_weight, wx_bias, wg_weight, wg_bias, psi_weight, psi_bias,
                     *, bn_x, bn_g, bn_psi, out_weight, out_bias, bn_out, training, double_sigmoid, return_alpha):
    """Oktay's grid gate: the additive gate's logits pass on the strided grid, then one fused pass
    over x for ``α⊙x`` and the output transform."""
    acc = _acc(x.dtype)
    cint = wx_weight.shape[0]
    # θ·x: the strided k×k convolution is a GEMM over the k^d patches that shrinks x by Cx·Πk / C_int
    # (8× for Oktay's C_int = Cx/2, k = 2 in 2-D), an ordinary op; the logits kernel then runs the
    # additive gate on the coarse grid with W_x = I (C_int² multiply-adds per coarse position, a
    # fraction Ci / (Cx·Πk) of θ's own), so relu(θ·x + up(φ·g)) is never stored.
    theta = _conv(x, wx_weight, None, _kernel(wx_weight, x.dim() - 2))
    G = _project(g, wg_weight, wg_bias, bn_g, training).to(acc).contiguous()
    weight, bias = _normalised_x_branch(theta, torch.eye(cint, dtype=acc, device=x.device), wx_bias, bn_x, training)
    psi = psi_weight.reshape(1, cint).to(acc)
    psi_b = psi_bias.to(acc) if psi_bias is not None else psi.new_zeros(1)
    batch_stats = _uses_batch_stats(bn_psi, training)
    if bn_psi is not None and not batch_stats:
        psi, psi_b = bn_psi.fold(psi, psi_b)
    q = kernels.logits(theta, G, weight, bias, psi.reshape(cint), psi_b.reshape(1))
    # batch statistics: the BN normalises q in x's dtype, as it would the ψ conv's output
    alpha = torch.sigmoid(_batch_norm(q.to(x.dtype), bn_psi, training) if batch_stats else q)
    if double_sigmoid:
        alpha = torch.sigmoid(alpha)
    if alpha.shape[2:] != x.shape[2:]:
        alpha = _upsample(alpha, x.shape[2:])  # one channel: 1/Cx of x's traffic
    if out_weight is None:
        out = x * alpha.to(x.dtype)
    else:
        out = _output_transform(kernels, x, alpha.to(acc).contiguous(), out_weight, out_bias, bn_out, training)
    return (out, alpha.to(x.dtype)) if return_alpha else out


def fused_gate(kernels: FusedKernels, x, g, wx_weight, wx_bias, wg_weight, wg_bias, psi_weight, psi_bias, *,
               bn_x, bn_g, bn_psi, out_weight, out_bias, bn_out, training, mode, double_sigmoid, return_alpha):
    """The gate on a fused backend (arguments as ``ops.attention_gate``'s backends)."""
    if mode == "grid":
        return _fused_grid_gate(kernels, x, g, wx_weight, wx_bias, wg_weight, wg_bias, psi_weight, psi_bias,
                                bn_x=bn_x, bn_g=bn_g, bn_psi=bn_psi, out_weight=out_weight, out_bias=out_bias,
                                bn_out=bn_out, training=training, double_sigmoid=double_sigmoid,
                                return_alpha=return_alpha)
    acc = _acc(x.dtype)
    cint, cx = wx_weight.shape[0], x.shape[1]

    # 1. the coarse branch with ordinary ops (BN folded in eval, batch statistics in training)
    G = _project(g, wg_weight, wg_bias, bn_g, training).to(acc).contiguous()

    # 2. the x branch's BN folded into W_x, with running or batch statistics
    weight, bias = _normalised_x_branch(x, wx_weight.reshape(cint, cx).to(acc), wx_bias, bn_x, training)

    psi = psi_weight.reshape(1, cint).to(acc)
    psi_b = psi_bias.to(acc) if psi_bias is not None else psi.new_zeros(1)

    # 3. the fused pass
    if _uses_batch_stats(bn_psi, training):
        q = kernels.logits(x, G, weight, bias, psi.reshape(cint), psi_b)
        alpha = torch.sigmoid(_batch_norm(q.to(x.dtype), bn_psi, training))
        if double_sigmoid:
            alpha = torch.sigmoid(alpha)
        out = x * alpha
    else:
        if bn_psi is not None:
            psi, psi_b = bn_psi.fold(psi, psi_b)
        out, alpha = kernels.forward(x, G, weight, bias, psi.reshape(cint), psi_b.reshape(1), double_sigmoid)
    if out_weight is not None:
        out = _project(out, out_weight, out_bias, bn_out, training)
    return (out, alpha) if return_alpha else out


def fused_backend(kernels: FusedKernels) -> Callable:
    """The dispatcher entry of a fused backend: :func:`fused_gate` on ``kernels``."""

    def impl(x, g, wx_weight, wx_bias, wg_weight, wg_bias, psi_weight, psi_bias, *, bn_x, bn_g, bn_psi,
             out_weight, out_bias, bn_out, training, mode, double_sigmoid, return_alpha):
        return fused_gate(kernels, x, g, wx_weight, wx_bias, wg_weight, wg_bias, psi_weight, psi_bias,
                          bn_x=bn_x, bn_g=bn_g, bn_psi=bn_psi, out_weight=out_weight, out_bias=out_bias,
                          bn_out=bn_out, training=training, mode=mode, double_sigmoid=double_sigmoid,
                          return_alpha=return_alpha)

    return impl

r"""BatchNorm as the attention gate consumes it: the layer's state (:class:`BatchNormParams`), the
eval-mode fold into a convolution, the training-mode normalisation with its in-place running-stat
update, and ``SyncBatchNorm``'s batch moments over a process group.

Every function here behaves exactly like ``nn.BatchNorm{1,2,3}d`` (and ``nn.SyncBatchNorm``):

* training mode normalises with the batch statistics (biased variance) and updates
  ``running_mean`` / ``running_var`` in place with ``momentum`` (the unbiased variance goes into
  the running estimate), incrementing ``num_batches_tracked`` (``momentum=None``: the cumulative
  average ``1 / num_batches_tracked``);
* eval mode uses the running statistics, so ``BN(W·x + b)`` is the single affine map
  ``W' = s·W``, ``b' = s·(b − μ) + β`` with ``s = γ/√(var + ε)`` (:meth:`BatchNormParams.fold`);
* a BN built with ``track_running_stats=False`` uses batch statistics in both modes;
* a ``SyncBatchNorm`` (``process_group`` set) takes its training-mode moments over every rank of
  its group: one all_reduce of the per-channel sums forward, one of their gradients backward (also
  on CPU with gloo, where ``nn.SyncBatchNorm`` itself refuses to run).

Which of these a BN does is its own ``training`` flag (:attr:`BatchNormParams.training`), never
the flag of the module around it: a fine-tuned network whose BatchNorms were put back in
``eval()`` inside a ``train()`` model keeps its running statistics frozen, as the unfused
modules do.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

__all__ = ["BatchNormParams", "all_reduce_sums", "batch_norm", "conv", "conv_batch_norm", "foldable",
           "pointwise_conv", "update_running_stats"]


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


class BatchNormParams(NamedTuple):
    """The state of one BatchNorm layer, as the gate consumes it.

    ``weight``/``bias`` (C,) or None (``affine=False``); ``running_mean``/``running_var`` (C,) or
    None (``track_running_stats=False``), updated in place in training mode;
    ``num_batches_tracked`` 0-dim int64 or None, incremented in place in training mode;
    ``process_group``: None (statistics of this process's batch), or the ``torch.distributed``
    group across which training-mode batch statistics are synchronised (a ``SyncBatchNorm``);
    ``training``: this BN's own mode (``nn.Module.training``: batch statistics and the running-stat
    update), or None to take the mode the op is called with (``attention_gate(training=...)``).
    """

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor] = None
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    process_group: Optional[object] = None
    training: Optional[bool] = None

    @classmethod
    def from_module(cls, bn: torch.nn.modules.batchnorm._BatchNorm) -> "BatchNormParams":
        """Views (not copies) of an ``nn.BatchNorm{1,2,3}d``'s parameters and buffers.

        A ``torch.nn.SyncBatchNorm`` inside an initialised process group of more than one rank
        gives ``process_group`` (its own group, or the default one), as SyncBatchNorm itself
        decides: training-mode batch statistics are then reduced across that group. ``training``
        is the module's own flag, whatever the flag of the module that holds it."""
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                   bn.momentum, bn.eps, _sync_group(bn), bn.training)

    def in_mode(self, training: bool) -> "BatchNormParams":
        """This BN with its mode decided: its own ``training`` flag when it has one, else ``training``."""
        return self if self.training is not None else self._replace(training=bool(training))

    @property
    def uses_batch_stats(self) -> bool:
        """It normalises with this batch's statistics: training mode, or no running statistics."""
        return bool(self.training) or self.running_mean is None

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


def uses_batch_stats(bn: Optional[BatchNormParams]) -> bool:
    """There is a BN and it normalises with this batch's statistics."""
    return bn is not None and bn.uses_batch_stats


def foldable(bn: Optional[BatchNormParams]) -> bool:
    """There is a BN and it is an affine map of its running statistics, so it folds into the conv
    before it."""
    return bn is not None and not bn.uses_batch_stats


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
    ``torch.nn.SyncBatchNorm`` computes them: one all_reduce of the per-channel sums Σt, Σt² and
    the count forward; the backward (autograd of the normalisation) all-reduces the gradients of
    those sums once. The moments are accumulated in float32 (float64 stays)."""
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


def batch_norm(t: Tensor, bn: Optional[BatchNormParams]) -> Tensor:
    """``nn.BatchNorm{2,3}d.forward`` on ``t`` in the BN's own mode, including the in-place buffer
    updates (``SyncBatchNorm``'s, with batch moments over its process group, when ``bn.process_group``)."""
    if bn is None:
        return t
    if bn.training and bn.process_group is not None:
        return _sync_batch_norm(t, bn)
    tracks = bn.running_mean is not None
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and tracks and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.uses_batch_stats, factor,
                        bn.eps)


# ---------------------------------------------------------------------------------------------
# convolution followed by a BatchNorm
# ---------------------------------------------------------------------------------------------

def conv(t: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int] = 1) -> Tensor:
    """1×1 (or strided k×k) convolution of a (B, C, *S) map; weight (C_out, C, *k) or (C_out, C)."""
    nd = t.dim() - 2
    if weight.dim() == 2:
        weight = weight.view(*weight.shape, *([1] * nd))
    fn = F.conv2d if nd == 2 else F.conv3d
    return fn(t, weight, bias, stride=stride)


def pointwise_conv(t: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int]) -> Tensor:
    """:func:`conv`, as a batched matrix product over the flattened positions where it can be.

    On CPU oneDNN's 1×1 convolution is about 2× slower than ``bmm`` for the gate's shapes (few
    channels, many positions); the product reads t through a view, so only contiguous (NC*S)
    inputs take it — others (channels_last, strided) and strided kernels use the convolution.
    """
    kernel_is_1 = weight.dim() == 2 or all(k == 1 for k in weight.shape[2:])
    if not (kernel_is_1 and t.is_contiguous() and all(s == 1 for s in stride)):
        return conv(t, weight, bias, stride)
    batch, channels = t.shape[:2]
    matrix = weight.reshape(weight.shape[0], channels).expand(batch, -1, -1)
    flat = t.view(batch, channels, -1)
    out = torch.bmm(matrix, flat) if bias is None else torch.baddbmm(bias.view(1, -1, 1), matrix, flat)
    return out.view(batch, weight.shape[0], *t.shape[2:])


def conv_batch_norm(t: Tensor, weight: Tensor, bias: Optional[Tensor], bn: Optional[BatchNormParams],
                    stride: Sequence[int] = (1,)) -> Tensor:
    """``BN(conv(t))``: one convolution with folded weights where the BN allows it."""
    if foldable(bn):
        weight, bias = bn.fold(weight, bias)
        return pointwise_conv(t, weight, bias, stride)
    return batch_norm(pointwise_conv(t, weight, bias, stride), bn)

"""``AttentionGate``: the Attention U-Net gate as a clean module on
:func:`medattn_fast.functional.attention_gate`."""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import functional as MF

__all__ = ["AttentionGate"]


def _bn(module: Optional[nn.Module]) -> Optional[MF.BatchNormParams]:
    return None if module is None else MF.BatchNormParams.from_module(module)


class AttentionGate(nn.Module):
    r"""Attention gate of Attention U-Net, 2-D or 3-D.

    ``mode="additive"`` (Oktay et al. as most code bases write it: the widely copied blocks, LeeJunHyun, MONAI)::

        α   = σ(BN(ψ·relu(BN(W_x·x) + up(BN(W_g·g)))))        (B, 1, *S)
        out = α ⊙ x                                          (B, x_channels, *S)

    ``mode="grid"`` (Oktay's GridAttentionBlock): ``W_x`` is a ``sub_sample_factor``-strided conv
    without bias, the gate is computed on that coarse grid without BN, α is upsampled to S, and an
    output transform ``BN(W_out·(α ⊙ x))`` follows.

    Args:
        x_channels: Cx, channels of the skip connection x (B, Cx, *S).
        g_channels: Cg, channels of the gating signal g (B, Cg, *Sg), Sg <= S (grid: <= S // s).
        inter_channels: C_int, channels of the intermediate map.
        spatial_dims: 2 or 3.
        mode: ``"additive"`` or ``"grid"``.
        sub_sample_factor: grid mode: the stride s of θ (an int or one per spatial dim).
        output_transform: add the ``BN(W_out·)`` output conv; default: only in grid mode.
        double_sigmoid: apply the sigmoid twice (reproduces a widely copied Attention U-Net implementation).
        return_alpha: ``forward`` returns ``(out, alpha)`` by default.
        backend: force a backend for every call of this module (default: the global choice).
        device, dtype: where the parameters are created (torch.nn's factory keywords).

    ``forward(x, g, return_alpha=None)`` returns ``out`` or ``(out, alpha)``. Each BN follows its
    own flag, as an unfused BatchNorm does: in ``train()`` it uses batch statistics and updates its
    running statistics; in ``eval()`` (also inside a gate in ``train()``, e.g. frozen for
    fine-tuning) it is folded into its convolution by the fast backends.
    """

    def __init__(self, x_channels: int, g_channels: int, inter_channels: int, *, spatial_dims: int = 2,
                 mode: str = "additive", sub_sample_factor: Union[int, Sequence[int]] = 2,
                 output_transform: Optional[bool] = None, double_sigmoid: bool = False,
                 return_alpha: bool = False, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"AttentionGate: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if mode not in ("additive", "grid"):
            raise ValueError(f"AttentionGate: mode must be 'additive' or 'grid', got {mode!r}")
        factory = dict(device=device, dtype=dtype)
        conv = functools.partial(nn.Conv2d if spatial_dims == 2 else nn.Conv3d, **factory)
        norm = functools.partial(nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d, **factory)
        self.mode = mode
        self.spatial_dims = spatial_dims
        self.double_sigmoid = bool(double_sigmoid)
        self.return_alpha = bool(return_alpha)
        self.backend = backend
        if mode == "grid":
            if isinstance(sub_sample_factor, int):
                sub_sample_factor = (sub_sample_factor,) * spatial_dims
            stride = tuple(int(s) for s in sub_sample_factor)
            if len(stride) != spatial_dims or any(s < 1 for s in stride):
                raise ValueError(f"AttentionGate: sub_sample_factor must be {spatial_dims} positive ints, "
                                 f"got {sub_sample_factor!r}")
            self.x_conv = conv(x_channels, inter_channels, kernel_size=stride, stride=stride, bias=False)
        else:
            self.x_conv = conv(x_channels, inter_channels, kernel_size=1)
        self.g_conv = conv(g_channels, inter_channels, kernel_size=1)
        self.psi_conv = conv(inter_channels, 1, kernel_size=1)
        gate_norms = mode == "additive"
        self.x_norm = norm(inter_channels) if gate_norms else None
        self.g_norm = norm(inter_channels) if gate_norms else None
        self.psi_norm = norm(1) if gate_norms else None
        if output_transform is None:
            output_transform = mode == "grid"
        self.out_conv = conv(x_channels, x_channels, kernel_size=1) if output_transform else None
        self.out_norm = norm(x_channels) if output_transform else None

    def forward(self, x: torch.Tensor, g: torch.Tensor,
                return_alpha: Optional[bool] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        out_conv = self.out_conv
        return MF.attention_gate(
            x, g, self.x_conv.weight, self.x_conv.bias, self.g_conv.weight, self.g_conv.bias,
            self.psi_conv.weight, self.psi_conv.bias,
            bn_x=_bn(self.x_norm), bn_g=_bn(self.g_norm), bn_psi=_bn(self.psi_norm),
            out_weight=None if out_conv is None else out_conv.weight,
            out_bias=None if out_conv is None else out_conv.bias, bn_out=_bn(self.out_norm),
            training=self.training, mode=self.mode, double_sigmoid=self.double_sigmoid,
            return_alpha=self.return_alpha if return_alpha is None else bool(return_alpha),
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, spatial_dims={self.spatial_dims}, double_sigmoid={self.double_sigmoid}"

"""``AttentionGate``: the Attention U-Net gate as a clean module on
:func:`medattn_fast.functional.attention_gate`."""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend as B
from .. import functional as MF

__all__ = ["AttentionGate", "NORMS", "UNFUSED_NORMS"]

NORMS = ("batch", "instance", None)

# The gate's normalisations the fused kernels cannot run, each with its reason (one line, shown by
# ``medattn-fast info``); AttentionGate computes them with PyTorch modules instead.
UNFUSED_NORMS = {
    "instance": "InstanceNorm normalises each image by its own statistics while the fused kernels fold one "
                "normalisation per channel for the whole batch: AttentionGate(norm='instance') runs the "
                "unfused PyTorch modules (exact)",
}

_NORM_CLASSES = {("batch", 2): nn.BatchNorm2d, ("batch", 3): nn.BatchNorm3d,
                 ("instance", 2): nn.InstanceNorm2d, ("instance", 3): nn.InstanceNorm3d}


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
        norm: the normalisation after each conv of the gate: ``"batch"`` (BatchNorm, the original
            gate; fused), ``None`` (none; fused) or ``"instance"`` (InstanceNorm, as nnU-Net's
            networks use: computed with the unfused PyTorch modules, see ``UNFUSED_NORMS``).
        norm_kwargs: keyword arguments of the norm layers (``eps``, ``momentum``, ``affine``,
            ``track_running_stats``); default: PyTorch's, except InstanceNorm's ``affine=True``.
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
                 norm: Optional[str] = "batch", norm_kwargs: Optional[dict] = None, mode: str = "additive",
                 sub_sample_factor: Union[int, Sequence[int]] = 2,
                 output_transform: Optional[bool] = None, double_sigmoid: bool = False,
                 return_alpha: bool = False, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"AttentionGate: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if mode not in ("additive", "grid"):
            raise ValueError(f"AttentionGate: mode must be 'additive' or 'grid', got {mode!r}")
        if norm not in NORMS:
            raise ValueError(f"AttentionGate: norm must be one of {NORMS}, got {norm!r}")
        factory = dict(device=device, dtype=dtype)
        conv = functools.partial(nn.Conv2d if spatial_dims == 2 else nn.Conv3d, **factory)
        self.norm = norm
        norm_kwargs = dict({"affine": True} if norm == "instance" else {}, **(norm_kwargs or {}))
        norm_layer = (None if norm is None
                      else functools.partial(_NORM_CLASSES[norm, spatial_dims], **norm_kwargs, **factory))
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
        gate_norms = mode == "additive" and norm_layer is not None
        self.x_norm = norm_layer(inter_channels) if gate_norms else None
        self.g_norm = norm_layer(inter_channels) if gate_norms else None
        self.psi_norm = norm_layer(1) if gate_norms else None
        if output_transform is None:
            output_transform = mode == "grid"
        self.out_conv = conv(x_channels, x_channels, kernel_size=1) if output_transform else None
        self.out_norm = norm_layer(x_channels) if output_transform and norm_layer is not None else None

    def forward(self, x: torch.Tensor, g: torch.Tensor,
                return_alpha: Optional[bool] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        return_alpha = self.return_alpha if return_alpha is None else bool(return_alpha)
        if self.norm in UNFUSED_NORMS:
            return self._unfused_forward(x, g, return_alpha)
        out_conv = self.out_conv
        return MF.attention_gate(
            x, g, self.x_conv.weight, self.x_conv.bias, self.g_conv.weight, self.g_conv.bias,
            self.psi_conv.weight, self.psi_conv.bias,
            bn_x=_bn(self.x_norm), bn_g=_bn(self.g_norm), bn_psi=_bn(self.psi_norm),
            out_weight=None if out_conv is None else out_conv.weight,
            out_bias=None if out_conv is None else out_conv.bias, bn_out=_bn(self.out_norm),
            training=self.training, mode=self.mode, double_sigmoid=self.double_sigmoid,
            return_alpha=return_alpha, backend=self.backend,
        )

    def _unfused_forward(self, x: torch.Tensor, g: torch.Tensor, return_alpha: bool):
        """The gate's math (see the class docstring) on this module's own layers, one PyTorch op
        at a time: for the norms the fused kernels cannot run (``UNFUSED_NORMS``). A forced fused
        backend refuses, as the op refuses a call it cannot run."""
        backend = self.backend or B.get_backend()
        if backend not in ("auto", "reference", "torch"):
            raise B.BackendUnavailable(f"attention_gate: backend {backend!r} cannot run AttentionGate(norm="
                                       f"{self.norm!r}): {UNFUSED_NORMS[self.norm]}")
        if not (isinstance(x, torch.Tensor) and isinstance(g, torch.Tensor) and x.dim() == self.spatial_dims + 2
                and g.dim() == x.dim() and g.shape[0] == x.shape[0]):
            raise ValueError(f"AttentionGate: expected x (B, Cx, *S) and g (B, Cg, *Sg) with {self.spatial_dims} "
                             f"spatial dims and the same B, got x {_shape(x)} and g {_shape(g)}")
        interp = "bilinear" if self.spatial_dims == 2 else "trilinear"

        def normed(layer: Optional[nn.Module], t: torch.Tensor) -> torch.Tensor:
            return t if layer is None else layer(t)

        theta = normed(self.x_norm, self.x_conv(x))
        phi = normed(self.g_norm, self.g_conv(g))
        if phi.shape[2:] != theta.shape[2:]:
            phi = F.interpolate(phi, size=theta.shape[2:], mode=interp, align_corners=False)
        alpha = torch.sigmoid(normed(self.psi_norm, self.psi_conv(torch.relu(theta + phi))))
        if self.double_sigmoid:
            alpha = torch.sigmoid(alpha)
        if alpha.shape[2:] != x.shape[2:]:
            alpha = F.interpolate(alpha, size=x.shape[2:], mode=interp, align_corners=False)
        out = alpha * x
        if self.out_conv is not None:
            out = normed(self.out_norm, self.out_conv(out))
        return (out, alpha) if return_alpha else out

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, spatial_dims={self.spatial_dims}, norm={self.norm!r}, "
                f"double_sigmoid={self.double_sigmoid}")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__

r"""The ``cuda`` backend of the attention gate: the custom ops ``medattn::attention_gate_cuda_*`` around
``csrc/cuda/attention_gate.cu``, declared by :func:`medattn_fast.ops._attention_gate_fused.define_custom_ops` (which lists them);
the plan around the kernels is :func:`medattn_fast.ops._attention_gate_fused.fused_gate`.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import backend as B
from . import _attention_gate_fused as fused

__all__ = ["KERNELS", "cuda_shared_memory_reasons", "register"]


def _kernels():
    from .. import _build

    return _build.load("cuda", "attention_gate")   # built on first use


KERNELS = fused.define_custom_ops("cuda", _kernels)


# csrc/cuda/attention_gate.cu stages, per block of P >= 32 positions, the x tile (Cx × P; two tiles in
# the backward), W_x (Ci × Cx) and a (Ci + 1) × P buffer in shared memory (pick_block), and grid
# mode's output pass the x and output tiles ((Cx + Co) × P, pick_projection_block), all in the
# accumulation dtype.
CUDA_MIN_POSITIONS = 32


def cuda_shared_memory_reasons(x: Tensor, wx_weight: Tensor, *, mode: str, out_weight: Optional[Tensor],
                               backward: bool, limit: Optional[int] = None) -> List[str]:
    """Why the CUDA gate cannot fit this call's tiles into shared memory ([] when it can).

    ``limit``: opt-in shared memory per block in bytes (default: x's CUDA device's). E.g. Cx = 512,
    Ci = 256 in float32 needs 622 KiB forward, 688 KiB backward — over a Hopper block's 227 KiB, so
    ``auto`` takes another backend and a forced ``cuda`` call says why, before any launch."""
    if limit is None:
        if x.device.type != "cuda":
            return []
        props = torch.cuda.get_device_properties(x.device)
        limit = int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
    elem = 8 if x.dtype == torch.float64 else 4
    p = CUDA_MIN_POSITIONS
    tiles = 2 if backward else 1
    cx, ci = x.shape[1], wx_weight.shape[0]
    if mode == "grid":
        cx = ci   # the logits pass runs on θ·x with W_x = I (Ci × Ci)
    needs = [("gate pass", elem * (tiles * cx * p + ci * cx + (ci + 1) * p))]
    if mode == "grid" and out_weight is not None:
        needs.append(("output transform", elem * (x.shape[1] + out_weight.shape[0]) * p))
    return [f"the cuda gate's {what} needs {need} B of shared memory per block at {p} positions "
            f"(Cx = {x.shape[1]}, Ci = {ci}, {x.dtype}{', backward' if backward else ''}), over this "
            f"device's {limit} B" for what, need in needs if need > limit]


def _cuda_reasons(x, g, params: fused.GateParams, *, mode, **_options):
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (x, g, *params.tensors()))
    reasons = cuda_shared_memory_reasons(x, params.wx_weight, mode=mode, out_weight=params.out_weight,
                                         backward=backward) if x.device.type == "cuda" else []
    return reasons or B.cuda_predicate("attention_gate")(x, g)


def register(op: B.Op) -> None:
    """Adds the ``cuda`` backend to ``op``, the family's dispatcher (called by ``medattn_fast.ops``)."""
    op.register("cuda", reasons=_cuda_reasons)(fused.fused_backend(KERNELS))

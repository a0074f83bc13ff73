"""The public functional API: one function per attention op of the medical segmentation networks.

=================================  ==========================================================
:func:`position_attention`         softmax attention over tokens, never storing the N×N matrix
                                   (DANet's PAM, Fu et al., CVPR 2019; the ``V @ A`` form of
                                   Multi-Scale Guided Attention, Sinha & Dolz 2020; non-local
                                   and cross-attention)
:func:`channel_attention`          C×C attention between channels (DANet's CAM)
:func:`gaussian_axial_attention`   Gaussian-weighted axial attention from q, k, v (MT-UNet's
                                   GaussianTrans, Wang et al., ICASSP 2022)
:func:`gaussian_axial_from_scores` the same from precomputed scores (GaussianTrans's interface)
:func:`window_attention`           multi-head attention in ws×ws windows (MT-UNet's WinAttention)
:func:`external_attention`         attention to two learnable memories (MT-UNet's MEAttention;
                                   EANet, Guo et al., 2021)
:func:`attention_gate`             additive attention gate (Attention U-Net, Oktay et al., 2018),
                                   and Oktay's grid gate
=================================  ==========================================================

Every function accepts float32, float16 and bfloat16 (float64 on the ``reference``, ``torch`` and
``cpp`` backends), accumulates in float32 (float64 for float64) and returns the input dtype. Bad
input raises ``ValueError``/``TypeError`` naming the argument, the expected and the received,
before any kernel launch. The backend is chosen per call (see :mod:`medattn_fast.backend`); pass
``backend=`` to force one for a single call. Each function's docstring gives its math and shapes.
"""
from __future__ import annotations

from .ops.attention_gate import BatchNormParams, attention_gate
from .ops.channel import channel_attention
from .ops.external import external_attention
from .ops.gaussian_axial import gaussian_axial_attention, gaussian_axial_from_scores
from .ops.position import position_attention
from .ops.window import LAYOUTS as WINDOW_LAYOUTS
from .ops.window import PAD_MODES as WINDOW_PAD_MODES
from .ops.window import window_attention

__all__ = [
    "position_attention",
    "channel_attention",
    "gaussian_axial_attention",
    "gaussian_axial_from_scores",
    "window_attention",
    "external_attention",
    "attention_gate",
    "BatchNormParams",
    "WINDOW_LAYOUTS",
    "WINDOW_PAD_MODES",
]

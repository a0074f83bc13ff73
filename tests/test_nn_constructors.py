"""The constructors of ``medattn_fast.nn`` agree: ``spatial_dims`` (where a module has it) is the
first keyword-only parameter, ``backend`` (where the module calls an op), ``device`` and ``dtype``
are the last ones, keyword-only, in that order; ``device``/``dtype`` create the parameters there,
as torch.nn's factory keywords do, and ``backend`` reaches the op."""
from __future__ import annotations

import inspect

import pytest
import torch

import medattn_fast
import medattn_fast.nn as N

MODULES = [getattr(N, name) for name in N.__all__]
NO_OP = {"Pointwise", "SEChannelAttention", "WindowAggregation"}   # plain GEMMs: no backend to choose

ARGS = {
    "AttentionGate": (4, 3, 2), "ChannelAttention": (), "DualAttention": (16, 2), "ExternalAttention": (8, 4),
    "GaussianAxialAttention": (8,), "LocalGlobalAttention": (8, 2), "MixedTransformerBlock": (8, 2),
    "Pointwise": (4, 3), "PositionAttention": (16,), "SEChannelAttention": (8,), "SelfAttentionLayer": (8, 2),
    "SkipCrossAttentionLayer": (8, 4, 2), "WindowAggregation": (8,), "WindowAttention": (8, 2),
}


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_keywords_in_one_order(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    tail = ["device", "dtype"] if cls.__name__ in NO_OP else ["backend", "device", "dtype"]
    assert [p.name for p in params[-len(tail):]] == tail, cls.__name__
    assert all(p.kind == p.KEYWORD_ONLY for p in params[-len(tail):]), cls.__name__
    keyword_only = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
    if "spatial_dims" in keyword_only or any(p.name == "spatial_dims" for p in params):
        assert keyword_only[0] == "spatial_dims", cls.__name__


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_dtype_creates_the_parameters(cls):
    module = cls(*ARGS[cls.__name__], dtype=torch.float64)
    dtypes = {p.dtype for p in module.parameters()} | {b.dtype for b in module.buffers() if b.is_floating_point()}
    assert dtypes == {torch.float64}, cls.__name__


def test_backend_reaches_the_op():
    x = torch.randn(1, 16, 3, 5)
    with pytest.raises(medattn_fast.BackendUnavailable, match="cuda"):
        N.PositionAttention(16, backend="cuda")(x)
    with pytest.raises(medattn_fast.BackendUnavailable, match="cuda"):
        N.ChannelAttention(backend="cuda")(x)
    torch.testing.assert_close(N.ChannelAttention(backend="reference")(x), N.ChannelAttention(backend="torch")(x))

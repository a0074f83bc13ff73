"""MT-UNet's clean nn modules (medattn_fast.nn.mtunet) against the original modules with mapped
weights, and their torch.compile graph. The ops inside: test_window.py, test_external.py,
test_gaussian_axial.py."""

import pytest
import torch
import torch.nn.functional as F

import medattn_fast.functional as MF
from medattn_fast.ops.external import external_attention
from medattn_fast.ops.window import window_attention
from medattn_fast.reference import mtunet as R

from _helpers import external_params, grads_or_zeros, window_params

F64 = dict(dtype=torch.float64)
TIGHT = dict(rtol=1e-10, atol=1e-11)


# ---------------------------------------------------------------------------------------------
# clean nn modules (medattn_fast.nn.mtunet) against the seed modules with mapped weights
# ---------------------------------------------------------------------------------------------

from medattn_fast.nn import mtunet as N  # noqa: E402
from medattn_fast.reference.gaussian_trans import gaussian_axial_from_qkv_reference  # noqa: E402

CFG = {"win_size": 4, "head": 2}


def _copy_linear(dst, src):
    dst.weight.data.copy_(src.weight.data)
    if dst.bias is not None:
        dst.bias.data.copy_(src.bias.data)


def _local_global_from_reference(block, ref):
    """Load CSAttention's weights into LocalGlobalAttention (the dead ones have no slot)."""
    att = ref.win_atten.attention
    for dst, src in ((block.local.query, att.query_layer), (block.local.key, att.key_layer),
                     (block.local.value, att.value_layer), (block.local.proj, att.out),
                     (block.aggregate.score, ref.dlightconv.linear),
                     (block.global_attention.query, ref.global_atten.query_layer),
                     (block.global_attention.key, ref.global_atten.key_layer),
                     (block.global_attention.value, ref.global_atten.value_layer)):
        _copy_linear(dst, src)
    block.global_attention.shift.data.copy_(ref.gaussiantrans.shift.data)
    block.fuse.weight.data.copy_(ref.queeze.weight.data.flatten(1))
    block.fuse.bias.data.copy_(ref.queeze.bias.data)


def _external_from_reference(block, ref):
    for dst, src in ((block.query, ref.query_liner), (block.memory_key, ref.linear_0),
                     (block.memory_value, ref.linear_1), (block.proj, ref.proj)):
        _copy_linear(dst, src)


@pytest.mark.parametrize("pad_mode", ["mtunet", "mask"])
def test_nn_window_attention_matches_functional_reference(pad_mode):
    block = N.WindowAttention(8, num_heads=2, window_size=4, pad_mode=pad_mode).double()
    x = torch.randn(2, 5, 7, 8, **F64, requires_grad=True)
    out = block(x)
    params = [block.query.weight, block.query.bias, block.key.weight, None, block.value.weight, block.value.bias,
              block.proj.weight, block.proj.bias]
    ref = window_attention(x, *params, window_size=4, num_heads=2, pad_mode=pad_mode, backend="reference")
    torch.testing.assert_close(out, ref, **TIGHT)
    live = [x] + [p for p in params if p is not None]
    cot = torch.randn_like(ref)
    for g, gr in zip(grads_or_zeros(out, live, cot), grads_or_zeros(ref, live, cot)):
        torch.testing.assert_close(g, gr, **TIGHT)


def test_nn_window_aggregation_matches_dlightconv():
    ref = R.DlightConv(6, CFG).double()
    block = N.WindowAggregation(6, window_size=4).double()
    _copy_linear(block.score, ref.linear)
    x = torch.randn(2, 3, 2, 16, 6, **F64)
    torch.testing.assert_close(block(x), ref(x), **TIGHT)


def test_nn_gaussian_axial_attention_non_square():
    block = N.GaussianAxialAttention(6).double()
    x = torch.randn(2, 3, 5, 6, **F64, requires_grad=True)
    out = block(x)
    ref = gaussian_axial_from_qkv_reference(block.query(x), block.key(x), block.value(x), block.shift)
    torch.testing.assert_close(out, ref, **TIGHT)
    live = [x, block.shift, block.query.weight, block.key.weight, block.value.bias]
    cot = torch.randn_like(ref)
    for g, gr in zip(grads_or_zeros(out, live, cot), grads_or_zeros(ref, live, cot)):
        torch.testing.assert_close(g, gr, **TIGHT)


@pytest.mark.parametrize("side", [7, 8])
def test_nn_local_global_attention_matches_csattention(side):
    ref = R.CSAttention(8, CFG).double()
    block = N.LocalGlobalAttention(8, num_heads=2, window_size=4).double()
    _local_global_from_reference(block, ref)
    x = torch.randn(2, side, side, 8, **F64)
    torch.testing.assert_close(block(x), ref(x.reshape(2, -1, 8)).view(2, side, side, 8), **TIGHT)


def test_nn_local_global_attention_non_square_is_the_composition_of_its_parts():
    """H != W (the original cannot): windows -> aggregation -> axial -> ×ws upsample -> fuse, crop."""
    block = N.LocalGlobalAttention(8, num_heads=2, window_size=4).double()
    x = torch.randn(1, 5, 9, 8, **F64)
    out = block(x)
    assert out.shape == (1, 5, 9, 8)
    loc = block.local
    windows = window_attention(x, loc.query.weight, loc.query.bias, loc.key.weight, None, loc.value.weight,
                               loc.value.bias, loc.proj.weight, loc.proj.bias, window_size=4, num_heads=2,
                               layout="windows", backend="reference")  # (1, 2, 3, 16, 8)
    local = window_attention(x, loc.query.weight, loc.query.bias, loc.key.weight, None, loc.value.weight,
                             loc.value.bias, loc.proj.weight, loc.proj.bias, window_size=4, num_heads=2,
                             backend="reference")
    probs = torch.softmax(F.linear(windows.mean(-2), block.aggregate.score.weight, block.aggregate.score.bias), -1)
    tokens = (windows * probs.unsqueeze(-1)).sum(-2)
    ga = block.global_attention
    glob = gaussian_axial_from_qkv_reference(ga.query(tokens), ga.key(tokens), ga.value(tokens), ga.shift)
    glob = torch.nn.UpsamplingBilinear2d(scale_factor=4)(glob.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)[:, :5, :9]
    expected = F.linear(torch.cat((glob, local), dim=-1), block.fuse.weight, block.fuse.bias)
    torch.testing.assert_close(out, expected, **TIGHT)


def test_nn_external_attention_matches_meattention_without_its_dead_biases():
    ref = R.MEAttention(16, CFG).double()  # its query_liner / linear_0 biases are random and inert
    block = N.ExternalAttention(16, num_heads=8).double()
    _external_from_reference(block, ref)
    x = torch.randn(2, 3, 7, 16, **F64)  # any token layout: (B, ..., C)
    torch.testing.assert_close(block(x), ref(x.reshape(2, 21, 16)).view(2, 3, 7, 16), **TIGHT)


def test_nn_mixed_transformer_block_matches_eamodule():
    ref = R.EAmodule(16, CFG).double()
    with torch.no_grad():  # non-trivial LayerNorm affines; ElayerNorm.bias is inert
        for ln in (ref.SlayerNorm, ref.ElayerNorm):
            ln.weight.normal_(1.0, 0.2)
            ln.bias.normal_(0.0, 0.2)
    block = N.MixedTransformerBlock(16, num_heads=2, window_size=4).double()
    _local_global_from_reference(block.attention, ref.CSAttention)
    _external_from_reference(block.external, ref.EAttention)
    _copy_linear(block.norm_attention, ref.SlayerNorm)
    block.norm_external.weight.data.copy_(ref.ElayerNorm.weight.data)
    x = torch.randn(2, 6, 6, 16, **F64)
    torch.testing.assert_close(block(x), ref(x.reshape(2, 36, 16)).view(2, 6, 6, 16), **TIGHT)
    y = block(torch.randn(1, 5, 3, 16, **F64))  # H != W
    assert y.shape == (1, 5, 3, 16) and torch.isfinite(y).all()


def test_nn_window_attention_bad_heads():
    with pytest.raises(ValueError, match=r"WindowAttention: dim=10 must be divisible by num_heads=4"):
        N.WindowAttention(10, num_heads=4)


def test_nn_local_global_attention_bad_input():
    with pytest.raises(ValueError, match=r"LocalGlobalAttention: input must have shape \(B, H, W, C\) = \(\*, \*, \*, 8\), got \(2, 16, 8\)"):
        N.LocalGlobalAttention(8, num_heads=2)(torch.randn(2, 16, 8))


def test_nn_window_aggregation_bad_input():
    with pytest.raises(ValueError, match=r"WindowAggregation: input must have shape \(\.\.\., ws², C\) = \(\.\.\., 16, 8\), got \(1, 2, 2, 9, 8\)"):
        N.WindowAggregation(8)(torch.randn(1, 2, 2, 9, 8))


def test_nn_external_attention_bad_input():
    with pytest.raises(ValueError, match=r"ExternalAttention: input must have shape \(B, \.\.\., C\) = \(\*, \.\.\., 8\), got \(4, 8\)"):
        N.ExternalAttention(8, num_heads=4)(torch.randn(4, 8))


# ---------------------------------------------------------------------------------------------
# torch.compile: one graph, no recompile on new values
# ---------------------------------------------------------------------------------------------

def test_window_and_external_compile_fullgraph_once():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    wparams = window_params(8, 2, 4, 8, dtype=torch.float32)
    eparams = external_params(8, 2, 4, 6, 8, dtype=torch.float32)

    def both(x, tokens):
        return (MF.window_attention(x, *wparams, window_size=4, num_heads=2, pad_mode="mask"),
                MF.external_attention(tokens, *eparams, num_heads=2))

    compiled = torch.compile(both, fullgraph=True, backend=counter)
    for _ in range(2):
        x, tokens = torch.randn(1, 7, 7, 8), torch.randn(2, 9, 8)
        for got, want in zip(compiled(x, tokens), both(x, tokens)):
            torch.testing.assert_close(got, want)
    assert counter.frame_count == 1

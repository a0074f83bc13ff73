"""window_attention and external_attention (MT-UNet WinAttention / MEAttention): the torch backend
against the reference backend and the original modules, forward and every gradient, fp64."""
import math

import pytest
import torch
import torch.nn.functional as F

import medattn_fast.functional as MF
from medattn_fast.ops.external import external_attention
from medattn_fast.ops.window import window_attention
from medattn_fast.reference import mtunet as R

F64 = dict(dtype=torch.float64)
TIGHT = dict(rtol=1e-10, atol=1e-11)


def _grads(out, tensors, cotangent):
    grads = torch.autograd.grad(out, tensors, cotangent, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


# ---------------------------------------------------------------------------------------------
# window attention
# ---------------------------------------------------------------------------------------------

def _window_params(C, heads, head_dim, Co, *, biases=True, dtype=torch.float64):
    A = heads * head_dim

    def p(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    return [p(A, C), p(A) if biases else None, p(A, C), p(A) if biases else None, p(A, C),
            p(A) if biases else None, p(Co, A), p(Co) if biases else None]


WINDOW_CASES = [
    # B, H, W, C, heads, head_dim, Co, ws
    (2, 8, 8, 8, 2, 4, 8, 4),     # no padding
    (1, 7, 7, 6, 3, 2, 6, 4),     # MT-UNet's 7x7 bottleneck grid: pad 1
    (2, 5, 11, 4, 1, 4, 5, 4),    # primes, H != W, Co != C, one head
    (1, 3, 13, 5, 5, 1, 3, 3),    # head_dim 1, pad on one axis only... and a window of 3
    (1, 1, 2, 4, 2, 2, 4, 4),     # grid smaller than the pad: clamped corner
]


@pytest.mark.parametrize("pad_mode", ["mtunet", "mask"])
@pytest.mark.parametrize("B,H,W,C,heads,head_dim,Co,ws", WINDOW_CASES)
def test_window_torch_matches_reference_forward_and_grads(B, H, W, C, heads, head_dim, Co, ws, pad_mode):
    x = torch.randn(B, H, W, C, **F64, requires_grad=True)
    params = _window_params(C, heads, head_dim, Co)
    tensors = [x] + params
    kw = dict(window_size=ws, num_heads=heads, pad_mode=pad_mode, layout="padded")
    ref = window_attention(x, *params, backend="reference", **kw)
    out = window_attention(x, *params, backend="torch", **kw)
    torch.testing.assert_close(out, ref, **TIGHT)
    cot = torch.randn_like(ref)
    for g, gr in zip(_grads(out, tensors, cot), _grads(ref, tensors, cot)):
        torch.testing.assert_close(g, gr, **TIGHT)


@pytest.mark.parametrize("layout", ["grid", "padded", "windows"])
def test_window_layouts(layout):
    B, H, W, C, heads, ws = 2, 6, 9, 8, 2, 4
    x = torch.randn(B, H, W, C, **F64)
    params = _window_params(C, heads, 4, 8)
    windows = window_attention(x, *params, window_size=ws, num_heads=heads, layout="windows", backend="torch")
    out = window_attention(x, *params, window_size=ws, num_heads=heads, layout=layout, backend="torch")
    ref = window_attention(x, *params, window_size=ws, num_heads=heads, layout=layout, backend="reference")
    torch.testing.assert_close(out, ref, **TIGHT)
    grid = windows.view(B, 2, 3, ws, ws, 8).permute(0, 1, 3, 2, 4, 5).reshape(B, 8, 12, 8)
    expected = {"windows": windows, "padded": grid, "grid": grid[:, :H, :W]}[layout]
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_window_without_biases():
    x = torch.randn(1, 5, 6, 4, **F64, requires_grad=True)
    params = _window_params(4, 2, 2, 4, biases=False)
    kw = dict(window_size=4, num_heads=2, pad_mode="mask")
    ref = window_attention(x, *params, backend="reference", **kw)
    out = window_attention(x, *params, backend="torch", **kw)
    torch.testing.assert_close(out, ref, **TIGHT)
    weights = [x] + [p for p in params if p is not None]
    cot = torch.randn_like(ref)
    for g, gr in zip(_grads(out, weights, cot), _grads(ref, weights, cot)):
        torch.testing.assert_close(g, gr, **TIGHT)


@pytest.mark.parametrize("side", [8, 7, 6, 5, 1])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_window_mtunet_mode_equals_seed_module(side, backend):
    """pad_mode='mtunet', layout='windows' is the original WinAttention, padding quirk included."""
    torch.manual_seed(side)
    module = R.WinAttention({"win_size": 4, "head": 2}, 8).double()
    x = torch.randn(2, side * side, 8, **F64, requires_grad=True)
    ref = module(x)
    a = module.attention
    params = [a.query_layer.weight, a.query_layer.bias, a.key_layer.weight, a.key_layer.bias,
              a.value_layer.weight, a.value_layer.bias, a.out.weight, a.out.bias]
    out = window_attention(x.view(2, side, side, 8), *params, window_size=4, num_heads=2, pad_mode="mtunet",
                           layout="windows", backend=backend)
    torch.testing.assert_close(out, ref, **TIGHT)
    cot = torch.randn_like(ref)
    for g, gr in zip(_grads(out, [x] + params, cot), _grads(ref, [x] + params, cot)):
        torch.testing.assert_close(g, gr, **TIGHT)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_window_mask_mode_single_token_attends_to_itself(backend):
    """A 1×1 grid in a 4×4 window: with padded keys masked, the token only sees itself."""
    x = torch.randn(3, 1, 1, 6, **F64)
    params = _window_params(6, 2, 3, 5)
    out = window_attention(x, *params, window_size=4, num_heads=2, pad_mode="mask", backend=backend)
    expected = F.linear(F.linear(x, params[4], params[5]), params[6], params[7])
    torch.testing.assert_close(out, expected, **TIGHT)


def test_window_key_bias_has_no_effect():
    x = torch.randn(1, 7, 7, 8, **F64)
    params = _window_params(8, 2, 4, 8)
    out = window_attention(x, *params, window_size=4, num_heads=2, backend="torch")
    (g,) = torch.autograd.grad(out, params[3], torch.randn_like(out))
    assert g.abs().max() < 1e-12
    params[3] = torch.randn_like(params[3])
    torch.testing.assert_close(window_attention(x, *params, window_size=4, num_heads=2, backend="torch"), out,
                               **TIGHT)


def test_window_gradcheck_torch():
    x = torch.randn(1, 3, 5, 4, **F64, requires_grad=True)
    params = _window_params(4, 2, 2, 3)

    def fn(x, *params):
        return window_attention(x, *params, window_size=2, num_heads=2, pad_mode="mtunet", backend="torch")

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_window_functional_default_backend_and_low_precision():
    """MF.window_attention (auto) in bfloat16 vs fp64: at most 2x the reference's own bf16 error."""
    x = torch.randn(2, 7, 7, 16, **F64)
    params = [p.detach() for p in _window_params(16, 4, 4, 16)]
    kw = dict(window_size=4, num_heads=4)
    exact = window_attention(x, *params, backend="reference", **kw)
    lo = [t.to(torch.bfloat16) for t in [x] + params]
    out = MF.window_attention(*lo, **kw)
    assert out.dtype == torch.bfloat16
    own = (window_attention(*lo, backend="reference", **kw).double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= 2 * own + 1e-3


def _window_error(match, exc=ValueError, **overrides):
    args = dict(x=torch.randn(1, 5, 5, 8), qw=torch.randn(8, 8), qb=torch.randn(8), kw=torch.randn(8, 8),
                kb=torch.randn(8), vw=torch.randn(8, 8), vb=torch.randn(8), pw=torch.randn(6, 8), pb=torch.randn(6))
    kwargs = dict(window_size=4, num_heads=2, pad_mode="mtunet", layout="grid")
    for k, v in overrides.items():
        (args if k in args else kwargs)[k] = v
    with pytest.raises(exc, match=match):
        window_attention(*args.values(), **kwargs)


def test_window_bad_x_type():
    _window_error(r"window_attention: argument 'x' must be a torch.Tensor, got list", TypeError, x=[1.0])


def test_window_bad_x_rank():
    _window_error(r"argument 'x' must have 4 dimensions, got 3 \(shape \(1, 25, 8\)\)", x=torch.randn(1, 25, 8))


def test_window_bad_x_dtype():
    _window_error(r"argument 'x' must be float32, float16, bfloat16 or float64, got torch.int64", TypeError,
                  x=torch.ones(1, 5, 5, 8, dtype=torch.long))


def test_window_bad_x_empty():
    _window_error(r"argument 'x' must not have an empty dimension, got shape \(1, 0, 5, 8\)",
                  x=torch.randn(1, 0, 5, 8))


def test_window_bad_window_size():
    _window_error(r"argument 'window_size' must be a positive int, got 0", window_size=0)


def test_window_bad_num_heads():
    _window_error(r"argument 'num_heads' must be a positive int, got 2.0", num_heads=2.0)


def test_window_bad_pad_mode():
    _window_error(r"argument 'pad_mode' must be one of \('mtunet', 'mask'\), got 'reflect'", pad_mode="reflect")


def test_window_bad_layout():
    _window_error(r"argument 'layout' must be one of \('grid', 'padded', 'windows'\), got 'nchw'", layout="nchw")


def test_window_bad_query_weight_in_features():
    _window_error(r"argument 'query_weight' must have shape \(heads·d, C\) = \(\*, 8\), got \(8, 7\)",
                  qw=torch.randn(8, 7))


def test_window_bad_query_weight_heads():
    _window_error(r"argument 'query_weight' must have a first dim divisible by num_heads=3 .* got shape \(8, 8\)",
                  num_heads=3)


def test_window_bad_key_weight():
    _window_error(r"argument 'key_weight' must have shape \(heads·d, C\) = \(8, 8\), got \(6, 8\)",
                  kw=torch.randn(6, 8))


def test_window_bad_value_weight_rank():
    _window_error(r"argument 'value_weight' must have 2 dimensions, got 1", vw=torch.randn(8))


def test_window_bad_proj_weight():
    _window_error(r"argument 'proj_weight' must have shape \(Co, heads·d\) = \(\*, 8\), got \(6, 4\)",
                  pw=torch.randn(6, 4))


def test_window_bad_bias():
    _window_error(r"argument 'value_bias' must have shape \(8\), got \(4,\)", vb=torch.randn(4))


def test_window_bad_dtype_mix():
    _window_error(r"argument 'query_weight' has dtype torch.float64 but 'x' has torch.float32", TypeError,
                  qw=torch.randn(8, 8, **F64))


def test_window_bad_device_mix():
    _window_error(r"argument 'proj_bias' is on meta but 'x' is on cpu", pb=torch.empty(6, device="meta"))


# ---------------------------------------------------------------------------------------------
# external attention
# ---------------------------------------------------------------------------------------------

def _external_params(C, heads, head_dim, S, Co, dtype=torch.float64):
    A = heads * head_dim

    def p(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    return [p(A, C), p(A), p(S, head_dim), p(S), p(head_dim, S), p(head_dim), p(Co, A), p(Co)]


EXTERNAL_CASES = [
    # B, N, C, heads, head_dim, S, Co
    (2, 49, 8, 4, 4, 16, 8),
    (1, 13, 5, 3, 1, 7, 6),   # primes, head_dim 1
    (3, 1, 4, 1, 8, 64, 4),   # one token, one head, MT-UNet's S = 64
]


@pytest.mark.parametrize("B,N,C,heads,head_dim,S,Co", EXTERNAL_CASES)
def test_external_torch_matches_reference_forward_and_grads(B, N, C, heads, head_dim, S, Co):
    x = torch.randn(B, N, C, **F64, requires_grad=True)
    params = _external_params(C, heads, head_dim, S, Co)
    ref = external_attention(x, *params, num_heads=heads, backend="reference")
    out = external_attention(x, *params, num_heads=heads, backend="torch")
    torch.testing.assert_close(out, ref, **TIGHT)
    cot = torch.randn_like(ref)
    for g, gr in zip(_grads(out, [x] + params, cot), _grads(ref, [x] + params, cot)):
        torch.testing.assert_close(g, gr, **TIGHT)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_external_equals_seed_module(backend):
    module = R.MEAttention(16, {"head": 2}).double()  # 8 heads of width 8, S = 64
    x = torch.randn(2, 25, 16, **F64, requires_grad=True)
    ref = module(x)
    params = [module.query_liner.weight, module.query_liner.bias, module.linear_0.weight, module.linear_0.bias,
              module.linear_1.weight, module.linear_1.bias, module.proj.weight, module.proj.bias]
    out = external_attention(x, *params, num_heads=module.num_heads, backend=backend)
    torch.testing.assert_close(out, ref, **TIGHT)
    cot = torch.randn_like(ref)
    for g, gr in zip(_grads(out, [x] + params, cot), _grads(ref, [x] + params, cot)):
        torch.testing.assert_close(g, gr, **TIGHT)


def test_external_query_and_key_biases_have_no_effect():
    x = torch.randn(2, 9, 8, **F64)
    params = _external_params(8, 2, 4, 6, 8)
    out = external_attention(x, *params, num_heads=2, backend="torch")
    gq, gk = torch.autograd.grad(out, [params[1], params[3]], torch.randn_like(out))
    assert gq.abs().max() < 1e-12 and gk.abs().max() < 1e-12
    without = list(params)
    without[1] = without[3] = None
    torch.testing.assert_close(external_attention(x, *without, num_heads=2, backend="torch"), out, **TIGHT)
    torch.testing.assert_close(external_attention(x, *without, num_heads=2, backend="reference"), out, **TIGHT)


def test_external_gradcheck_torch():
    x = torch.randn(1, 5, 3, **F64, requires_grad=True)
    params = _external_params(3, 2, 2, 3, 2)
    assert torch.autograd.gradcheck(lambda x, *p: external_attention(x, *p, num_heads=2, backend="torch"),
                                    (x, *params))


def test_external_functional_default_backend_and_low_precision():
    x = torch.randn(2, 64, 16, **F64)
    params = [p.detach() for p in _external_params(16, 8, 8, 64, 16)]
    exact = external_attention(x, *params, num_heads=8, backend="reference")
    lo = [t.to(torch.bfloat16) for t in [x] + params]
    out = MF.external_attention(*lo, num_heads=8)
    assert out.dtype == torch.bfloat16
    own = (external_attention(*lo, num_heads=8, backend="reference").double() - exact).abs().max()
    assert (out.double() - exact).abs().max() <= 2 * own + 1e-3


def _external_error(match, exc=ValueError, num_heads=2, **overrides):
    args = dict(x=torch.randn(2, 9, 8), qw=torch.randn(8, 8), qb=torch.randn(8), mk=torch.randn(6, 4),
                kb=torch.randn(6), mv=torch.randn(4, 6), vb=torch.randn(4), pw=torch.randn(5, 8), pb=torch.randn(5))
    args.update(overrides)
    with pytest.raises(exc, match=match):
        external_attention(*args.values(), num_heads=num_heads)


def test_external_bad_x_type():
    _external_error(r"external_attention: argument 'x' must be a torch.Tensor, got ndarray", TypeError,
                    x=torch.randn(2, 9, 8).numpy())


def test_external_bad_x_rank():
    _external_error(r"external_attention: argument 'x' must have 3 dimensions, got 4", x=torch.randn(2, 3, 3, 8))


def test_external_bad_num_heads():
    _external_error(r"argument 'num_heads' must be a positive int, got -1", num_heads=-1)


def test_external_bad_query_weight():
    _external_error(r"argument 'query_weight' must have shape \(heads·d, C\) = \(\*, 8\), got \(8, 9\)",
                    qw=torch.randn(8, 9))


def test_external_bad_query_weight_heads():
    _external_error(r"argument 'query_weight' must have a first dim divisible by num_heads=3", num_heads=3)


def test_external_bad_key_memory():
    _external_error(r"argument 'key_memory' must have shape \(S, d\) = \(\*, 4\), got \(6, 3\)",
                    mk=torch.randn(6, 3))


def test_external_bad_value_memory():
    _external_error(r"argument 'value_memory' must have shape \(d, S\) = \(4, 6\), got \(4, 5\)",
                    mv=torch.randn(4, 5))


def test_external_bad_proj_weight():
    _external_error(r"argument 'proj_weight' must have shape \(Co, heads·d\) = \(\*, 8\), got \(5, 4\)",
                    pw=torch.randn(5, 4))


def test_external_bad_key_bias():
    _external_error(r"argument 'key_bias' must have shape \(6\), got \(4,\)", kb=torch.randn(4))


def test_external_bad_dtype_mix():
    _external_error(r"argument 'value_memory' has dtype torch.float16 but 'x' has torch.float32", TypeError,
                    mv=torch.randn(4, 6).half())


def test_external_bad_device_mix():
    _external_error(r"argument 'query_bias' is on meta but 'x' is on cpu", qb=torch.empty(8, device="meta"))


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
    for g, gr in zip(_grads(out, live, cot), _grads(ref, live, cot)):
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
    for g, gr in zip(_grads(out, live, cot), _grads(ref, live, cot)):
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
    wparams = _window_params(8, 2, 4, 8, dtype=torch.float32)
    eparams = _external_params(8, 2, 4, 6, 8, dtype=torch.float32)

    def both(x, tokens):
        return (MF.window_attention(x, *wparams, window_size=4, num_heads=2, pad_mode="mask"),
                MF.external_attention(tokens, *eparams, num_heads=2))

    compiled = torch.compile(both, fullgraph=True, backend=counter)
    for _ in range(2):
        x, tokens = torch.randn(1, 7, 7, 8), torch.randn(2, 9, 8)
        for got, want in zip(compiled(x, tokens), both(x, tokens)):
            torch.testing.assert_close(got, want)
    assert counter.frame_count == 1

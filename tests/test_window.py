"""window_attention (MT-UNet's WinAttention): the reference and torch backends against the original
module and each other, forward and every gradient in float64, both pad modes, the layouts, bad input.
The triton backend: test_window_triton.py."""

import pytest
import torch
import torch.nn.functional as F

import medattn_fast.functional as MF
from medattn_fast.ops.window import window_attention
from medattn_fast.reference import mtunet as R

from _helpers import grads_or_zeros, window_params

F64 = dict(dtype=torch.float64)
TIGHT = dict(rtol=1e-10, atol=1e-11)


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
    params = window_params(C, heads, head_dim, Co)
    tensors = [x] + params
    kw = dict(window_size=ws, num_heads=heads, pad_mode=pad_mode, layout="padded")
    ref = window_attention(x, *params, backend="reference", **kw)
    out = window_attention(x, *params, backend="torch", **kw)
    torch.testing.assert_close(out, ref, **TIGHT)
    cot = torch.randn_like(ref)
    for g, gr in zip(grads_or_zeros(out, tensors, cot), grads_or_zeros(ref, tensors, cot)):
        torch.testing.assert_close(g, gr, **TIGHT)


@pytest.mark.parametrize("layout", ["grid", "padded", "windows"])
def test_window_layouts(layout):
    B, H, W, C, heads, ws = 2, 6, 9, 8, 2, 4
    x = torch.randn(B, H, W, C, **F64)
    params = window_params(C, heads, 4, 8)
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
    params = window_params(4, 2, 2, 4, biases=False)
    kw = dict(window_size=4, num_heads=2, pad_mode="mask")
    ref = window_attention(x, *params, backend="reference", **kw)
    out = window_attention(x, *params, backend="torch", **kw)
    torch.testing.assert_close(out, ref, **TIGHT)
    weights = [x] + [p for p in params if p is not None]
    cot = torch.randn_like(ref)
    for g, gr in zip(grads_or_zeros(out, weights, cot), grads_or_zeros(ref, weights, cot)):
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
    for g, gr in zip(grads_or_zeros(out, [x] + params, cot), grads_or_zeros(ref, [x] + params, cot)):
        torch.testing.assert_close(g, gr, **TIGHT)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_window_mask_mode_single_token_attends_to_itself(backend):
    """A 1×1 grid in a 4×4 window: with padded keys masked, the token only sees itself."""
    x = torch.randn(3, 1, 1, 6, **F64)
    params = window_params(6, 2, 3, 5)
    out = window_attention(x, *params, window_size=4, num_heads=2, pad_mode="mask", backend=backend)
    expected = F.linear(F.linear(x, params[4], params[5]), params[6], params[7])
    torch.testing.assert_close(out, expected, **TIGHT)


def test_window_key_bias_has_no_effect():
    x = torch.randn(1, 7, 7, 8, **F64)
    params = window_params(8, 2, 4, 8)
    out = window_attention(x, *params, window_size=4, num_heads=2, backend="torch")
    (g,) = torch.autograd.grad(out, params[3], torch.randn_like(out))
    assert g.abs().max() < 1e-12
    params[3] = torch.randn_like(params[3])
    torch.testing.assert_close(window_attention(x, *params, window_size=4, num_heads=2, backend="torch"), out,
                               **TIGHT)


def test_window_gradcheck_torch():
    x = torch.randn(1, 3, 5, 4, **F64, requires_grad=True)
    params = window_params(4, 2, 2, 3)

    def fn(x, *params):
        return window_attention(x, *params, window_size=2, num_heads=2, pad_mode="mtunet", backend="torch")

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_window_functional_default_backend_and_low_precision():
    """MF.window_attention (auto) in bfloat16 vs fp64: at most 2x the reference's own bf16 error."""
    x = torch.randn(2, 7, 7, 16, **F64)
    params = [p.detach() for p in window_params(16, 4, 4, 16)]
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

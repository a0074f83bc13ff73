"""external_attention (MT-UNet's MEAttention): the reference and torch backends against the original
module and each other, forward and every gradient in float64, bad input. The triton backend:
test_external_triton.py."""

import pytest
import torch

import medattn_fast.functional as MF
from medattn_fast.ops.external import external_attention
from medattn_fast.reference import mtunet as R

from _helpers import external_params, grads_or_zeros

F64 = dict(dtype=torch.float64)
TIGHT = dict(rtol=1e-10, atol=1e-11)


EXTERNAL_CASES = [
    # B, N, C, heads, head_dim, S, Co
    (2, 49, 8, 4, 4, 16, 8),
    (1, 13, 5, 3, 1, 7, 6),   # primes, head_dim 1
    (3, 1, 4, 1, 8, 64, 4),   # one token, one head, MT-UNet's S = 64
]


@pytest.mark.parametrize("B,N,C,heads,head_dim,S,Co", EXTERNAL_CASES)
def test_external_torch_matches_reference_forward_and_grads(B, N, C, heads, head_dim, S, Co):
    x = torch.randn(B, N, C, **F64, requires_grad=True)
    params = external_params(C, heads, head_dim, S, Co)
    ref = external_attention(x, *params, num_heads=heads, backend="reference")
    out = external_attention(x, *params, num_heads=heads, backend="torch")
    torch.testing.assert_close(out, ref, **TIGHT)
    cot = torch.randn_like(ref)
    for g, gr in zip(grads_or_zeros(out, [x] + params, cot), grads_or_zeros(ref, [x] + params, cot)):
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
    for g, gr in zip(grads_or_zeros(out, [x] + params, cot), grads_or_zeros(ref, [x] + params, cot)):
        torch.testing.assert_close(g, gr, **TIGHT)


def test_external_query_and_key_biases_have_no_effect():
    x = torch.randn(2, 9, 8, **F64)
    params = external_params(8, 2, 4, 6, 8)
    out = external_attention(x, *params, num_heads=2, backend="torch")
    gq, gk = torch.autograd.grad(out, [params[1], params[3]], torch.randn_like(out))
    assert gq.abs().max() < 1e-12 and gk.abs().max() < 1e-12
    without = list(params)
    without[1] = without[3] = None
    torch.testing.assert_close(external_attention(x, *without, num_heads=2, backend="torch"), out, **TIGHT)
    torch.testing.assert_close(external_attention(x, *without, num_heads=2, backend="reference"), out, **TIGHT)


def test_external_gradcheck_torch():
    x = torch.randn(1, 5, 3, **F64, requires_grad=True)
    params = external_params(3, 2, 2, 3, 2)
    assert torch.autograd.gradcheck(lambda x, *p: external_attention(x, *p, num_heads=2, backend="torch"),
                                    (x, *params))


def test_external_functional_default_backend_and_low_precision():
    x = torch.randn(2, 64, 16, **F64)
    params = [p.detach() for p in external_params(16, 8, 8, 64, 16)]
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

"""AMP autocast reaches every op only at its entry: float32 tensor arguments are cast to the
autocast dtype and the backend then runs with autocast OFF (its own float32 accumulation intact).

So under ``torch.autocast("cpu", bfloat16)`` an op on float32 inputs must give *exactly* the result,
and the float32 leaves exactly the gradients, of the same op called without autocast on the inputs
cast to bfloat16 — on every backend. An op body that ran under autocast (its float32 matmuls
silently turned bf16, inside the torch composite or a C++ kernel's ATen calls) changes the bits and
fails; the loose tolerance of an accuracy test would not notice. The attention gate keeps float32
parameters (``cast=False``): float32 inputs under autocast give exactly the float32 result.
"""
import pytest
import torch

import medattn_fast.functional as MF

BF16 = torch.bfloat16


def _position(q, k, v, gamma, residual, *, backend):
    return MF.position_attention(q, k, v, scale=0.7, gamma=gamma, residual=residual, backend=backend)


def _channel(x, gamma, residual, *, backend):
    # (a residual leaf of its own: x used twice would sum its two gradients in bf16 in one call and
    # in float32 in the other, a difference of the test's making)
    return MF.channel_attention(x, gamma=gamma, residual=residual, backend=backend)


def _axial_qkv(q, k, v, shift, *, backend):
    return MF.gaussian_axial_attention(q, k, v, shift, backend=backend)


def _axial_scores(atten_x, atten_y, v, shift, *, backend):
    return MF.gaussian_axial_from_scores(atten_x, atten_y, v, shift, backend=backend)


def _window(x, w_q, b_q, w_k, w_v, b_v, w_o, b_o, *, backend):
    return MF.window_attention(x, w_q, b_q, w_k, None, w_v, b_v, w_o, b_o, window_size=2, num_heads=2,
                               backend=backend)


def _external(x, w_q, m_k, m_v, b_v, w_o, b_o, *, backend):
    return MF.external_attention(x, w_q, None, m_k, None, m_v, b_v, w_o, b_o, num_heads=2, backend=backend)


def _inputs(family):
    r = torch.randn
    return {
        "position": lambda: [r(2, 13, 4), r(2, 11, 4), r(2, 11, 6), r(1), r(2, 13, 6)],
        "channel": lambda: [0.5 * r(2, 6, 5, 3), r(1), r(2, 6, 5, 3)],
        "axial_qkv": lambda: [r(2, 4, 5, 6), r(2, 4, 5, 6), r(2, 4, 5, 6), torch.tensor([0.3])],
        "axial_scores": lambda: [r(2, 4, 5, 5), r(2, 5, 4, 4), r(2, 4, 5, 6), torch.tensor([0.3])],
        "window": lambda: [r(2, 3, 5, 6), r(8, 6), r(8), r(8, 6), r(8, 6), r(8), r(5, 8), r(5)],
        "external": lambda: [r(2, 9, 6), r(8, 6), r(5, 4), r(4, 5), r(4), r(7, 8), r(7)],
    }[family]()


FNS = {"position": _position, "channel": _channel, "axial_qkv": _axial_qkv, "axial_scores": _axial_scores,
       "window": _window, "external": _external}
CASES = [("position", "torch"), ("position", "cpp"), ("position", "triton"),
         ("channel", "torch"), ("channel", "cpp"), ("channel", "triton"),
         ("axial_qkv", "torch"), ("axial_qkv", "cpp"), ("axial_scores", "torch"), ("axial_scores", "cpp"),
         ("window", "torch"), ("external", "torch")]


@pytest.mark.parametrize("family,backend", CASES, ids=["-".join(c) for c in CASES])
def test_op_under_autocast_is_the_op_on_cast_inputs_bit_for_bit(family, backend):
    fn = FNS[family]
    leaves = [t.requires_grad_(True) for t in _inputs(family)]
    with torch.autocast("cpu", dtype=BF16):
        out = fn(*leaves, backend=backend)
    assert out.dtype == BF16
    cot = torch.randn(out.shape).to(BF16)
    grads = torch.autograd.grad(out, leaves, cot, allow_unused=True)
    expected = fn(*[t.to(BF16) for t in leaves], backend=backend)
    expected_grads = torch.autograd.grad(expected, leaves, cot, allow_unused=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        if e is None:
            assert g is None or not g.any(), f"grad {i}"
            continue
        assert g.dtype == torch.float32, f"grad {i} dtype {g.dtype}"
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda m: f"grad {i}: {m}")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gate_under_autocast_on_float32_inputs_is_the_float32_gate(backend):
    """The gate is exempt from the cast (float32 parameters and BatchNorm state): float32 features
    under autocast give the float32 result, bit for bit, and float32 gradients."""
    r = torch.randn
    leaves = [r(2, 8, 6, 7), r(2, 6, 3, 4), r(4, 8), r(4), r(4, 6), r(4), r(1, 4), r(1)]
    leaves = [t.requires_grad_(True) for t in leaves]

    def gate(*t):
        return MF.attention_gate(*t, backend=backend)

    with torch.autocast("cpu", dtype=BF16):
        out = gate(*leaves)
    assert out.dtype == torch.float32
    cot = torch.randn(out.shape)
    grads = torch.autograd.grad(out, leaves, cot)
    expected = gate(*leaves)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for i, (g, e) in enumerate(zip(grads, torch.autograd.grad(expected, leaves, cot))):
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda m: f"grad {i}: {m}")

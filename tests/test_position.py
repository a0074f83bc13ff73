"""Position attention: the torch backend against the materialising reference,
forward and every gradient, odd shapes, both layouts, the transpose variant, epilogues, low
precision, memory (no N×N tensor in forward or backward), bad inputs; nn modules and CrossAttentionUNet's blocks."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import medattn_fast
import medattn_fast.functional as MF
from medattn_fast.nn import attention as nn_attention
from medattn_fast.ops.position import default_chunk_size, position_attention
from medattn_fast.reference import cross_attention as ref_cross
from medattn_fast.reference import danet as ref_danet

from _position_inputs import SHAPES, position_inputs as _inputs, grads as _grads

F64 = torch.float64


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("layout", ["tokens", "channels"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Nq{}_Nk{}_dk{}_dv{}_c{}".format(*s))
def test_torch_matches_reference_fp64(shape, layout, transpose):
    batch, nq, nk, dk, dv, chunk = shape
    q, k, v = _inputs(batch, nq, nk, dk, dv, transpose=transpose, layout=layout, strided=layout == "channels")
    ref = position_attention(q, k, v, scale=0.8, transpose=transpose, layout=layout, backend="reference")
    out = position_attention(q, k, v, scale=0.8, transpose=transpose, layout=layout, chunk_size=chunk,
                             backend="torch")
    assert out.shape == ref.shape and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    for g, g_ref in zip(_grads(out, (q, k, v), cot), _grads(ref, (q, k, v), cot)):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("transpose", [False, True])
def test_epilogue_gamma_residual_multiply_and_their_grads(transpose):
    q, k, v = _inputs(2, 11, 11, 3, 6, transpose=transpose, layout="channels")
    gamma = torch.randn(1, dtype=F64, requires_grad=True)
    residual = torch.randn(2, 6, 11, dtype=F64, requires_grad=True)
    multiply = torch.randn(2, 6, 11, dtype=F64, requires_grad=True)
    leaves = (q, k, v, gamma, residual, multiply)
    kw = dict(transpose=transpose, layout="channels", gamma=gamma, residual=residual, multiply=multiply)
    ref = position_attention(q, k, v, backend="reference", **kw)
    out = position_attention(q, k, v, backend="torch", chunk_size=3, **kw)
    # the contract, spelled out on the reference: γ · (o ⊙ f) + x
    plain = position_attention(q, k, v, transpose=transpose, layout="channels", backend="reference")
    torch.testing.assert_close(ref, gamma * (plain * multiply) + residual)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    for g, g_ref in zip(_grads(out, leaves, cot), _grads(ref, leaves, cot)):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


def test_channels_layout_equals_tokens_layout_and_output_is_channel_first():
    q, k, v = _inputs(2, 10, 7, 2, 5, layout="channels")
    out = position_attention(q, k, v, layout="channels", backend="torch")
    tokens = position_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="torch")
    torch.testing.assert_close(out, tokens.transpose(1, 2), rtol=0, atol=0)
    assert out.shape == (2, 5, 10) and out.is_contiguous()  # written channel-first, not permuted after


def test_functional_surface_and_scale():
    q, k, v = _inputs(2, 8, 8, 4, 4)
    torch.testing.assert_close(MF.position_attention(q, k, v, scale=0.5),
                               torch.softmax(0.5 * q @ k.transpose(1, 2), -1) @ v)
    torch.testing.assert_close(MF.position_attention(q, k, v, transpose=True),
                               torch.softmax(q @ k.transpose(1, 2), -1).transpose(1, 2) @ v)


@pytest.mark.parametrize("transpose", [False, True])
def test_gradcheck_fp64_tiny(transpose):
    q, k, v = _inputs(2, 5, 5 if transpose else 4, 3, 2, transpose=transpose)
    gamma = torch.randn(1, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, g: position_attention(q, k, v, scale=0.9, transpose=transpose, gamma=g,
                                              chunk_size=2, backend="torch"),
        (q, k, v, gamma))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
def test_low_precision_error_within_twice_pytorchs_own(dtype, transpose):
    q, k, v = (t.detach().to(dtype) for t in _inputs(2, 40, 40, 8, 16, transpose=transpose))
    exact = position_attention(q.double(), k.double(), v.double(), transpose=transpose, backend="reference")
    own = position_attention(q, k, v, transpose=transpose, backend="reference")  # PyTorch in that dtype
    ours = position_attention(q, k, v, transpose=transpose, backend="torch", chunk_size=16)
    assert ours.dtype == dtype
    own_err = (own.double() - exact).abs().max().item()
    ours_err = (ours.double() - exact).abs().max().item()
    assert ours_err <= 2 * own_err + 1e-6, (ours_err, own_err)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor produced by any op while active (forward or backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("transpose", [False, True])
def test_torch_backend_never_allocates_n_squared(transpose):
    n, chunk = 3000, 64                     # N² = 9e6 elements (72 MB in float64); a chunk is 192k
    q, k, v = _inputs(1, n, n, 4, 8, transpose=transpose, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with _LargestTensor() as forward:
            out = position_attention(q, k, v, transpose=transpose, chunk_size=chunk, backend="torch")
    with _LargestTensor() as backward:
        out.backward(torch.randn_like(out))
    assert max(saved) <= n * 8                       # q, k, v, out and the (B, N) row statistics
    assert forward.largest <= chunk * n
    assert backward.largest <= chunk * n
    # the reference does materialise it (the test would catch a regression to that)
    with _LargestTensor() as ref:
        position_attention(q, k, v, transpose=transpose, backend="reference")
    assert ref.largest >= n * n


def test_default_chunk_size_bounds_the_score_block():
    assert default_chunk_size(2, 9216, 9216) * 2 * 9216 <= (1 << 22)
    assert default_chunk_size(1, 5, 5) == 5
    assert default_chunk_size(64, 100000, 100000) == 16


# ------------------------------------------------------------------------------------------------
# bad inputs: one test per error path, before any compute
# ------------------------------------------------------------------------------------------------
def _qkv(batch=2, nq=5, nk=6, dk=3, dv=4):
    return torch.randn(batch, nq, dk), torch.randn(batch, nk, dk), torch.randn(batch, nk, dv)


def test_error_wrong_rank():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"argument 'q' must have 3 dimensions, got 4"):
        position_attention(q[None], k, v)


def test_error_mismatched_key_width():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"argument 'k' must have shape \(B, Nk, dk\) = \(2, \*, 3\), got \(2, 6, 2\)"):
        position_attention(q, k[..., :2], v)


def test_error_value_rows_differ_from_keys():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"argument 'v' must have shape \(B, Nk, dv\) = \(2, 6, \*\), got \(2, 5, 4\)"):
        position_attention(q, k, v[:, :5])


def test_error_transpose_value_rows_differ_from_queries():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"argument 'v' must have shape \(B, Nq, dv\) = \(2, 5, \*\), got \(2, 6, 4\)"):
        position_attention(q, k, v, transpose=True)


def test_error_batch_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"argument 'k' must have shape \(B, Nk, dk\) = \(2, \*, 3\), got \(3, 6, 3\)"):
        position_attention(q, torch.randn(3, 6, 3), v)


def test_error_channels_layout_mismatch():
    q = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"argument 'k' must have shape \(B, dk, Nk\) = \(2, 3, \*\), got \(2, 6, 3\)"):
        position_attention(q, torch.randn(2, 6, 3), torch.randn(2, 4, 3), layout="channels")


def test_error_int_dtype():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"argument 'q' must be float32, float16, bfloat16 or float64, got torch.int64"):
        position_attention(q.long(), k, v)


def test_error_dtype_mix():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"argument 'v' has dtype torch.float64 but 'q' has torch.float32"):
        position_attention(q, k, v.double())


def test_error_empty_token_dim():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"argument 'k' must not have an empty dimension, got shape \(2, 0, 3\)"):
        position_attention(q, k[:, :0], v[:, :0])


def test_error_empty_value_dim():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"argument 'v' must not have an empty dimension, got shape \(2, 6, 0\)"):
        position_attention(q, k, v[..., :0])


def test_error_bad_layout():
    with pytest.raises(ValueError, match=r"argument 'layout' must be one of \('tokens', 'channels'\), got 'nchw'"):
        position_attention(*_qkv(), layout="nchw")


def test_error_bad_chunk_size():
    with pytest.raises(ValueError, match=r"argument 'chunk_size' must be a positive int or None, got 0"):
        position_attention(*_qkv(), chunk_size=0)


def test_error_bad_scale():
    with pytest.raises(TypeError, match=r"argument 'scale' must be a real number, got str"):
        position_attention(*_qkv(), scale="1")


def test_error_residual_shape():
    with pytest.raises(ValueError, match=r"argument 'residual' must have shape \(B, Nq, dv\) = \(2, 5, 4\), got \(2, 6, 4\)"):
        position_attention(*_qkv(), residual=torch.randn(2, 6, 4))


def test_error_multiply_shape():
    with pytest.raises(ValueError, match=r"argument 'multiply' must have shape \(B, Nq, dv\) = \(2, 5, 4\), got \(2, 5, 3\)"):
        position_attention(*_qkv(), multiply=torch.randn(2, 5, 3))


def test_error_gamma_shape():
    with pytest.raises(ValueError, match=r"argument 'gamma' must be a 0-dim or shape-\(1,\) tensor, got shape \(2,\)"):
        position_attention(*_qkv(), gamma=torch.ones(2))


def test_error_forced_backend_unavailable():
    with pytest.raises(medattn_fast.BackendUnavailable, match=r"position_attention: backend 'cuda' cannot run"):
        position_attention(*_qkv(), backend="cuda")


# ------------------------------------------------------------------------------------------------
# nn modules
# ------------------------------------------------------------------------------------------------
def _load_pam_into_nn(reference: ref_danet.PAM_Module, module: nn_attention.PositionAttention):
    with torch.no_grad():
        for ours, theirs in ((module.query, reference.query_conv), (module.key, reference.key_conv),
                             (module.value, reference.value_conv)):
            ours.weight.copy_(theirs.weight.flatten(1))
            ours.bias.copy_(theirs.bias)
        module.gamma.copy_(reference.gamma)


def test_nn_position_attention_matches_danet_pam_forward_and_grads():
    reference = ref_danet.PAM_Module(16).double()
    with torch.no_grad():
        reference.gamma.fill_(0.6)
    module = nn_attention.PositionAttention(16, chunk_size=7).double()
    _load_pam_into_nn(reference, module)
    x = torch.randn(2, 16, 5, 7, dtype=F64, requires_grad=True)
    ref, out = reference(x), module(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    g_ref = _grads(ref, (x, reference.gamma, reference.query_conv.weight, reference.key_conv.bias,
                         reference.value_conv.weight), cot)
    g = _grads(out, (x, module.gamma, module.query.weight, module.key.bias, module.value.weight), cot)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b.reshape(a.shape), rtol=1e-11, atol=1e-11)


def test_nn_position_attention_3d():
    module = nn_attention.PositionAttention(8).double()   # C/8 = 1
    with torch.no_grad():
        module.gamma.fill_(1.3)
    x = torch.randn(2, 8, 3, 4, 5, dtype=F64, requires_grad=True)
    out = module(x)
    xf = x.flatten(2)
    q, k, v = (torch.matmul(p.weight, xf) + p.bias[:, None] for p in (module.query, module.key, module.value))
    expected = 1.3 * (v @ torch.softmax(q.transpose(1, 2) @ k, -1).transpose(1, 2)) + xf
    torch.testing.assert_close(out, expected.reshape(x.shape), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: module(t), (x[:1, :, :2, :2, :3].detach().requires_grad_(),))


def test_nn_position_attention_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"PositionAttention: input must have 16 channels \(dim 1\), got shape \(1, 8, 4, 4\)"):
        nn_attention.PositionAttention(16)(torch.randn(1, 8, 4, 4))


@pytest.mark.parametrize("spatial", [(5, 7), (2, 3, 5)], ids=["2d", "3d"])
def test_seed004_self_attention_layer_matches_reference(spatial):
    reference = ref_cross.SelfAttentionLayer(12, heads=3).double()
    fast = nn_attention.SelfAttentionLayer(12, heads=3, chunk_size=8).double()
    fast.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 12, *spatial, dtype=F64, requires_grad=True)
    ref, out = reference(x), fast(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    leaves_ref = (x, *reference.parameters())
    leaves = (x, *fast.parameters())
    for a, b in zip(_grads(out, leaves, cot), _grads(ref, leaves_ref, cot)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_seed004_skip_cross_attention_layer_matches_reference_nq_ne_nk():
    reference = ref_cross.SkipCrossAttentionLayer(8, 6, heads=2).double()
    fast = nn_attention.SkipCrossAttentionLayer(8, 6, heads=2, chunk_size=5).double()
    fast.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 8, 3, 5, dtype=F64, requires_grad=True)        # Nq = 15
    skip = torch.randn(1, 6, 6, 7, dtype=F64, requires_grad=True)     # Nk = 42
    ref, out = reference(x, skip), fast(x, skip)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    for a, b in zip(_grads(out, (x, skip, *fast.parameters()), cot),
                    _grads(ref, (x, skip, *reference.parameters()), cot)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_seed004_se_channel_attention_matches_reference():
    reference = ref_cross.SEChannelAttention(20, reduction=16).double()   # hidden = 1
    fast = nn_attention.SEChannelAttention(20, reduction=16).double()
    fast.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 20, 3, 4, 5, dtype=F64, requires_grad=True)
    ref, out = reference(x), fast(x)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    cot = torch.randn_like(ref)
    for a, b in zip(_grads(out, (x, *fast.parameters()), cot), _grads(ref, (x, *reference.parameters()), cot)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the reference math, written out: x · σ(W2 relu(W1 mean(x) + b1) + b2)
    s = x.mean((2, 3, 4))
    gate = torch.sigmoid(reference.fc2(torch.relu(reference.fc1(s))))
    torch.testing.assert_close(ref, x * gate[:, :, None, None, None])


def test_seed004_reference_attention_is_plain_softmax():
    layer = ref_cross.SelfAttentionLayer(4, heads=1).double()
    x = torch.randn(1, 4, 3, 3, dtype=F64)
    t = x.flatten(2).transpose(1, 2)
    h = layer.norm(t)
    a = torch.softmax(layer.to_q(h) @ layer.to_k(h).transpose(1, 2) / math.sqrt(4), -1)
    expected = (t + layer.proj(a @ layer.to_v(h))).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(layer(x), expected)


def test_seed004_bad_heads():
    with pytest.raises(ValueError, match=r"heads must be a positive divisor of the channels \(10\), got 4"):
        nn_attention.SelfAttentionLayer(10, heads=4)
    with pytest.raises(ValueError, match=r"heads must be a positive divisor of the channels \(10\), got 3"):
        ref_cross.SkipCrossAttentionLayer(10, 4, heads=3)


def test_seed004_skip_batch_mismatch():
    layer = nn_attention.SkipCrossAttentionLayer(4, 4, heads=2)
    with pytest.raises(ValueError, match=r"skip must have batch 2 like x, got shape \(3, 4, 2, 2\)"):
        layer(torch.randn(2, 4, 2, 2), torch.randn(3, 4, 2, 2))

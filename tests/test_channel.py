"""Channel attention: torch backend vs the original's arithmetic, forward and
every gradient, both signs, epilogues, 1-3 spatial dims, float16 overflow, bad inputs; nn module."""
import pytest
import torch

import medattn_fast.functional as MF
from medattn_fast.nn import attention as nn_attention
from medattn_fast.ops.channel import channel_attention
from medattn_fast.reference import danet as ref_danet

F64 = torch.float64


def _grads(out, tensors, cotangent):
    return torch.autograd.grad(out, tensors, cotangent)


@pytest.mark.parametrize("negate", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 7, 5, 3), (3, 5, 13), (1, 6, 2, 3, 5)],
                         ids=["C1_N1", "2d_prime", "1d", "3d"])
def test_torch_matches_reference_fp64(shape, negate):
    x = (0.5 * torch.randn(shape, dtype=F64)).requires_grad_(True)
    gamma = torch.randn(1, dtype=F64, requires_grad=True)
    residual = torch.randn(shape, dtype=F64, requires_grad=True)
    ref = channel_attention(x, negate=negate, gamma=gamma, residual=residual, backend="reference")
    out = channel_attention(x, negate=negate, gamma=gamma, residual=residual, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    for g, g_ref in zip(_grads(out, (x, gamma, residual), cot), _grads(ref, (x, gamma, residual), cot)):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


def test_multiply_epilogue_and_non_contiguous_input():
    base = torch.randn(2, 9, 6, 10, dtype=F64)
    x = base.permute(0, 3, 1, 2)[:, ::2].detach().requires_grad_(True)   # (2, 5, 9, 6), strided
    assert not x.is_contiguous()
    ref = channel_attention(x, negate=False, multiply=x, backend="reference")
    out = channel_attention(x, negate=False, multiply=x, backend="torch")
    feats = x.reshape(2, 5, -1)
    expected = (torch.softmax(feats @ feats.transpose(1, 2), -1) @ feats).reshape(x.shape) * x
    torch.testing.assert_close(ref, expected)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    torch.testing.assert_close(_grads(out, (x,), cot)[0], _grads(ref, (x,), cot)[0], rtol=1e-11, atol=1e-11)


def test_negate_is_softmax_of_rowmax_minus_energy():
    x = torch.randn(2, 6, 4, 4, dtype=F64)
    feats = x.reshape(2, 6, -1)
    energy = feats @ feats.transpose(1, 2)
    danet = torch.softmax(energy.amax(-1, keepdim=True) - energy, -1) @ feats
    torch.testing.assert_close(MF.channel_attention(x), danet.reshape(x.shape), rtol=1e-13, atol=1e-13)


def test_gradcheck_fp64_tiny():
    x = torch.randn(2, 3, 2, 3, dtype=F64, requires_grad=True)
    gamma = torch.randn(1, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, g: channel_attention(x, gamma=g, residual=x, multiply=x, backend="torch"), (x, gamma))


def test_float16_original_overflows_to_nan():
    """Documents the quirk the fast path fixes: the original forms E in float16."""
    x = (10 * torch.randn(1, 4, 32, 32)).half()           # E diagonal ≈ 100 · 1024 > 65504
    original = ref_danet.CAM_Module(4).half()
    assert not torch.isfinite(original(x)).all()
    assert torch.isfinite(channel_attention(x, gamma=torch.ones(1, dtype=torch.half), residual=x)).all()


@pytest.mark.parametrize("negate", [True, False])
def test_float16_c512_96x96_is_finite_and_accurate(negate):
    x = (3 * torch.randn(1, 512, 96, 96)).half()
    out = channel_attention(x, negate=negate, backend="torch")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    exact = channel_attention(x.double(), negate=negate, backend="torch")
    # the fp16 rounding of the result (|o| ≲ 15: ulp/2 ≤ 2^-8) plus float32 accumulation
    torch.testing.assert_close(out.double(), exact, rtol=2e-3, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_error_within_twice_pytorchs_own(dtype):
    x = torch.randn(2, 16, 9, 7).to(dtype)
    exact = channel_attention(x.double(), backend="reference")
    own = channel_attention(x, backend="reference")
    ours = channel_attention(x, backend="torch")
    assert ours.dtype == dtype
    own_err = (own.double() - exact).abs().max().item()
    ours_err = (ours.double() - exact).abs().max().item()
    assert ours_err <= 2 * own_err + 1e-6, (ours_err, own_err)


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------
def test_error_wrong_rank():
    with pytest.raises(ValueError, match=r"channel_attention: argument 'x' must have 3 or 4 or 5 dimensions, got 2"):
        channel_attention(torch.randn(3, 4))


def test_error_int_dtype():
    with pytest.raises(TypeError, match=r"argument 'x' must be float32, float16, bfloat16 or float64, got torch.int32"):
        channel_attention(torch.ones(1, 2, 3, 3, dtype=torch.int32))


def test_error_empty_dim():
    with pytest.raises(ValueError, match=r"argument 'x' must not have an empty dimension, got shape \(2, 3, 0, 4\)"):
        channel_attention(torch.randn(2, 3, 0, 4))


def test_error_residual_shape():
    with pytest.raises(ValueError, match=r"argument 'residual' must have shape x.shape = \(2, 3, 4, 4\), got \(2, 3, 4, 5\)"):
        channel_attention(torch.randn(2, 3, 4, 4), residual=torch.randn(2, 3, 4, 5))


def test_error_multiply_batch_mismatch():
    with pytest.raises(ValueError, match=r"argument 'multiply' must have shape x.shape = \(2, 3, 4, 4\), got \(1, 3, 4, 4\)"):
        channel_attention(torch.randn(2, 3, 4, 4), multiply=torch.randn(1, 3, 4, 4))


def test_error_residual_dtype():
    with pytest.raises(TypeError, match=r"argument 'residual' has dtype torch.float64 but 'x' has torch.float32"):
        channel_attention(torch.randn(2, 3, 4, 4), residual=torch.randn(2, 3, 4, 4, dtype=F64))


def test_error_gamma_not_tensor():
    with pytest.raises(TypeError, match=r"argument 'gamma' must be a 0-dim or shape-\(1,\) tensor, got float"):
        channel_attention(torch.randn(2, 3, 4, 4), gamma=0.5)


def test_error_negate_not_bool():
    with pytest.raises(ValueError, match=r"argument 'negate' must be one of \(True, False\), got 'yes'"):
        channel_attention(torch.randn(2, 3, 4, 4), negate="yes")


# ------------------------------------------------------------------------------------------------
# nn module
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)], ids=["2d", "3d"])
def test_nn_channel_attention(spatial):
    module = nn_attention.ChannelAttention().double()
    with torch.no_grad():
        module.gamma.fill_(0.4)
    x = torch.randn(2, 6, *spatial, dtype=F64, requires_grad=True)
    out = module(x)
    expected = channel_attention(x, gamma=module.gamma, residual=x, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if len(spatial) == 2:   # against DANet's CAM_Module itself
        original = ref_danet.CAM_Module(6).double()
        original.load_state_dict(module.state_dict(), strict=True)
        torch.testing.assert_close(out, original(x), rtol=1e-12, atol=1e-12)
        cot = torch.randn_like(out)
        for a, b in zip(_grads(out, (x, module.gamma), cot), _grads(original(x), (x, original.gamma), cot)):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_nn_channel_attention_rejects_rank_3():
    with pytest.raises(ValueError, match=r"ChannelAttention: input must be \(B, C, H, W\) or \(B, C, D, H, W\), got shape \(2, 3, 4\)"):
        nn_attention.ChannelAttention()(torch.randn(2, 3, 4))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_epilogue_operands_keep_their_own_layouts(backend):
    """``multiply`` broadcast over the batch (an expanded view, batch stride 0) and ``residual`` a
    sliced view of a larger tensor, each with strides unlike x's and the output's: every backend
    reads each operand through its own strides (forward and every gradient vs float64)."""
    torch.manual_seed(5)
    dtype = torch.float32 if backend == "triton" else F64       # the Triton interpreter: float32
    x = (0.3 * torch.randn(3, 6, 5, 7, dtype=F64)).requires_grad_(True)
    f_one = torch.randn(1, 6, 5, 7, dtype=F64, requires_grad=True)
    r_big = torch.randn(3, 9, 5, 8, dtype=F64, requires_grad=True)
    gamma = torch.tensor([0.8], dtype=F64, requires_grad=True)
    leaves = [x, f_one, r_big, gamma]

    def run(b, dt):
        xs, f1, rb, g = [t.detach().to(dt).requires_grad_(True) for t in leaves]
        f = f1.expand(3, -1, -1, -1)
        r = rb[:, 2:8, :, 1:]
        assert f.stride(0) == 0 and not r.is_contiguous()
        out = channel_attention(xs, negate=True, gamma=g, residual=r, multiply=f, backend=b)
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=F64).to(dt)
        return [out, *torch.autograd.grad(out, [xs, f1, rb, g], cot)]

    expected = run("reference", F64)
    got = run(backend, dtype)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == F64 else dict(rtol=2e-5, atol=2e-5)
    for name, a, e in zip(["out", "dx", "dmultiply", "dresidual", "dgamma"], got, expected):
        torch.testing.assert_close(a.double(), e, **tol, msg=lambda m, name=name: f"{backend} {name}: {m}")


# ------------------------------------------------------------------------------------------------
# the cuBLAS path: KernelConfig(channel_gemm="16bit") on the torch backend
# ------------------------------------------------------------------------------------------------
def _gemm16_config():
    import medattn_fast

    return medattn_fast.use_kernel_config(medattn_fast.KernelConfig(channel_gemm="16bit"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("negate,epilogue,shape", [(True, "danet", (2, 19, 5, 7)), (False, "all", (1, 13, 37)),
                                                   (True, "none", (2, 6, 3, 4, 3))],
                         ids=["danet", "all-seed001", "plain-3d"])
def test_gemm16_path_every_gradient_within_the_rule(negate, epilogue, shape, dtype):
    """Forward and every gradient (x, γ, f) of the 16-bit-GEMM path against the float64 reference
    under the tolerance rule (at most 2× PyTorch's own error in that dtype), odd C and N."""
    from _compare import assert_matches_reference

    x = 0.5 * torch.randn(shape, dtype=F64)
    gamma, f = torch.randn(1, dtype=F64), torch.randn(shape, dtype=F64)
    if epilogue == "danet":
        leaves, fn = [x, gamma], lambda x, g, backend: channel_attention(x, negate=negate, gamma=g, residual=x,
                                                                         backend=backend)
    elif epilogue == "all":
        leaves, fn = [x, gamma, f], lambda x, g, f, backend: channel_attention(
            x, negate=negate, gamma=g, residual=x, multiply=f, backend=backend)
    else:
        leaves, fn = [x], lambda x, backend: channel_attention(x, negate=negate, backend=backend)
    with _gemm16_config():
        assert_matches_reference(fn, leaves, "torch", dtype, what=f"channel 16-bit GEMMs {epilogue}")


def test_gemm16_path_is_taken_and_differs_from_the_float32_path():
    """The variant really runs other arithmetic (A rounded to bfloat16 before A X) on 16-bit inputs,
    and leaves float32 inputs on the default path."""
    x = torch.randn(2, 24, 50).bfloat16()
    default = channel_attention(x, backend="torch")
    with _gemm16_config():
        gemm16 = channel_attention(x, backend="torch")
        same = channel_attention(x.float(), backend="torch")
    assert not torch.equal(default, gemm16)
    assert torch.equal(same, channel_attention(x.float(), backend="torch"))


@pytest.mark.parametrize("negate", [True, False])
def test_gemm16_path_float16_where_the_original_is_nan(negate):
    """DANet's float16 NaN (E beyond 65504: inf − inf in rowmax(E) − E) does not happen on the
    16-bit-GEMM path, forward or backward: E is a float32 GEMM output. x = 10·randn over 32² positions:
    E's diagonal ≈ 100 · 1024 ≈ 10⁵ (the original's output is NaN there, asserted)."""
    x = (10 * torch.randn(1, 4, 32, 32)).half().requires_grad_(True)
    gamma = torch.ones(1, dtype=torch.half, requires_grad=True)
    if negate:
        assert not torch.isfinite(ref_danet.CAM_Module(4).half()(x.detach())).all()
    with _gemm16_config():
        out = channel_attention(x, negate=negate, gamma=gamma, residual=x, backend="torch")
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(gamma.grad).all()
    exact = channel_attention(x.detach().double(), negate=negate, gamma=gamma.detach().double(),
                              residual=x.detach().double(), backend="torch")
    # |out| ≲ 60: float16's half-ulp there is 2^-6
    torch.testing.assert_close(out.double(), exact, rtol=2e-3, atol=3e-2)


def test_gemm16_path_compiles_fullgraph():
    """The 16-bit-GEMM path (an autograd.Function) traces whole under torch.compile(fullgraph=True):
    same output and gradients as eager."""
    x = torch.randn(2, 8, 5, 3).bfloat16()
    gamma = torch.randn(1).bfloat16()
    cotangent = torch.randn(2, 8, 5, 3).bfloat16()

    def forward(x, gamma):
        return channel_attention(x, gamma=gamma, residual=x, backend="torch")

    def run(fn):
        leaves = (x.clone().requires_grad_(True), gamma.clone().requires_grad_(True))
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, cotangent)]

    with _gemm16_config():
        eager = run(forward)
        compiled = run(torch.compile(forward, backend="aot_eager", fullgraph=True))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e)

"""Channel attention, ``triton`` backend (triton_kernels/channel.py): forward and every gradient
against the float64 reference, under the Triton interpreter on CPU (fp32, bf16) and on CUDA
(``-m gpu``). Tolerance: at most 2× PyTorch's own error in the same dtype (the ``reference`` backend, the
original arithmetic, run in that dtype; never another fused or vectorised backend, whose bug would
widen the bound), plus one unit in the last place of the dtype (16-bit) or a few float32 roundoffs
(float32).
"""

import pytest
import torch

import medattn_fast
from medattn_fast.ops._channel_triton import channel_triton_bwd, channel_triton_fwd
from medattn_fast.ops.channel import channel_attention
import medattn_fast.triton_kernels.channel as triton_channel
from _tolerance import F64, assert_within_twice, default_device, dry_run, gpu_device, max_errors


def _x(shape, dtype, device, *, channels_last=False, magnitude=0.3):
    """Fresh random features; small magnitude so that softmax(∓X Xᵀ) is not a hard one-hot."""
    x = magnitude * torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.detach().requires_grad_(True)


def _case(shape, *, epilogue, dtype, device=None, channels_last=False):
    """Leaves and kwargs. ``danet``: γ·o + x (residual is x itself); ``seed001``: o ⊙ x."""
    device = device or default_device()
    x = _x(shape, dtype, device, channels_last=channels_last)
    if epilogue == "danet":
        gamma = torch.randn(1, device=device, dtype=dtype, requires_grad=True)
        return [x, gamma], lambda t, g: dict(gamma=g, residual=t)
    if epilogue == "seed001":
        return [x], lambda t: dict(multiply=t)
    if epilogue == "all":
        gamma = torch.randn(1, device=device, dtype=dtype, requires_grad=True)
        f = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        return [x, gamma, f], lambda t, g, m: dict(gamma=g, residual=t, multiply=m)
    return [x], lambda t: {}


def _run(leaves, make_kw, negate, backend, cotangent, dtype=None):
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    out = channel_attention(leaves[0], negate=negate, backend=backend, **make_kw(*leaves))
    return [out, *torch.autograd.grad(out, leaves, cotangent.to(out.dtype))]


def _compare(leaves, make_kw, negate, dtype):
    cot = torch.randn(leaves[0].shape, device=leaves[0].device, dtype=F64)
    reference = _run(leaves, make_kw, negate, "reference", cot, dtype=F64)
    # the yardstick is the reference in the same dtype (PyTorch's own error), never another backend
    base = max_errors(_run(leaves, make_kw, negate, "reference", cot), reference)
    fused = _run(leaves, make_kw, negate, "triton", cot)
    assert fused[0].dtype == dtype and fused[0].shape == leaves[0].shape
    assert_within_twice(fused, base, reference, dtype, ["output"] + [f"grad {i}" for i in range(len(leaves))])


SHAPES = [
    (1, 1, 1),            # C = 1, N = 1
    (2, 13, 67),          # 1-D spatial, prime C and N
    (1, 5, 7, 9),         # 2-D, H != W, B = 1
    (2, 3, 3, 4, 5),      # 3-D
    (2, 24, 6, 7),        # C = 24 (two channel blocks of 16), N = 42
]


@pytest.mark.parametrize("negate", [True, False], ids=["danet", "seed001"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference_fp32(shape, negate):
    leaves, make_kw = _case(shape, epilogue="danet" if negate else "seed001", dtype=torch.float32)
    _compare(leaves, make_kw, negate, torch.float32)


@pytest.mark.parametrize("epilogue", ["none", "all"])
def test_triton_plain_and_full_epilogue_fp32(epilogue):
    leaves, make_kw = _case((2, 11, 5, 7), epilogue=epilogue, dtype=torch.float32)
    _compare(leaves, make_kw, True, torch.float32)


def test_triton_channels_last_and_strided_inputs_fp32():
    leaves, make_kw = _case((2, 6, 5, 7), epilogue="danet", dtype=torch.float32, channels_last=True)
    assert not leaves[0].is_contiguous()
    _compare(leaves, make_kw, True, torch.float32)
    wide = torch.randn(2, 6, 5, 14)
    strided = (0.3 * wide[..., ::2]).detach().requires_grad_(True)      # no mergeable strides: reshape copies
    _compare([strided], lambda t: dict(multiply=t), False, torch.float32)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("negate", [True, False], ids=["danet", "seed001"])
def test_triton_bf16_within_twice_pytorch_error(negate, seed):
    torch.manual_seed(seed)
    leaves, make_kw = _case((2, 19, 6, 7), epilogue="danet" if negate else "seed001", dtype=torch.bfloat16)
    _compare(leaves, make_kw, negate, torch.bfloat16)


CONFIGS = [
    triton_channel.ChannelConfig(block_c=16, block_n=16, block_k=16, splits=3, num_warps=1, num_stages=1),
    triton_channel.ChannelConfig(block_c=32, block_n=32, block_k=16, splits=1, num_warps=2, num_stages=1),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["c16n16split3", "c32n32split1"])
@pytest.mark.parametrize("negate", [True, False], ids=["danet", "seed001"])
def test_launch_functions_across_tile_configs(config, negate):
    """The kernels directly: the N reduction split across three programs (ragged last split,
    C = 19 over two channel tiles) and unsplit with one channel tile; forward and backward."""
    batch, channels, n = 2, 19, 67
    x = 0.3 * torch.randn(batch, n, channels).transpose(1, 2)          # position-major storage
    gamma, f = torch.randn(1), torch.randn(batch, channels, n)
    out, o, attention = triton_channel.channel_forward(x, negate=negate, gamma=gamma, residual=x, multiply=f,
                                                       config=config)
    leaves = [t.double().requires_grad_(True) for t in (x, gamma, f)]
    energy = leaves[0] @ leaves[0].transpose(1, 2)
    a_ref = torch.softmax(-energy if negate else energy, dim=-1)
    o_ref = a_ref @ leaves[0]
    out_ref = leaves[1] * (o_ref * leaves[2]) + leaves[0]
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention.double(), a_ref, rtol=1e-5, atol=1e-6)
    cot = torch.randn(batch, channels, n)
    dx, d_gamma, d_f = triton_channel.channel_backward(cot, x, o, attention, negate=negate, gamma=gamma,
                                                       multiply=f, config=config)
    expected = torch.autograd.grad(out_ref, leaves, cot.double())
    torch.testing.assert_close((dx + cot).double(), expected[0], rtol=2e-5, atol=2e-5)   # + residual path
    torch.testing.assert_close(d_gamma.double(), expected[1], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(d_f.double(), expected[2], rtol=2e-5, atol=2e-5)


def test_gram_splits_sum_to_the_full_product():
    u, v = torch.randn(1, 7, 131), torch.randn(1, 7, 131)
    full = triton_channel.gram(u, v, triton_channel.ChannelConfig(block_c=16, block_n=16, splits=1))
    for splits in (2, 5, 100):   # 100 is clamped to the 9 chunks of N
        parts = triton_channel.gram(u, v, triton_channel.ChannelConfig(block_c=16, block_n=16, splits=splits))
        torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.double(), u.double() @ v.double().transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_no_grad_forward_matches():
    x = _x((2, 9, 4, 5), torch.float32, torch.device("cpu")).detach()
    with torch.no_grad():
        ref = channel_attention(x, gamma=torch.tensor([0.7]), residual=x, backend="reference")
        out = channel_attention(x, gamma=torch.tensor([0.7]), residual=x, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_triton_reasons_on_cpu_float64():
    x = torch.randn(1, 3, 4, dtype=F64)
    reasons = medattn_fast.backend.op("channel_attention").why_not(
        "triton", x, negate=True, gamma=None, residual=None, multiply=None)
    assert any("float32/bfloat16" in r for r in reasons)
    with pytest.raises(medattn_fast.BackendUnavailable, match="float32/bfloat16"):
        channel_attention(x, backend="triton")


def test_opcheck_forward_and_backward_ops():
    x = _x((1, 5, 3, 4), torch.float32, torch.device("cpu"))
    gamma = torch.randn(1, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    # the family's contract (the cpp ops' schema): a separate residual, or the residual is x itself
    for residual_arg, residual_is_x in ((residual, False), (None, True)):
        fwd_args = (x, gamma, residual_arg, None, True, True, residual_is_x, None)
        torch.library.opcheck(channel_triton_fwd, fwd_args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        out, o, attention = channel_triton_fwd(x.detach(), gamma.detach(), None if residual_arg is None else
                                               residual_arg.detach(), None, True, True, residual_is_x, None)
        bwd_args = (torch.randn_like(out), x.detach(), o, attention, gamma.detach(), None, True, False, residual_is_x,
                    None)
        torch.library.opcheck(channel_triton_bwd, bwd_args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph_without_recompiles():
    gamma = torch.randn(1)

    def fn(x):
        return channel_attention(x, gamma=gamma, residual=x, backend="triton")

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = 0.3 * torch.randn(2, 6, 5, 3)
        torch.testing.assert_close(compiled(x), fn(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("negate", [True, False], ids=["danet", "seed001"])
def test_gpu_danet_shapes_within_twice_pytorch_error(dtype, negate):
    """C = 512 at 32×32 and a 3-D prime-sized map (split N reduction), all gradients (the dry run on
    the CPU: one small 3-D map the interpreter runs in seconds)."""
    for shape in ((1, 19, 5, 7, 3),) if dry_run() else ((2, 512, 32, 32), (1, 67, 11, 13, 7)):
        leaves, make_kw = _case(shape, epilogue="danet" if negate else "seed001", dtype=dtype,
                                device=gpu_device())
        _compare(leaves, make_kw, negate, dtype)


@pytest.mark.gpu
def test_gpu_fp16_large_map_is_finite():
    """fp16 at C = 512, 128²: the original's fp16 energy overflows (NaN); E accumulates in float32 here."""
    x = torch.randn(1, 512, 128, 128, device=gpu_device(), dtype=torch.float16)
    out = channel_attention(x, gamma=torch.ones(1, device=gpu_device(), dtype=torch.float16), residual=x,
                            backend="triton")
    assert torch.isfinite(out).all()
    ref = channel_attention(x.float(), gamma=torch.ones(1, device=gpu_device()), residual=x.float(), backend="torch")
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)




# ---------------------------------------------------------------------------------------------
# the fused backward (epilogue pass, softmax backward, dE + dEᵀ in the mix) in every dtype
# ---------------------------------------------------------------------------------------------
def _through_the_op(x, gamma, f, *, negate, backend):
    """γ · (A X ⊙ f) + x on ``reference``, or through the triton custom ops themselves (their
    autograd), which float16 reaches on a CPU too (the backend's predicate refuses float16 under
    the interpreter, whose float16 arithmetic is nonetheless correct)."""
    if backend == "reference":
        return channel_attention(x, negate=negate, gamma=gamma, residual=x, multiply=f, backend="reference")
    return channel_triton_fwd(x, gamma, None, f, negate, True, True, None)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("negate,shape", [(True, (2, 19, 5, 7)), (False, (1, 21, 37))], ids=["danet", "seed001"])
def test_fused_backward_every_gradient_every_dtype(negate, shape, dtype):
    """Forward and the gradients of x, γ and f (odd C and N: 19 channels over two 16-wide blocks,
    N = 35 or 37 positions) against the float64 reference under the tolerance rule, in float32,
    bfloat16 and float16."""
    from _compare import assert_matches_reference

    device = default_device()
    x = 0.3 * torch.randn(shape, device=device, dtype=F64)
    gamma, f = torch.randn(1, device=device, dtype=F64), torch.randn(shape, device=device, dtype=F64)
    fn = lambda x, gamma, f, backend: _through_the_op(x, gamma, f, negate=negate, backend=backend)  # noqa: E731
    assert_matches_reference(fn, [x, gamma, f], "triton", dtype, names=["dx", "dγ", "df"],
                             what=f"channel {'danet' if negate else 'seed001'} {shape}")


def test_epilogue_backward_matches_its_formulas():
    """g, dγ, df of the epilogue pass (multiply expanded over the batch, grad_out a strided view)
    against their float64 formulas; without γ and f, grad_out is passed through untouched."""
    grad_out = torch.randn(2, 9, 40)[:, :, ::2]
    o, f = torch.randn(2, 9, 20), torch.randn(1, 9, 20).expand(2, 9, 20)
    gamma = torch.randn(1)
    cfg = triton_channel.ChannelConfig(block_c=16, block_n=16, block_k=16)
    g, d_gamma, d_mul = triton_channel.epilogue_backward(grad_out, o, gamma=gamma, multiply=f,
                                                         need_multiply_grad=True, cfg=cfg)
    go, oo, fo, ga = grad_out.double(), o.double(), f.double(), gamma.double()
    torch.testing.assert_close(g.double(), ga * go * fo, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d_mul.double(), ga * go * oo, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d_gamma.double(), (go * fo * oo).sum().reshape(1), rtol=1e-5, atol=1e-5)
    same, none_gamma, none_mul = triton_channel.epilogue_backward(grad_out, o, gamma=None, multiply=None,
                                                                  need_multiply_grad=False, cfg=cfg)
    assert same is grad_out and none_gamma is None and none_mul is None

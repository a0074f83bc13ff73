"""Channel attention, ``cpp`` backend (csrc/cpu/channel.cpp): forward and every gradient against the
original's arithmetic in float64 (both signs, every epilogue, 1-3 spatial dims, C = 1, strided x),
low precision against the torch backend's own error, float16 overflow, gradcheck, opcheck,
torch.compile, the compat modules (DANet CAM, Multi-Scale Guided Attention 3-D)."""
import pytest
import torch

import medattn_fast
from medattn_fast import backend as B
from medattn_fast.compat.danet import CAM_Module as FastCAM
from medattn_fast.compat.guided_attention import ChannelAttentionModule as FastChannel
from medattn_fast.ops.channel import channel_attention
from medattn_fast.reference.danet import CAM_Module
from medattn_fast.reference.guided_attention import ChannelAttentionModule

F64 = torch.float64


def _grads(out, tensors, cotangent):
    return torch.autograd.grad(out, tensors, cotangent)


EPILOGUES = {"none": (), "gamma_residual": ("gamma", "residual"), "multiply": ("multiply",),
             "all": ("gamma", "residual", "multiply"), "gamma": ("gamma",)}


@pytest.mark.parametrize("negate", [True, False])
@pytest.mark.parametrize("parts", list(EPILOGUES), ids=list(EPILOGUES))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 7, 5, 3), (3, 5, 13), (1, 6, 2, 3, 5)],
                         ids=["C1_N1", "2d_prime", "1d", "3d"])
def test_cpp_matches_reference_fp64(shape, parts, negate):
    x = (0.5 * torch.randn(shape, dtype=F64)).requires_grad_(True)
    extra = {"gamma": torch.randn(1, dtype=F64, requires_grad=True),
             "residual": torch.randn(shape, dtype=F64, requires_grad=True),
             "multiply": torch.randn(shape, dtype=F64, requires_grad=True)}
    kw = {name: extra[name] for name in EPILOGUES[parts]}
    leaves = (x, *kw.values())
    ref = channel_attention(x, negate=negate, backend="reference", **kw)
    out = channel_attention(x, negate=negate, backend="cpp", **kw)
    assert out.shape == x.shape and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    for g, g_ref in zip(_grads(out, leaves, cot), _grads(ref, leaves, cot)):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


def test_cpp_non_contiguous_input_multiplied_by_itself():
    base = torch.randn(2, 9, 6, 10, dtype=F64)
    x = base.permute(0, 3, 1, 2)[:, ::2].detach().requires_grad_(True)   # (2, 5, 9, 6), strided
    assert not x.is_contiguous()
    ref = channel_attention(x, negate=False, multiply=x, backend="reference")
    out = channel_attention(x, negate=False, multiply=x, backend="cpp")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    torch.testing.assert_close(_grads(out, (x,), cot)[0], _grads(ref, (x,), cot)[0], rtol=1e-11, atol=1e-11)


def test_cpp_gradcheck_fp64_tiny():
    x = (0.5 * torch.randn(2, 3, 2, 3, dtype=F64)).requires_grad_(True)
    gamma = torch.randn(1, dtype=F64, requires_grad=True)
    f = torch.randn(2, 3, 2, 3, dtype=F64, requires_grad=True)
    for negate in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, g, f: channel_attention(x, negate=negate, gamma=g, residual=x, multiply=f, backend="cpp"),
            (x, gamma, f))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_low_precision_error_within_twice_the_torch_backends(dtype):
    x64 = (0.3 * torch.randn(2, 24, 9, 11, dtype=F64)).requires_grad_(True)
    gamma64 = torch.tensor([0.7], dtype=F64)
    exact = channel_attention(x64, gamma=gamma64, residual=x64, backend="reference")
    cot = torch.randn_like(exact)
    exact_grad = _grads(exact, (x64,), cot)[0]

    def run(backend):
        x = x64.detach().to(dtype).requires_grad_(True)
        out = channel_attention(x, gamma=gamma64.to(dtype), residual=x, backend=backend)
        assert out.dtype == dtype
        grad = _grads(out, (x,), cot.to(dtype))[0]
        return (out.double() - exact).abs().max().item(), (grad.double() - exact_grad).abs().max().item()

    eps = 1e-6 if dtype == torch.float32 else 1e-3
    for ours, theirs in zip(run("cpp"), run("torch")):
        assert ours <= 2 * theirs + eps, (ours, theirs)


def test_cpp_float16_energy_stays_finite():
    x = (30 * torch.randn(1, 8, 16, 16)).half()   # |E| ≫ 65504: the original overflows in float16
    out = channel_attention(x, gamma=torch.tensor([0.5], dtype=torch.float16), residual=x, backend="cpp")
    assert torch.isfinite(out).all()
    exact = channel_attention(x.double(), gamma=torch.tensor([0.5], dtype=F64), residual=x.double(),
                              backend="reference")
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2)


def test_cpp_custom_ops_pass_opcheck():
    x = torch.randn(2, 5, 4, 3, dtype=F64, requires_grad=True)
    gamma = torch.randn(1, dtype=F64, requires_grad=True)
    f = torch.randn(2, 5, 4, 3, dtype=F64, requires_grad=True)
    residual = torch.randn(2, 5, 4, 3, dtype=F64, requires_grad=True)
    for args in ((x, gamma, residual, f, True, True, False, None), (x, gamma, None, None, False, True, True, None)):
        torch.library.opcheck(torch.ops.medattn.channel_cpp_fwd.default, args)
        out, o, attention = torch.ops.medattn.channel_cpp_fwd(*args)
        bwd = (torch.randn_like(out), x.detach(), o, attention, gamma.detach(),
               None if args[3] is None else args[3].detach(), args[4], True, args[6], None)
        torch.library.opcheck(torch.ops.medattn.channel_cpp_bwd.default, bwd)


def test_cpp_compiles_fullgraph_once():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    def cam(x, gamma):
        return channel_attention(x, gamma=gamma, residual=x, backend="cpp")

    compiled = torch.compile(cam, fullgraph=True, backend=counter)
    for _ in range(2):
        x = torch.randn(2, 6, 5, 4, requires_grad=True)
        gamma = torch.randn(1, requires_grad=True)
        out, ref = compiled(x, gamma), cam(x, gamma)
        torch.testing.assert_close(out, ref)
        cot = torch.randn_like(out)
        for g, g_ref in zip(_grads(out, (x, gamma), cot), _grads(ref, (x, gamma), cot)):
            torch.testing.assert_close(g, g_ref)
    assert counter.frame_count == 1


def test_cpp_is_the_auto_choice_on_cpu():
    x = torch.randn(1, 3, 4)
    assert B.op("channel_attention").choose(x, negate=True, gamma=None, residual=None, multiply=None) == "cpp"


def test_cpp_danet_cam_compat_matches_original():
    reference = CAM_Module(12).double()
    with torch.no_grad():
        reference.gamma.fill_(0.8)
    fast = FastCAM.from_original(reference)
    x = (0.3 * torch.randn(2, 12, 5, 7, dtype=F64)).requires_grad_(True)
    with medattn_fast.use_backend("cpp"):
        out = fast(x)
    ref = reference(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    for a, b in zip(_grads(out, (x, fast.gamma), cot), _grads(ref, (x, reference.gamma), cot)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_cpp_3d_feature_map_through_compat():
    reference = ChannelAttentionModule(6, spatial_dims=3).double()
    fast = FastChannel.from_original(reference)
    x = (0.5 * torch.randn(2, 6, 3, 4, 5, dtype=F64)).requires_grad_(True)
    with medattn_fast.use_backend("cpp"):
        out = fast(x)
    ref = reference(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    params = [p for _, p in sorted(fast.named_parameters())]
    ref_params = [p for _, p in sorted(reference.named_parameters())]
    for a, b in zip(_grads(out, (x, *params), cot), _grads(ref, (x, *ref_params), cot)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)

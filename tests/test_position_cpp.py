"""Position attention, ``cpp`` backend (csrc/cpu/position.cpp): forward and every gradient against
the materialising reference in float64 (odd shapes, both layouts, strided channel-first inputs,
transpose, epilogues, two tile sizes), low precision against the torch backend's own error,
gradcheck, opcheck of the custom ops, torch.compile, O(N) memory, determinism, compat modules."""
import pytest
import torch

import medattn_fast
from medattn_fast import backend as B
from medattn_fast.compat.danet import PAM_Module as FastPAM
from medattn_fast.compat.guided_attention import PositionAttentionModule as FastPosition
from medattn_fast.ops import _position_cpp
from medattn_fast.ops.position import position_attention
from medattn_fast.reference.danet import PAM_Module
from medattn_fast.reference.guided_attention import PositionAttentionModule

from _position_inputs import SHAPES, position_inputs as _inputs, grads as _grads

F64 = torch.float64


@pytest.mark.parametrize("block_k", [5, 256])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("layout", ["tokens", "channels"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Nq{}_Nk{}_dk{}_dv{}_bq{}".format(*s))
def test_cpp_matches_reference_fp64(shape, layout, transpose, block_k, monkeypatch):
    monkeypatch.setattr(_position_cpp, "DEFAULT_BLOCK_K", block_k)
    batch, nq, nk, dk, dv, block_q = shape
    q, k, v = _inputs(batch, nq, nk, dk, dv, transpose=transpose, layout=layout, strided=layout == "channels")
    ref = position_attention(q, k, v, scale=0.8, transpose=transpose, layout=layout, backend="reference")
    out = position_attention(q, k, v, scale=0.8, transpose=transpose, layout=layout, chunk_size=block_q,
                             backend="cpp")
    assert out.shape == ref.shape and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    for g, g_ref in zip(_grads(out, (q, k, v), cot), _grads(ref, (q, k, v), cot)):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


EPILOGUES = {"gamma_residual": ("gamma", "residual"),            # DANet: γ·o + x
             "gamma_residual_multiply": ("gamma", "residual", "multiply"),
             "multiply": ("multiply",),                          # o ⊙ f
             "residual": ("residual",)}


@pytest.mark.parametrize("layout", ["tokens", "channels"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("parts", list(EPILOGUES), ids=list(EPILOGUES))
def test_cpp_epilogues_and_their_grads(parts, transpose, layout):
    q, k, v = _inputs(2, 11, 11, 3, 6, transpose=transpose, layout=layout, strided=layout == "channels")
    out_shape = (2, 6, 11) if layout == "channels" else (2, 11, 6)
    extra = {"gamma": torch.randn(1, dtype=F64, requires_grad=True),
             "residual": torch.randn(out_shape, dtype=F64, requires_grad=True),
             "multiply": torch.randn(out_shape, dtype=F64, requires_grad=True)}
    kw = {name: extra[name] for name in EPILOGUES[parts]}
    leaves = (q, k, v, *kw.values())
    ref = position_attention(q, k, v, transpose=transpose, layout=layout, backend="reference", **kw)
    out = position_attention(q, k, v, transpose=transpose, layout=layout, backend="cpp", chunk_size=4, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    for g, g_ref in zip(_grads(out, leaves, cot), _grads(ref, leaves, cot)):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


def test_cpp_channels_output_is_channel_first_and_grads_keep_input_strides():
    q, k, v = _inputs(2, 10, 7, 2, 5, layout="channels")
    out = position_attention(q, k, v, layout="channels", backend="cpp")
    assert out.shape == (2, 5, 10) and out.is_contiguous()     # written channel-first, not permuted after
    tokens = position_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="cpp")
    torch.testing.assert_close(out, tokens.transpose(1, 2), rtol=1e-14, atol=1e-14)
    out.backward(torch.randn_like(out))
    assert q.grad.shape == q.shape and q.grad.is_contiguous()


@pytest.mark.parametrize("transpose", [False, True])
def test_cpp_gradcheck_fp64_tiny(transpose):
    q, k, v = _inputs(2, 5, 5 if transpose else 4, 3, 2, transpose=transpose)
    gamma = torch.randn(1, dtype=F64, requires_grad=True)
    n_out = k.shape[1] if transpose else q.shape[1]
    residual = torch.randn(2, n_out, 2, dtype=F64, requires_grad=True)
    multiply = torch.randn_like(residual).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, g, x, f: position_attention(q, k, v, scale=0.9, transpose=transpose, gamma=g, residual=x,
                                                    multiply=f, chunk_size=2, backend="cpp"),
        (q, k, v, gamma, residual, multiply))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
def test_cpp_low_precision_error_within_twice_the_torch_backends(dtype, transpose):
    q64, k64, v64 = (t.detach() for t in _inputs(2, 70, 70, 8, 16, transpose=transpose))
    gamma64 = torch.tensor([0.7], dtype=F64)
    res64 = torch.randn(2, 70, 16, dtype=F64)
    for t in (q64, k64, v64):
        t.requires_grad_(True)
    exact = position_attention(q64, k64, v64, transpose=transpose, gamma=gamma64, residual=res64, backend="reference")
    cot = torch.randn_like(exact)
    exact_grads = _grads(exact, (q64, k64, v64), cot)

    def run(backend):
        q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q64, k64, v64))
        out = position_attention(q, k, v, transpose=transpose, gamma=gamma64.to(dtype), residual=res64.to(dtype),
                                 chunk_size=16, backend=backend)
        assert out.dtype == dtype
        grads = _grads(out, (q, k, v), cot.to(dtype))
        return [(a.double() - b).abs().max().item() for a, b in zip((out, *grads), (exact, *exact_grads))]

    eps = 1e-6 if dtype == torch.float32 else 1e-3
    for ours, theirs in zip(run("cpp"), run("torch")):
        assert ours <= 2 * theirs + eps, (ours, theirs)


@pytest.mark.parametrize("transpose", [False, True])
def test_cpp_custom_ops_pass_opcheck(transpose):
    q, k, v = (t.detach() for t in _inputs(2, 9, 9, 3, 5, transpose=transpose, layout="channels", strided=True))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)         # token-major strided views
    gamma = torch.randn(1, dtype=F64, requires_grad=True)
    residual = torch.randn(2, 9, 5, dtype=F64, requires_grad=True)
    multiply = torch.randn(2, 9, 5, dtype=F64, requires_grad=True)
    for t in (q, k, v):
        t.requires_grad_(True)
    args = (q, k, v, gamma, residual, multiply, 0.7, transpose, True, True, 4, 3)
    torch.library.opcheck(torch.ops.medattn.position_cpp_fwd.default, args)
    out, o, lse = torch.ops.medattn.position_cpp_fwd(*args)
    grad_out = torch.randn_like(out)                                          # token-major, channel-first strides
    bwd_args = (grad_out, q.detach(), k.detach(), v.detach(), o, lse, gamma.detach(), multiply.detach(), 0.7,
                transpose, True, 4, 3)
    torch.library.opcheck(torch.ops.medattn.position_cpp_bwd.default, bwd_args)


def test_cpp_compiles_fullgraph_once():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    def pam(q, k, v, gamma, x):
        return position_attention(q, k, v, layout="channels", gamma=gamma, residual=x, backend="cpp")

    compiled = torch.compile(pam, fullgraph=True, backend=counter)
    for _ in range(2):
        q, k, v = _inputs(2, 12, 12, 2, 4, layout="channels", dtype=torch.float32)
        gamma = torch.randn(1, requires_grad=True)
        x = torch.randn(2, 4, 12, requires_grad=True)
        out = compiled(q, k, v, gamma, x)
        ref = pam(q, k, v, gamma, x)
        torch.testing.assert_close(out, ref)
        cot = torch.randn_like(out)
        for g, g_ref in zip(_grads(out, (q, k, v, gamma, x), cot), _grads(ref, (q, k, v, gamma, x), cot)):
            torch.testing.assert_close(g, g_ref)
    assert counter.frame_count == 1


def _allocations(fn):
    """(bytes allocated through ATen while fn runs, the largest net allocation of any single op).

    Every buffer of the cpp kernels (outputs, packed operands, statistics, per-thread score tiles)
    is an ``aten::empty``/``aten::empty_strided`` call, so the sum of those is an upper bound of
    the peak; the second number catches any op (a bmm, say) whose result is an N×N matrix."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()
    total = sum(e.cpu_memory_usage for e in events
                if e.name in ("aten::empty", "aten::empty_strided") and e.cpu_memory_usage > 0)
    return total, max((e.cpu_memory_usage for e in events), default=0)


@pytest.mark.parametrize("transpose", [False, True])
def test_cpp_memory_is_linear_in_n(transpose):
    n, dk, dv = 3000, 4, 8          # N² float32 = 36 MB; q, k, v together 0.2 MB
    q, k, v = _inputs(1, n, n, dk, dv, transpose=transpose, layout="channels", dtype=torch.float32)
    gamma = torch.tensor([0.5], requires_grad=True)
    x = torch.randn(1, dv, n, requires_grad=True)
    cot = torch.randn(1, dv, n)
    holder = {}

    def forward():
        holder["out"] = position_attention(q, k, v, transpose=transpose, layout="channels", gamma=gamma, residual=x,
                                           backend="cpp")

    def backward():
        holder["out"].backward(cot)

    linear = 4 * n * (dk + dv)                     # bytes of one (N, dk + dv) float32 operand set
    bq, bk = _position_cpp.DEFAULT_BLOCK_Q, _position_cpp.DEFAULT_BLOCK_K
    tiles = 4 * torch.get_num_threads() * (2 * bq * bk + 2 * bq + bk * dk + (bq + bk) * dv)  # independent of N
    for fn in (forward, backward):
        total, largest_op = _allocations(fn)
        # outputs, lse, G, D, the 8 per-group dq partials (8·N·dk) and the per-thread tiles
        assert total <= 16 * linear + tiles, (fn.__name__, total)
        assert largest_op <= 16 * linear + tiles, (fn.__name__, largest_op)
    _, largest_ref = _allocations(lambda: position_attention(q, k, v, transpose=transpose, layout="channels",
                                                             backend="reference"))
    assert largest_ref >= 4 * n * n                # the measurement does see the reference's N×N matrix


def test_cpp_is_deterministic_across_thread_counts():
    q, k, v = (t.detach().float() for t in _inputs(2, 300, 280, 8, 24))
    cot = torch.randn(2, 300, 24)

    def run():
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = position_attention(qq, kk, vv, chunk_size=32, backend="cpp")
        return (out, *_grads(out, (qq, kk, vv), cot))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_cpp_is_the_auto_choice_on_cpu():
    q, k, v = _inputs(1, 6, 6, 2, 3)
    assert B.op("position_attention").choose(q, k, v, scale=1.0, transpose=False, gamma=None, residual=None,
                                             multiply=None, chunk_size=None, channels_first=False) == "cpp"


def test_cpp_danet_pam_compat_matches_original():
    reference = PAM_Module(16).double()
    with torch.no_grad():
        reference.gamma.fill_(0.6)
    fast = FastPAM.from_original(reference)
    x = torch.randn(2, 16, 5, 7, dtype=F64, requires_grad=True)
    with medattn_fast.use_backend("cpp"):
        out = fast(x)
    ref = reference(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    g = _grads(out, (x, fast.gamma, fast.query_conv.weight, fast.value_conv.bias), cot)
    g_ref = _grads(ref, (x, reference.gamma, reference.query_conv.weight, reference.value_conv.bias), cot)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_cpp_3d_feature_map_through_compat():
    reference = PositionAttentionModule(8, spatial_dims=3).double()      # C/8 = 1, transpose=True
    fast = FastPosition.from_original(reference)
    x = torch.randn(2, 8, 3, 4, 5, dtype=F64, requires_grad=True)
    with medattn_fast.use_backend("cpp"):
        out = fast(x)
    ref = reference(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(ref)
    params = [p for _, p in sorted(fast.named_parameters())]
    ref_params = [p for _, p in sorted(reference.named_parameters())]
    for a, b in zip(_grads(out, (x, *params), cot), _grads(ref, (x, *ref_params), cot)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)

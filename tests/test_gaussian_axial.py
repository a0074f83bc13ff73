"""Gaussian-weighted axial attention (MT-UNet GaussianTrans): torch and cpp backends vs the loop.

Every fast path is compared to the original's per-pixel loop (medattn_fast.reference.
gaussian_trans) on fresh random inputs: forward, the gradients of every input and of ``shift``,
and the ``bias`` gradient, which must be exactly zero (it cancels in both softmaxes).
"""
from __future__ import annotations

import pytest
import torch

import medattn_fast
import medattn_fast.functional as MF
from medattn_fast import BackendUnavailable
from medattn_fast.ops import _gaussian_axial_cpp as GC
from medattn_fast.ops import gaussian_axial as GA
from medattn_fast.reference.gaussian_trans import (
    GaussianTrans,
    axial_scores_reference,
    gaussian_axial_from_qkv_reference,
    gaussian_trans_loop,
)

F64 = torch.float64
# (B, H, W, D): B = 1, H ≠ W both ways, primes, D = 1, D not a power of two, a 1-pixel-wide grid.
SHAPES = [(2, 5, 7, 3), (1, 7, 5, 1), (2, 3, 3, 13), (1, 1, 4, 6), (1, 6, 2, 70)]
FAST = ["torch", "cpp"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _scalars(dtype=F64):
    shift = torch.randn(1, dtype=dtype).abs().add_(0.05).requires_grad_()
    bias = (-torch.randn(1, dtype=dtype).abs()).requires_grad_()
    return shift, bias


def _scores_inputs(b, h, w, d, dtype=F64):
    return (torch.randn(b, h, w, w, dtype=dtype, requires_grad=True),
            torch.randn(b, w, h, h, dtype=dtype, requires_grad=True),
            torch.randn(b, h, w, d, dtype=dtype, requires_grad=True))


def _qkv_inputs(b, h, w, d, dtype=F64):
    # q scaled so the scores have unit variance, as in a trained block (no 1/√D in the op).
    q = (torch.randn(b, h, w, d, dtype=dtype) / d ** 0.5).requires_grad_()
    return q, torch.randn(b, h, w, d, dtype=dtype, requires_grad=True), \
        torch.randn(b, h, w, d, dtype=dtype, requires_grad=True)


def _forward_and_grads(fn, tensors, cotangent):
    out = fn(*tensors)
    grads = torch.autograd.grad(out, tensors, cotangent)
    return out, grads


def _close(actual, expected, atol, rtol=1e-10, what=""):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _from_scores(backend):
    return lambda ax, ay, v, shift, bias: MF.gaussian_axial_from_scores(ax, ay, v, shift, bias=bias, backend=backend)


def _from_qkv(backend):
    return lambda q, k, v, shift, bias: MF.gaussian_axial_attention(q, k, v, shift, bias=bias, backend=backend)


def _closed_form(atten_x, atten_y, v, shift):
    """The op's math written independently of every implementation (test oracle for the loop)."""
    _, h, w, _ = v.shape
    jw = torch.arange(w, dtype=v.dtype)
    ih = torch.arange(h, dtype=v.dtype)
    prob_x = torch.softmax(atten_x - shift * (jw[None, :] - jw[:, None]) ** 2, dim=-1)  # [r, c, j]
    prob_y = torch.softmax(atten_y - shift * (ih[None, :] - ih[:, None]) ** 2, dim=-1)  # [c, r, i]
    return torch.einsum("brcj,brjd->brcd", prob_x, v) + torch.einsum("bcri,bicd->brcd", prob_y, v)


# ------------------------------------------------------------------------------------------------
# the reference itself
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (1, 3, 5, 2)])
def test_reference_loop_matches_closed_form(shape):
    ax, ay, v = _scores_inputs(*shape)
    shift, bias = _scalars()
    out = gaussian_trans_loop(ax, ay, v, shift, bias)
    _close(out, _closed_form(ax, ay, v, shift), atol=1e-12, what="loop vs closed form")


def test_reference_module_is_the_original():
    torch.manual_seed(3)
    module = GaussianTrans().double()
    assert sorted(module.state_dict()) == ["bias", "shift"]
    assert module.bias.shape == (1,) and module.shift.shape == (1,)
    assert module.bias.item() <= 0 <= module.shift.item()  # -|randn|, |randn|
    b, h, w, d = 2, 4, 6, 3
    ax, ay, v = _scores_inputs(b, h, w, d)
    grid = torch.randn(b, h, w, 5, dtype=F64)  # x: only its shape matters
    out = module((grid, ax, ay, v))
    _close(out, gaussian_trans_loop(ax, ay, v, module.shift, module.bias), atol=0, rtol=0, what="module vs loop")


def test_reference_qkv_scores_are_the_axial_matmuls():
    q, k, _ = _qkv_inputs(2, 3, 4, 5)
    atten_x, atten_y = axial_scores_reference(q, k)
    _close(atten_x, torch.einsum("brcd,brjd->brcj", q, k), atol=1e-12, what="atten_x")
    _close(atten_y, torch.einsum("brcd,bicd->bcri", q, k), atol=1e-12, what="atten_y")


# ------------------------------------------------------------------------------------------------
# fast backends vs the loop, float64
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", FAST)
def test_from_scores_matches_reference(backend, shape):
    ax, ay, v = _scores_inputs(*shape)
    shift, bias = _scalars()
    inputs = (ax, ay, v, shift, bias)
    cot = torch.randn(shape, dtype=F64)
    ref_out, ref_grads = _forward_and_grads(_from_scores("reference"), inputs, cot)
    out, grads = _forward_and_grads(_from_scores(backend), inputs, cot)
    _close(out, ref_out, atol=1e-12, what="out")
    for name, g, rg in zip(("atten_x", "atten_y", "v", "shift"), grads[:4], ref_grads[:4]):
        _close(g, rg, atol=1e-11, rtol=1e-10, what=f"grad {name}")
    assert torch.equal(grads[4], torch.zeros_like(bias)), "bias gradient must be exactly zero"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", FAST)
def test_from_qkv_matches_reference(backend, shape):
    q, k, v = _qkv_inputs(*shape)
    shift, bias = _scalars()
    inputs = (q, k, v, shift, bias)
    cot = torch.randn(shape, dtype=F64)
    ref_out, ref_grads = _forward_and_grads(_from_qkv("reference"), inputs, cot)
    out, grads = _forward_and_grads(_from_qkv(backend), inputs, cot)
    _close(out, ref_out, atol=1e-12, what="out")
    for name, g, rg in zip(("q", "k", "v", "shift"), grads[:4], ref_grads[:4]):
        _close(g, rg, atol=1e-11, rtol=1e-10, what=f"grad {name}")
    assert torch.equal(grads[4], torch.zeros_like(bias)), "bias gradient must be exactly zero"


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_bias_gradient_is_exactly_zero_and_output_ignores_bias(backend):
    ax, ay, v = _scores_inputs(1, 3, 4, 2)
    q, k, _ = _qkv_inputs(1, 3, 4, 2)
    shift, bias = _scalars()
    for fn, tensors in ((_from_scores(backend), (ax, ay, v)), (_from_qkv(backend), (q, k, v))):
        out = fn(*tensors, shift, bias)
        (grad_bias,) = torch.autograd.grad(out, bias, torch.randn_like(out))
        assert grad_bias is not None and torch.equal(grad_bias, torch.zeros_like(bias))
        _close(out, fn(*tensors, shift, None), atol=1e-12, what="bias changes the output")


@pytest.mark.parametrize("backend", FAST)
def test_noncontiguous_inputs(backend):
    """Permuted and sliced views (channel-first conv outputs, strided features) and a strided
    output gradient give the same results as contiguous inputs."""
    b, h, w, d = 2, 5, 3, 6
    shift, bias = _scalars()
    ax = torch.randn(b, h, w, w, dtype=F64).transpose(2, 3).requires_grad_()          # strided rows
    ay = torch.randn(b, w, h, 2 * h, dtype=F64)[..., ::2].requires_grad_()              # sliced keys
    v = torch.randn(b, d, h, w, dtype=F64).permute(0, 2, 3, 1).requires_grad_()          # channel-first
    cot = torch.randn(b, w, h, d, dtype=F64).transpose(1, 2)                             # strided grad
    assert not (ax.is_contiguous() or ay.is_contiguous() or v.is_contiguous() or cot.is_contiguous())
    inputs = (ax, ay, v, shift, bias)
    ref_out, ref_grads = _forward_and_grads(_from_scores("reference"), inputs, cot)
    out, grads = _forward_and_grads(_from_scores(backend), inputs, cot)
    _close(out, ref_out, atol=1e-12, what="scores out")
    for g, rg in zip(grads[:4], ref_grads[:4]):
        _close(g, rg, atol=1e-11, what="scores grad")

    q = (torch.randn(b, d, h, w, dtype=F64) / 3).permute(0, 2, 3, 1).requires_grad_()
    k = torch.randn(b, h, w, 2 * d, dtype=F64)[..., 1::2].requires_grad_()
    v2 = torch.randn(b, w, h, d, dtype=F64).transpose(1, 2).requires_grad_()
    inputs = (q, k, v2, shift, bias)
    ref_out, ref_grads = _forward_and_grads(_from_qkv("reference"), inputs, cot)
    out, grads = _forward_and_grads(_from_qkv(backend), inputs, cot)
    _close(out, ref_out, atol=1e-12, what="qkv out")
    for g, rg in zip(grads[:4], ref_grads[:4]):
        _close(g, rg, atol=1e-11, what="qkv grad")


# ------------------------------------------------------------------------------------------------
# low precision: cpp error vs a float64 reference at most 2x the torch backend's own error
# ------------------------------------------------------------------------------------------------

def _max_errors(fn, inputs64, dtype, cot64, shift64):
    low = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    shift = shift64.detach().float().requires_grad_()  # a float32 parameter, as in MT-UNet
    out, grads = _forward_and_grads(lambda *ts: fn(*ts, None), (*low, shift), cot64.to(dtype))
    ref_out, ref_grads = _forward_and_grads(lambda *ts: fn.reference(*ts, None), (*inputs64, shift64), cot64)
    errs = [(out.double() - ref_out).abs().max().item()]
    errs += [(g.double() - rg).abs().max().item() / max(rg.abs().max().item(), 1e-30)
             for g, rg in zip(grads, ref_grads)]
    return out.dtype, errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("entry", ["scores", "qkv"])
def test_low_precision_error_within_twice_torch(entry, dtype):
    shape = (2, 6, 5, 24)
    make = _scores_inputs if entry == "scores" else _qkv_inputs
    inputs64 = make(*shape)
    shift64, _ = _scalars()
    cot64 = torch.randn(shape, dtype=F64)
    errors = {}
    for backend in ("torch", "cpp"):
        fn = _from_scores(backend) if entry == "scores" else _from_qkv(backend)
        fn.reference = _from_scores("reference") if entry == "scores" else _from_qkv("reference")
        out_dtype, errors[backend] = _max_errors(fn, inputs64, dtype, cot64, shift64)
        assert out_dtype == dtype
    eps = 2 * torch.finfo(dtype).eps
    names = ["out", "grad 0", "grad 1", "grad v", "grad shift"]
    for name, e_cpp, e_torch in zip(names, errors["cpp"], errors["torch"]):
        assert e_cpp <= 2 * e_torch + eps, f"{name}: cpp error {e_cpp:.3g} > 2 x torch error {e_torch:.3g} + {eps:.2g}"


# ------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, determinism
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (2, 2, 3, 1)])
def test_gradcheck_cpp(shape):
    ax, ay, v = _scores_inputs(*shape)
    q, k, _ = _qkv_inputs(*shape)
    shift, bias = _scalars()
    assert torch.autograd.gradcheck(_from_scores("cpp"), (ax, ay, v, shift, bias))
    assert torch.autograd.gradcheck(_from_qkv("cpp"), (q, k, v, shift, bias))


def _opcheck_samples():
    ax, ay, v = _scores_inputs(2, 3, 4, 5)
    q, k, _ = _qkv_inputs(2, 3, 4, 5)
    shift, _bias = _scalars()
    cot = torch.randn(2, 3, 4, 5, dtype=F64)
    _, lse_rows, lse_cols = GC.gaussian_axial_cpp_qkv_fwd(q.detach(), k.detach(), v.detach(), shift.detach(), None)
    d = lambda *ts: tuple(t.detach() for t in ts)  # noqa: E731
    return {
        "scores": (GC.gaussian_axial_cpp_scores_fwd, (ax, ay, v, shift, None)),
        "scores_backward": (GC.gaussian_axial_cpp_scores_bwd, (cot,) + d(ax, ay, v, shift) + (None,)),
        "qkv": (GC.gaussian_axial_cpp_qkv_fwd, (q, k, v, shift, None)),
        "qkv_backward": (GC.gaussian_axial_cpp_qkv_bwd, (cot,) + d(q, k, v, shift, lse_rows, lse_cols) + (None,)),
    }


@pytest.mark.parametrize("name", ["scores", "scores_backward", "qkv", "qkv_backward"])
def test_opcheck(name):
    op, args = _opcheck_samples()[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("entry", ["scores", "qkv"])
def test_compile_fullgraph_no_recompile(entry):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    eager = _from_scores("cpp") if entry == "scores" else _from_qkv("cpp")
    auto = _from_scores(None) if entry == "scores" else _from_qkv(None)
    compiled = torch.compile(auto, backend=counter, fullgraph=True)
    make = _scores_inputs if entry == "scores" else _qkv_inputs
    for _ in range(2):  # fresh inputs of the same shape: one compilation
        tensors = make(2, 4, 3, 5, dtype=torch.float32)
        shift, bias = _scalars(torch.float32)
        out = compiled(*tensors, shift, bias)
        grads = torch.autograd.grad(out, (*tensors, shift, bias), torch.ones_like(out))
        ref_out, ref_grads = _forward_and_grads(eager, (*tensors, shift, bias), torch.ones_like(out))
        _close(out, ref_out, atol=1e-6, rtol=1e-5, what="compiled out")
        for g, rg in zip(grads, ref_grads):
            _close(g, rg, atol=1e-5, rtol=1e-5, what="compiled grad")
    assert counter.frame_count == 1


def test_shift_gradient_is_deterministic_across_thread_counts():
    # Large enough that each pass splits into several tasks (the kernels run small grids inline).
    ax, ay, v = _scores_inputs(2, 16, 16, 128, dtype=torch.float32)
    q, k, _ = _qkv_inputs(2, 16, 16, 128, dtype=torch.float32)
    shift, _ = _scalars(torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out_s = _from_scores("cpp")(ax, ay, v, shift, None)
            out_q = _from_qkv("cpp")(q, k, v, shift, None)
            results.append(torch.autograd.grad(out_s.sum() + out_q.sum(), (shift, ax, ay, q, k, v)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# backend selection
# ------------------------------------------------------------------------------------------------

def test_forced_cpp_on_cpu_runs_and_auto_picks_cpp():
    ax, ay, v = _scores_inputs(1, 3, 4, 2)
    q, k, _ = _qkv_inputs(1, 3, 4, 2)
    shift, _ = _scalars()
    assert GA._op_scores.choose(ax, ay, v, shift, bias=None) == "cpp"
    assert GA._op_qkv.choose(q, k, v, shift, bias=None) == "cpp"
    with medattn_fast.use_backend("cpp"):
        out = MF.gaussian_axial_from_scores(ax, ay, v, shift)
    _close(out, MF.gaussian_axial_from_scores(ax, ay, v, shift, backend="torch"), atol=1e-12, what="cpp")


def test_forced_triton_raises_with_reason():
    # float64 CPU tensors: the Triton interpreter takes float32/bfloat16 only, and without it (a CUDA
    # machine) Triton needs CUDA tensors. The triton backend's own tests: test_gaussian_axial_triton.py.
    ax, ay, v = _scores_inputs(1, 3, 4, 2)
    shift, _ = _scalars()
    reason = "backend 'triton' cannot run this call: .*(float32/bfloat16|Triton needs CUDA tensors)"
    with pytest.raises(BackendUnavailable, match=reason):
        MF.gaussian_axial_from_scores(ax, ay, v, shift, backend="triton")
    with pytest.raises(BackendUnavailable, match=reason):
        MF.gaussian_axial_attention(ax[..., :2, :], ax[..., :2, :], ax[..., :2, :], shift, backend="triton")


def test_forced_cpp_on_non_cpu_tensors_raises_with_reason():
    q = torch.randn(1, 3, 4, 2, device="meta")
    shift = torch.ones(1, device="meta")
    with pytest.raises(BackendUnavailable, match="runs on CPU tensors, got device meta"):
        MF.gaussian_axial_attention(q, q, q, shift, backend="cpp")


# ------------------------------------------------------------------------------------------------
# bad inputs: one test per path, before any compute
# ------------------------------------------------------------------------------------------------

def _good_qkv():
    t = torch.randn(2, 3, 4, 5)
    return dict(q=t, k=t.clone(), v=t.clone(), shift=torch.ones(1))


def _good_scores():
    return dict(atten_x=torch.randn(2, 3, 4, 4), atten_y=torch.randn(2, 4, 3, 3), v=torch.randn(2, 3, 4, 5),
                shift=torch.ones(()))


BAD_QKV = {
    "rank": (dict(q=torch.randn(2, 12, 5)), ValueError, r"argument 'q' must have 4 dimensions, got 3"),
    "k_shape": (dict(k=torch.randn(2, 3, 4, 6)), ValueError,
                r"argument 'k' must have shape q.shape \(B, H, W, D\) = \(2, 3, 4, 5\), got \(2, 3, 4, 6\)"),
    "v_grid": (dict(v=torch.randn(2, 4, 3, 5)), ValueError, r"argument 'v' must have shape .* got \(2, 4, 3, 5\)"),
    "batch": (dict(v=torch.randn(3, 3, 4, 5)), ValueError, r"argument 'v' must have shape .*\(2, 3, 4, 5\), got \(3, 3, 4, 5\)"),
    "int_dtype": (dict(q=torch.ones(2, 3, 4, 5, dtype=torch.int64)), TypeError,
                  r"argument 'q' must be float32, float16, bfloat16 or float64, got torch.int64"),
    "dtype_mix": (dict(k=torch.randn(2, 3, 4, 5, dtype=F64)), TypeError, r"argument 'k' has dtype torch.float64"),
    "empty_tokens": (dict(q=torch.randn(2, 0, 4, 5), k=torch.randn(2, 0, 4, 5), v=torch.randn(2, 0, 4, 5)),
                     ValueError, r"argument 'q' must not have an empty dimension, got shape \(2, 0, 4, 5\)"),
    "shift_shape": (dict(shift=torch.ones(2)), ValueError,
                    r"argument 'shift' must be a 0-dim or shape-\(1,\) tensor, got shape \(2,\)"),
    "shift_type": (dict(shift=0.5), TypeError, r"argument 'shift' must be a 0-dim or shape-\(1,\) tensor, got float"),
    "bias_shape": (dict(bias=torch.ones(1, 1)), ValueError, r"argument 'bias' must be a 0-dim or shape-\(1,\)"),
    "not_tensor": (dict(v=[1.0]), TypeError, r"argument 'v' must be a torch.Tensor, got list"),
}

BAD_SCORES = {
    "rank": (dict(v=torch.randn(2, 3, 20)), ValueError, r"argument 'v' must have 4 dimensions, got 3"),
    "atten_x_shape": (dict(atten_x=torch.randn(2, 3, 4, 3)), ValueError,
                      r"argument 'atten_x' must have shape \(B, H, W, W\) from v = \(2, 3, 4, 4\), got \(2, 3, 4, 3\)"),
    "atten_y_shape": (dict(atten_y=torch.randn(2, 3, 4, 4)), ValueError,
                      r"argument 'atten_y' must have shape \(B, W, H, H\) from v = \(2, 4, 3, 3\), got \(2, 3, 4, 4\)"),
    "batch": (dict(atten_x=torch.randn(1, 3, 4, 4)), ValueError, r"argument 'atten_x' must have shape .* got \(1, 3, 4, 4\)"),
    "int_dtype": (dict(atten_y=torch.ones(2, 4, 3, 3, dtype=torch.int32)), TypeError,
                  r"argument 'atten_y' must be float32, float16, bfloat16 or float64, got torch.int32"),
    "dtype_mix": (dict(atten_x=torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)), TypeError,
                  r"argument 'atten_x' has dtype torch.bfloat16 but 'v' has torch.float32"),
    "empty_features": (dict(v=torch.randn(2, 3, 4, 0)), ValueError, r"argument 'v' must not have an empty dimension"),
    "shift_shape": (dict(shift=torch.ones(1, 1)), ValueError, r"argument 'shift' must be a 0-dim or shape-\(1,\) tensor"),
    "shift_int": (dict(shift=torch.ones(1, dtype=torch.int64)), TypeError, r"argument 'shift' must be a floating tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_QKV))
def test_bad_input_qkv(case):
    override, exc, match = BAD_QKV[case]
    kwargs = {**_good_qkv(), **override}
    with pytest.raises(exc, match=r"gaussian_axial_attention: " + match):
        MF.gaussian_axial_attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), kwargs.pop("shift"), **kwargs)


@pytest.mark.parametrize("case", sorted(BAD_SCORES))
def test_bad_input_scores(case):
    override, exc, match = BAD_SCORES[case]
    kwargs = {**_good_scores(), **override}
    with pytest.raises(exc, match=r"gaussian_axial_from_scores: " + match):
        MF.gaussian_axial_from_scores(kwargs.pop("atten_x"), kwargs.pop("atten_y"), kwargs.pop("v"),
                                      kwargs.pop("shift"), **kwargs)


@pytest.mark.parametrize("entry", ["scores", "qkv"])
def test_cpp_eager_path_equals_the_custom_op_bit_for_bit(entry):
    """Eager calls bypass the custom-op wrappers (dispatch overhead); results must not change."""
    from medattn_fast.ops import gaussian_axial as GA

    B, H, W, D = 2, 5, 7, 6
    if entry == "scores":
        inputs = [torch.randn(B, H, W, W), torch.randn(B, W, H, H), torch.randn(B, H, W, D)]
        eager, op = GC._ScoresEager.apply, lambda *a: GC.gaussian_axial_cpp_scores_fwd(*a, None)
    else:
        inputs = [torch.randn(B, H, W, D) for _ in range(3)]
        eager, op = GC._QkvEager.apply, lambda *a: GC.gaussian_axial_cpp_qkv_fwd(*a, None)[0]
    shift = torch.tensor([0.4])
    cot = torch.randn(B, H, W, D)
    results = []
    for fn in (eager, op):
        leaves = [t.clone().requires_grad_() for t in inputs + [shift]]
        out = fn(*leaves)
        out.backward(cot)
        results.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)

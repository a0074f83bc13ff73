"""attention_gate, fused backends (ops/_attention_gate_<backend>.py): ``cpp`` (csrc/cpu) in float64
with tight tolerances, ``triton`` under the interpreter in float32 on tiny shapes, and on a GPU
(``-m gpu``) ``triton`` and ``cuda`` in float32/bfloat16/float16.

Every comparison is against the ``reference`` backend (the seed module math, itself tested against
the seed modules in test_attention_gate.py) on a deep copy of one randomly initialised
AttentionBlock: forward (out and α), the gradients of x, g and every parameter, and the BN running
statistics after a training step.
"""
import copy

import pytest
import torch
from _helpers import randomize_batch_norms
from _tolerance import F64, assert_within_twice, gpu_device, max_errors, worse

import medattn_fast
import medattn_fast.functional as MF
from medattn_fast.functional import BatchNormParams
from medattn_fast.ops.attention_gate import GateParams
from medattn_fast.ops import _attention_gate_cpp, _attention_gate_triton
from medattn_fast.reference import attention_gate as R

TIGHT = dict(rtol=1e-9, atol=1e-11)
F32 = dict(rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def call(module: R.AttentionBlock, x, g, backend, **extra):
    return MF.attention_gate(
        x, g, module.Wx[0].weight, module.Wx[0].bias, module.Wg[0].weight, module.Wg[0].bias,
        module.psi[0].weight, module.psi[0].bias,
        bn_x=BatchNormParams.from_module(module.Wx[1]), bn_g=BatchNormParams.from_module(module.Wg[1]),
        bn_psi=BatchNormParams.from_module(module.psi[1]), training=module.training,
        double_sigmoid=module.double_sigmoid, return_alpha=True, backend=backend, **extra)


def make_block(nd, cx, cg, ci, *, training, dtype=F64, double_sigmoid=False, device="cpu"):
    block = R.AttentionBlock(cx, cg, ci, spatial_dims=nd, double_sigmoid=double_sigmoid)
    return randomize_batch_norms(block).to(device=device, dtype=dtype).train(training)


def run(module, x, g, backend, out_cot, alpha_cot, **extra):
    """Forward (out, α) and the gradients of x, g and every parameter for one backend."""
    x = x.detach().clone().requires_grad_()
    g = g.detach().clone().requires_grad_()
    out, alpha = call(module, x, g, backend, **extra)
    params = list(module.parameters())
    grads = torch.autograd.grad((out, alpha), [x, g, *params], (out_cot, alpha_cot), allow_unused=True)
    return out.detach(), alpha.detach(), grads


def compare(backend, nd, x_size, g_size, *, batch=2, cx=5, cg=6, ci=3, training, dtype=F64, tol=TIGHT,
            channels_last=False, double_sigmoid=False, device="cpu", reference_dtype=None):
    """``backend`` against ``reference`` on twin modules: out, α, every gradient, every buffer."""
    ref = make_block(nd, cx, cg, ci, training=training, dtype=reference_dtype or dtype,
                     double_sigmoid=double_sigmoid, device=device)
    twin = copy.deepcopy(ref).to(dtype)
    x = torch.randn(batch, cx, *x_size, device=device, dtype=dtype)
    g = torch.randn(batch, cg, *g_size, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    out_cot = torch.randn(batch, cx, *x_size, device=device, dtype=dtype)
    alpha_cot = torch.randn(batch, 1, *x_size, device=device, dtype=dtype)
    cast = (lambda t: t.to(reference_dtype)) if reference_dtype else (lambda t: t)
    want = run(ref, cast(x), cast(g), "reference", cast(out_cot), cast(alpha_cot))
    got = run(twin, x, g, backend, out_cot, alpha_cot)
    if channels_last:
        assert got[0].stride() == x.stride(), "out keeps x's memory format"
    names = ["out", "alpha", "grad x", "grad g"] + [f"grad {n}" for n, _ in ref.named_parameters()]
    for name, w, o in zip(names, [want[0], want[1], *want[2]], [got[0], got[1], *got[2]]):
        torch.testing.assert_close(o.to(w.dtype), w, **tol, msg=lambda m: f"{backend} {name}: {m}")
    for (name, a), (_, b) in zip(ref.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b.to(a.dtype), a, **tol, msg=lambda m: f"{backend} buffer {name}: {m}")
    return got


GEOMETRIES = {
    # nd, x spatial, g spatial
    "2d-same": (2, (6, 6), (6, 6)),
    "2d-odd": (2, (7, 9), (3, 4)),
    "3d-same": (3, (3, 4, 5), (3, 4, 5)),
    "3d-odd": (3, (5, 6, 7), (3, 3, 4)),
}


# ---------------------------------------------------------------------------------------------
# cpp, float64
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_cpp_matches_reference(geometry, training):
    nd, xs, gs = GEOMETRIES[geometry]
    compare("cpp", nd, xs, gs, training=training)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_cpp_batch_one_single_intermediate_channel_double_sigmoid(training):
    compare("cpp", 2, (7, 9), (3, 4), batch=1, cx=3, cg=2, ci=1, training=training, double_sigmoid=True)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("nd", [2, 3])
def test_cpp_channels_last(nd, training):
    xs, gs = ((7, 9), (3, 4)) if nd == 2 else ((3, 5, 6), (2, 3, 3))
    compare("cpp", nd, xs, gs, cx=9, training=training, channels_last=True)


def test_cpp_many_channels_and_tiles():
    """Cx not a multiple of the 4-channel unroll, more positions than one 64-position tile."""
    compare("cpp", 2, (13, 11), (5, 6), cx=11, cg=7, ci=6, training=True)


def test_cpp_strided_view_input():
    """x as a non-dense view (every other column of a wider buffer)."""
    ref = make_block(2, 4, 3, 2, training=False)
    twin = copy.deepcopy(ref)
    wide = torch.randn(2, 4, 7, 18, dtype=F64)
    x = wide[..., ::2]
    g = torch.randn(2, 3, 4, 5, dtype=F64)
    out_cot, alpha_cot = torch.randn(2, 4, 7, 9, dtype=F64), torch.randn(2, 1, 7, 9, dtype=F64)
    want = run(ref, x, g, "reference", out_cot, alpha_cot)
    got = run(twin, x, g, "cpp", out_cot, alpha_cot)
    for w, o in zip([want[0], want[1], *want[2]], [got[0], got[1], *got[2]]):
        torch.testing.assert_close(o, w, **TIGHT)


def _functional(backend, x, g, params, **kw):
    wx, bx, wg, bg, wp, bp = params
    return MF.attention_gate(x, g, wx, bx, wg, bg, wp, bp, backend=backend, return_alpha=True, **kw)


@pytest.mark.parametrize("variant", ["no-bn-no-bias", "bn-without-running-stats-eval", "momentum-none-train"])
def test_cpp_batch_norm_variants(variant):
    """BNs absent, BNs without running statistics (batch statistics also in eval), cumulative
    averaging (momentum=None): the plan's other branches."""
    cx, cg, ci = 4, 3, 3
    x, g = torch.randn(2, cx, 5, 7, dtype=F64), torch.randn(2, cg, 3, 4, dtype=F64)

    def params(bias):
        return [torch.randn(ci, cx, 1, 1, dtype=F64), torch.randn(ci, dtype=F64) if bias else None,
                torch.randn(ci, cg, 1, 1, dtype=F64), torch.randn(ci, dtype=F64) if bias else None,
                torch.randn(1, ci, 1, 1, dtype=F64), torch.randn(1, dtype=F64) if bias else None]

    def bns(tracking, momentum):
        out = []
        for c in (ci, ci, 1):
            bn = torch.nn.BatchNorm2d(c, track_running_stats=tracking, momentum=momentum).to(F64)
            out.append(randomize_batch_norms(bn) if tracking else bn)
        return out

    if variant == "no-bn-no-bias":
        base, training, modules = params(False), False, None
    elif variant == "bn-without-running-stats-eval":
        base, training, modules = params(True), False, bns(False, 0.1)
    else:
        base, training, modules = params(True), True, bns(True, None)
    results = {}
    for backend in ("reference", "cpp"):
        ps = [p.clone().requires_grad_() if p is not None else None for p in base]
        mods = copy.deepcopy(modules)
        kw = {} if mods is None else dict(zip(("bn_x", "bn_g", "bn_psi"), map(BatchNormParams.from_module, mods)))
        xr, gr = x.clone().requires_grad_(), g.clone().requires_grad_()
        out, alpha = _functional(backend, xr, gr, ps, training=training, **kw)
        leaves = [xr, gr] + [p for p in ps if p is not None]
        grads = torch.autograd.grad((out * torch.arange(out.numel(), dtype=F64).view_as(out).sin()).sum()
                                    + alpha.square().sum(), leaves)
        buffers = [] if mods is None else [b.clone() for m in mods for b in m.buffers()]
        results[backend] = [out, alpha, *grads, *buffers]
    for w, o in zip(results["reference"], results["cpp"]):
        torch.testing.assert_close(o, w, **TIGHT)


def test_cpp_low_precision_close_to_pytorch():
    """bfloat16/float16: the fused result is no farther from float64 than PyTorch's own
    reference in that dtype (twice its error, plus one unit in the last place)."""
    for dtype, ulp in ((torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)):
        ref64 = make_block(2, 8, 6, 4, training=False)
        low_ref, low_cpp = copy.deepcopy(ref64).to(dtype), copy.deepcopy(ref64).to(dtype)
        x = torch.randn(2, 8, 9, 10, dtype=F64)
        g = torch.randn(2, 6, 5, 5, dtype=F64)
        exact = call(ref64, x, g, "reference")[0]
        torch_err = (call(low_ref, x.to(dtype), g.to(dtype), "reference")[0].double() - exact).abs().max()
        fused_err = (call(low_cpp, x.to(dtype), g.to(dtype), "cpp")[0].double() - exact).abs().max()
        assert fused_err <= 2 * torch_err + ulp * exact.abs().max(), (dtype, fused_err, torch_err)


def test_cpp_deterministic_across_thread_counts():
    ref = make_block(2, 6, 4, 3, training=True, dtype=torch.float32)
    x, g = torch.randn(2, 6, 17, 15), torch.randn(2, 4, 8, 7)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            m = copy.deepcopy(ref)
            results.append(run(m, x, g, "cpp", torch.ones(2, 6, 17, 15), torch.ones(2, 1, 17, 15)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip([results[0][0], *results[0][2]], [results[1][0], *results[1][2]]):
        assert torch.equal(a, b)


def test_triton_predicate_refuses_float64_with_reason():
    block = make_block(2, 4, 3, 2, training=False)
    x, g = torch.randn(1, 4, 5, 5, dtype=F64), torch.randn(1, 3, 3, 3, dtype=F64)
    with pytest.raises(medattn_fast.BackendUnavailable, match="float64"):
        call(block, x, g, "triton")


def test_auto_prefers_cpp_on_cpu():
    block = make_block(2, 4, 3, 2, training=False)
    x, g = torch.randn(1, 4, 5, 5, dtype=F64), torch.randn(1, 3, 3, 3, dtype=F64)
    kw = dict(mode="additive", double_sigmoid=False, return_alpha=False)
    args = (x, g, GateParams(block.Wx[0].weight, block.Wx[0].bias, block.Wg[0].weight, block.Wg[0].bias,
                             block.psi[0].weight, block.psi[0].bias))
    from medattn_fast.ops.attention_gate import _op

    assert _op.choose(*args, **kw) == "cpp"


def test_static_order_takes_cpp_for_a_cpu_training_step_too(monkeypatch):
    """With the autotune off (conftest's default for the suite) ``auto`` takes the static order, cpp, in
    training too: the hand-measured training-step preference for torch is gone, the autotune measures it
    (tests/test_autotune.py); with it on, a training step and an eval call are measured under keys of their
    own (the gate's ``tune_key``: train/eval)."""
    monkeypatch.setenv("MEDATTN_AUTOTUNE", "0")
    block = make_block(2, 4, 3, 2, training=True)
    x = torch.randn(1, 4, 5, 5, dtype=F64, requires_grad=True)
    g = torch.randn(1, 3, 3, 3, dtype=F64)
    bn = [BatchNormParams.from_module(m) for m in (block.Wx[1], block.Wg[1], block.psi[1])]
    kw = dict(mode="additive", double_sigmoid=False, return_alpha=False)
    params = GateParams(block.Wx[0].weight, block.Wx[0].bias, block.Wg[0].weight, block.Wg[0].bias,
                        block.psi[0].weight, block.psi[0].bias, *bn)
    from medattn_fast.ops._families import _gate_tune_key
    from medattn_fast.ops.attention_gate import _op

    assert _op.choose(x, g, params, **kw) == "cpp"
    eval_params = params._replace(bn_x=bn[0]._replace(training=False), bn_g=bn[1]._replace(training=False),
                                  bn_psi=bn[2]._replace(training=False))
    assert _op.choose(x, g, eval_params, **kw) == "cpp"
    assert (_gate_tune_key(x, g, params), _gate_tune_key(x, g, eval_params)) == ("train", "eval")


# ---------------------------------------------------------------------------------------------
# custom ops: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------

def _op_samples(backend, dtype, device="cpu"):
    x = torch.randn(2, 5, 7, 9, dtype=dtype, device=device, requires_grad=True)
    G = torch.randn(2, 3, 3, 4, dtype=dtype if dtype == F64 else torch.float32, device=device, requires_grad=True)
    acc = G.dtype
    params = [torch.randn(3, 5, dtype=acc, device=device, requires_grad=True),
              torch.randn(3, dtype=acc, device=device, requires_grad=True),
              torch.randn(3, dtype=acc, device=device, requires_grad=True),
              torch.randn(1, dtype=acc, device=device, requires_grad=True)]
    d = [t.detach() for t in (x, G, *params)]
    kernels = {"cpp": _attention_gate_cpp.KERNELS, "triton": _attention_gate_triton.KERNELS}[backend]
    return {
        "forward": (kernels.forward, (x, G, *params, True)),
        "logits": (kernels.logits, (x, G, *params)),
        "backward_output": (kernels.backward, (*d, None, torch.randn_like(d[0]),
                                               torch.randn(2, 1, 7, 9, dtype=dtype, device=device), False)),
        "backward_logits": (kernels.backward, (*d, torch.randn(2, 1, 7, 9, dtype=acc, device=device), None, None,
                                               False)),
    }


@pytest.mark.parametrize("name", ["forward", "logits", "backward_output", "backward_logits"])
def test_opcheck_cpp(name):
    op, args = _op_samples("cpp", F64)[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["forward", "logits", "backward_output", "backward_logits"])
def test_opcheck_triton(name):
    op, args = _op_samples("triton", torch.float32)[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_gradcheck_cpp_custom_ops():
    """Finite differences of both fused ops on a tiny case (x 1×3×4×5, G 1×2×2×3, double sigmoid)."""
    leaf = lambda *shape: torch.randn(*shape, dtype=F64, requires_grad=True)  # noqa: E731
    tensors = (leaf(1, 3, 4, 5), leaf(1, 2, 2, 3), leaf(2, 3), leaf(2), leaf(2), leaf(1))
    kernels = _attention_gate_cpp.KERNELS
    assert torch.autograd.gradcheck(lambda *ts: kernels.forward(*ts, True), tensors)
    assert torch.autograd.gradcheck(kernels.logits, tensors)


def assert_compiles_once_and_matches_eager(gate, block, x_shape, g_shape):
    """``torch.compile(fullgraph=True)`` of ``gate(block, x, g, "cpp")`` on fresh inputs of one
    shape, twice: one compilation, and out, α, the gradients and the BN buffers equal eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    eager_block = copy.deepcopy(block)
    compiled = torch.compile(lambda x, g: gate(block, x, g, "cpp"), backend=counter, fullgraph=True)
    for _ in range(2):
        x, g = torch.randn(*x_shape, requires_grad=True), torch.randn(*g_shape, requires_grad=True)
        out, alpha = compiled(x, g)
        grads = torch.autograd.grad(out.sum() + alpha.sum(), (x, g))
        xe, ge = x.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
        out_e, alpha_e = gate(eager_block, xe, ge, "cpp")
        grads_e = torch.autograd.grad(out_e.sum() + alpha_e.sum(), (xe, ge))
        for a, b in zip((out, alpha, *grads), (out_e, alpha_e, *grads_e)):
            torch.testing.assert_close(a, b, **F32)
    for a, b in zip(block.buffers(), eager_block.buffers()):
        torch.testing.assert_close(a, b, **F32)
    assert counter.frame_count == 1


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compile_fullgraph_twice_no_recompile_cpp(training):
    block = make_block(2, 6, 4, 3, training=training, dtype=torch.float32)
    assert_compiles_once_and_matches_eager(call, block, (2, 6, 7, 9), (2, 4, 3, 4))


# ---------------------------------------------------------------------------------------------
# triton under the interpreter (float32, tiny shapes)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("geometry", ["2d-odd", "3d-odd", "2d-same"])
def test_triton_interpreter_matches_reference(geometry, training):
    nd, xs, gs = GEOMETRIES[geometry]
    if nd == 3:
        xs, gs = (3, 4, 5), (2, 2, 3)
    compare("triton", nd, xs, gs, training=training, dtype=torch.float32, tol=F32, reference_dtype=F64)


@pytest.mark.parametrize("nd", [2, 3])
def test_triton_interpreter_double_sigmoid_through_the_forward_kernel(nd):
    """double_sigmoid where the backward differentiates both sigmoids itself: every BN in eval mode
    (folded), so the fused forward kernel runs and its backward recomputes q (a batch-statistics
    ψ-BN takes the logits path instead, whose sigmoids are autograd's)."""
    xs, gs = ((7, 9), (3, 4)) if nd == 2 else ((3, 4, 5), (2, 2, 3))
    compare("triton", nd, xs, gs, training=False, dtype=torch.float32, tol=F32, double_sigmoid=True,
            reference_dtype=F64)


def test_triton_interpreter_channels_last_batch_one_single_channel():
    compare("triton", 2, (7, 9), (3, 4), batch=1, cx=3, cg=2, ci=1, training=True, dtype=torch.float32, tol=F32,
            channels_last=True, double_sigmoid=True, reference_dtype=F64)


@pytest.mark.parametrize("block_p", [16, 32, 64])
def test_triton_block_size_sweep_matches_cpp(block_p):
    """The launch functions with explicit positions-per-program against the cpp kernels."""
    import medattn_fast.triton_kernels.attention_gate as TG
    from medattn_fast import _build

    ext = _build.load("cpu", "attention_gate")
    x = torch.randn(2, 6, 7, 9)
    G = torch.randn(2, 3, 3, 4)
    W, b, w, c = torch.randn(3, 6), torch.randn(3), torch.randn(3), torch.randn(1)
    out, alpha = TG.gate_forward(x, G, W, b, w, c, False, block_p=block_p)
    want_out, want_alpha = ext.gate_forward(x, G, W, b, w, c, False)
    torch.testing.assert_close(out, want_out, **F32)
    torch.testing.assert_close(alpha, want_alpha, **F32)
    gq = torch.randn(2, 1, 7, 9)
    got = TG.gate_backward(x, G, W, b, w, c, gq, None, None, False, block_p=block_p)
    want = ext.gate_backward(x, G, W, b, w, c, gq, None, None, False)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **F32)


# ---------------------------------------------------------------------------------------------
# grid mode (Oktay's GridAttentionBlock): logits pass on θ·x, fused output pass
# ---------------------------------------------------------------------------------------------

def grid_call(module: R.GridAttentionBlock, x, g, backend):
    return MF.attention_gate(
        x, g, module.theta.weight, None, module.phi.weight, module.phi.bias, module.psi.weight, module.psi.bias,
        out_weight=module.W[0].weight, out_bias=module.W[0].bias, bn_out=BatchNormParams.from_module(module.W[1]),
        training=module.training, mode="grid", return_alpha=True, backend=backend)


def compare_grid(backend, x_size, g_size, factor, *, batch=2, cx=5, cg=6, ci=3, training, dtype=F64, tol=TIGHT,
                 channels_last=False, reference_dtype=None, device="cpu"):
    """``backend`` against ``reference`` on twin GridAttentionBlocks: out, α, every gradient, every buffer."""
    nd = len(x_size)
    ref = R.GridAttentionBlock(cx, cg, ci, spatial_dims=nd, sub_sample_factor=factor)
    ref = randomize_batch_norms(ref).to(device=device, dtype=reference_dtype or dtype).train(training)
    twin = copy.deepcopy(ref).to(dtype)
    x = torch.randn(batch, cx, *x_size, device=device, dtype=dtype)
    g = torch.randn(batch, cg, *g_size, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    cots = torch.randn(batch, cx, *x_size, device=device, dtype=dtype), torch.randn(batch, 1, *x_size, device=device,
                                                                                     dtype=dtype)
    cast = (lambda t: t.to(reference_dtype)) if reference_dtype else (lambda t: t)

    def one(module, x, g, backend, cots):
        x, g = x.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
        out, alpha = grid_call(module, x, g, backend)
        grads = torch.autograd.grad((out, alpha), [x, g, *module.parameters()], cots)
        return [out.detach(), alpha.detach(), *grads]

    want = one(ref, cast(x), cast(g), "reference", [cast(c) for c in cots])
    got = one(twin, x, g, backend, cots)
    if channels_last:
        assert got[0].stride() == x.stride(), "out keeps x's memory format"
    names = ["out", "alpha", "grad x", "grad g"] + [f"grad {n}" for n, _ in ref.named_parameters()]
    for name, w, o in zip(names, want, got):
        torch.testing.assert_close(o.to(w.dtype), w, **tol, msg=lambda m: f"{backend} grid {name}: {m}")
    for (name, a), (_, b) in zip(ref.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b.to(a.dtype), a, **tol, msg=lambda m: f"{backend} grid buffer {name}: {m}")


GRID_GEOMETRIES = {
    # x spatial, g spatial, sub_sample_factor
    "2d-odd": ((9, 11), (3, 4), 2),             # coarse grid (4, 5), g upsampled to it, α upsampled to x
    "2d-anisotropic": ((7, 12), (3, 4), (2, 3)),
    "2d-same-grid": ((8, 10), (4, 5), 2),       # Sg == coarse grid
    "3d-odd": ((5, 6, 7), (2, 3, 3), 2),
    "3d-full-depth-g": ((6, 4, 5), (2, 2, 5), 2),   # g deeper than the grid (3, 2, 2): downsampled in depth
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("geometry", list(GRID_GEOMETRIES))
def test_cpp_grid_matches_reference(geometry, training):
    compare_grid("cpp", *GRID_GEOMETRIES[geometry], training=training)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_cpp_grid_channels_last_many_channels(training):
    """More channels than one 16-lane block and positions than one 64-position tile, channels_last."""
    compare_grid("cpp", (17, 15), (4, 5), 2, cx=19, cg=5, ci=7, training=training, channels_last=True)


def test_cpp_grid_every_batch_norm():
    """Grid mode with a BN after every projection (the op allows one on θ, φ and ψ too; Oktay's
    block has only ``W``'s): batch statistics in training, the running-stat updates."""
    cx, cg, ci = 4, 3, 3
    x, g = torch.randn(2, cx, 9, 8, dtype=F64), torch.randn(2, cg, 3, 4, dtype=F64)
    base = [torch.randn(ci, cx, 2, 2, dtype=F64), torch.randn(ci, dtype=F64), torch.randn(ci, cg, 1, 1, dtype=F64),
            torch.randn(ci, dtype=F64), torch.randn(1, ci, 1, 1, dtype=F64), torch.randn(1, dtype=F64),
            torch.randn(cx, cx, 1, 1, dtype=F64), torch.randn(cx, dtype=F64)]
    norms = [randomize_batch_norms(torch.nn.BatchNorm2d(c).to(F64)) for c in (ci, ci, 1, cx)]
    results = {}
    for backend in ("reference", "cpp"):
        ps = [p.clone().requires_grad_() for p in base]
        mods = copy.deepcopy(norms)
        bn = dict(zip(("bn_x", "bn_g", "bn_psi", "bn_out"), map(BatchNormParams.from_module, mods)))
        xr, gr = x.clone().requires_grad_(), g.clone().requires_grad_()
        out, alpha = _functional(backend, xr, gr, ps[:6], out_weight=ps[6], out_bias=ps[7], training=True,
                                 mode="grid", **bn)
        weights = torch.arange(out.numel(), dtype=F64).view_as(out).sin()
        grads = torch.autograd.grad((out * weights).sum() + alpha.square().sum(),
                                    [xr, gr, *ps, *(p for m in mods for p in m.parameters())])
        results[backend] = [out, alpha, *grads, *(b.clone() for m in mods for b in m.buffers())]
    for w, o in zip(results["reference"], results["cpp"]):
        torch.testing.assert_close(o, w, **TIGHT)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("geometry", ["2d-odd", "3d-odd", "3d-full-depth-g"])
def test_triton_interpreter_grid_matches_reference(geometry, training):
    compare_grid("triton", *GRID_GEOMETRIES[geometry], training=training, dtype=torch.float32, tol=F32,
                 reference_dtype=F64)


@pytest.mark.parametrize("block_p", [16, 64])
def test_triton_project_sweep_matches_cpp(block_p):
    """The output pass with more channels than one 64-channel block (two K and two output blocks)."""
    import medattn_fast.triton_kernels.attention_gate as TG
    from medattn_fast import _build

    ext = _build.load("cpu", "attention_gate")
    x = torch.randn(2, 70, 5, 7).to(memory_format=torch.channels_last)
    alpha, W, b = torch.rand(2, 1, 5, 7), torch.randn(70, 70) / 8, torch.randn(70)
    torch.testing.assert_close(TG.gate_project(x, alpha, W, b, block_p=block_p), ext.gate_project(x, alpha, W, b),
                               **F32)
    go = torch.randn(2, 70, 5, 7)
    for got, want in zip(TG.gate_project_backward(x, alpha, W, go, block_p=block_p),
                         ext.gate_project_backward(x, alpha, W, go)):
        torch.testing.assert_close(got, want, **F32)


def _project_samples(dtype):
    x = torch.randn(2, 5, 7, 9, dtype=dtype, requires_grad=True)
    acc = F64 if dtype == F64 else torch.float32
    alpha = torch.rand(2, 1, 7, 9, dtype=acc, requires_grad=True)
    W, b = torch.randn(5, 5, dtype=acc, requires_grad=True), torch.randn(5, dtype=acc, requires_grad=True)
    return (x, alpha, W, b, None)   # fp32_precision None: KernelConfig's default


def test_opcheck_cpp_project():
    kernels = _attention_gate_cpp.KERNELS
    x, alpha, W, b, precision = _project_samples(F64)
    torch.library.opcheck(kernels.project, (x, alpha, W, b, precision))
    assert torch.autograd.gradcheck(lambda *ts: kernels.project(*ts, precision), (x, alpha, W, b))


def test_opcheck_triton_project():
    torch.library.opcheck(_attention_gate_triton.KERNELS.project, _project_samples(torch.float32),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compile_fullgraph_twice_no_recompile_cpp_grid():
    block = randomize_batch_norms(R.GridAttentionBlock(6, 4, 3, sub_sample_factor=2)).train(True)
    assert_compiles_once_and_matches_eager(grid_call, block, (2, 6, 9, 10), (2, 4, 3, 4))


# ---------------------------------------------------------------------------------------------
# GPU (-m gpu)
# ---------------------------------------------------------------------------------------------

def assert_within_pytorch_error(block64, gate, x, g, cots, backend, dtype):
    """Every result of ``gate(block, x, g, backend)`` in ``dtype`` — out, α, the gradients of x, g
    and every parameter — within the shared rule (tests/_tolerance.py) of the float64 result.

    The yardstick is the worst of three errors no implementation in ``dtype`` is expected to beat:
    the ``reference`` and ``torch`` backends in that dtype, and the exact (float64) function of the
    dtype-rounded inputs, parameters and cotangents. The last matters for gradients that sum many
    terms which nearly cancel (ψ's BN weight in eval, a bias before a batch-statistics BN, exactly
    0 in exact arithmetic): rounding the inputs alone moves them by more than either backend's own
    error happens to on a given draw."""

    def results(backend, dtype, rounded_to=None):
        module = copy.deepcopy(block64).to(rounded_to or dtype).to(dtype)
        cast = (lambda t: t.to(rounded_to).to(dtype)) if rounded_to else (lambda t: t.to(dtype))  # noqa: E731
        xl, gl = cast(x).requires_grad_(), cast(g).requires_grad_()
        out, alpha = gate(module, xl, gl, backend)
        grads = torch.autograd.grad((out, alpha), [xl, gl, *module.parameters()], [cast(c) for c in cots])
        return [out, alpha, *grads]

    exact = results("reference", F64)
    yardstick = max_errors(results("reference", dtype), exact)
    yardstick = worse(yardstick, max_errors(results("torch", dtype), exact))
    if dtype != torch.float32:
        yardstick = worse(yardstick, max_errors(results("reference", F64, rounded_to=dtype), exact))
    names = ["out", "alpha", "grad x", "grad g"] + [f"grad {n}" for n, _ in block64.named_parameters()]
    assert_within_twice(results(backend, dtype), yardstick, exact, dtype, names, f"{backend} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("geometry", ["2d-odd", "3d-odd"])
def test_gpu_matches_pytorch_error(backend, dtype, training, geometry):
    nd, xs, gs = GEOMETRIES[geometry]
    block64 = make_block(nd, 32, 48, 16, training=training, device=gpu_device())
    x = torch.randn(2, 32, *xs, device=gpu_device(), dtype=F64)
    g = torch.randn(2, 48, *gs, device=gpu_device(), dtype=F64)
    cots = torch.randn_like(x), torch.randn(2, 1, *xs, device=gpu_device(), dtype=F64)
    assert_within_pytorch_error(block64, call, x, g, cots, backend, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("nd", [2, 3])
def test_gpu_grid_matches_pytorch_error(backend, nd, dtype, training):
    xs, gs = ((33, 30), (8, 7)) if nd == 2 else ((9, 10, 11), (2, 3, 3))
    block64 = randomize_batch_norms(R.GridAttentionBlock(32, 48, 16, spatial_dims=nd, sub_sample_factor=2))
    block64 = block64.to(device=gpu_device(), dtype=F64).train(training)
    x = torch.randn(2, 32, *xs, device=gpu_device(), dtype=F64)
    g = torch.randn(2, 48, *gs, device=gpu_device(), dtype=F64)
    cots = torch.randn_like(x), torch.randn(2, 1, *xs, device=gpu_device(), dtype=F64)
    assert_within_pytorch_error(block64, grid_call, x, g, cots, backend, dtype)

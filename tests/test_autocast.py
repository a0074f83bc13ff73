"""AMP autocast: ops cast their float32 inputs to the autocast dtype (like SDPA), run their backend
with autocast off (float32 accumulation stays the backend's business), return the autocast dtype;
the gate keeps float32 parameters and BatchNorm state and returns the features' dtype."""
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

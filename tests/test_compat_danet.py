"""compat.danet (PAM_Module, CAM_Module, DANetHead) against the originals (faithful reimplementations): strict
loading, same outputs and gradients (inputs and every parameter, BN running stats in train mode),
from_original, and nn.DualAttention against DANetHead."""
import pytest
import torch
from torch import nn

from medattn_fast.compat import danet as compat
from medattn_fast.nn.attention import DualAttention
from medattn_fast.reference import danet as ref

F64 = torch.float64


def _grads(out, tensors, cotangent):
    return torch.autograd.grad(out, tensors, cotangent, allow_unused=True)


def _randomise(module: nn.Module) -> nn.Module:
    """Non-trivial parameters (gamma starts at 0, BN at identity) and running statistics."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn_like(p))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return module


def _assert_same_forward_backward(original, fast, inputs):
    torch.testing.assert_close(fast.state_dict(), original.state_dict(), rtol=0, atol=0)
    torch.manual_seed(1)
    ref_out = original(*inputs)
    torch.manual_seed(1)
    out = fast(*inputs)
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    out = out if isinstance(out, tuple) else (out,)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    cots = [torch.randn_like(t) for t in ref_out]
    ref_loss = sum((t * c).sum() for t, c in zip(ref_out, cots))
    loss = sum((t * c).sum() for t, c in zip(out, cots))
    ref_leaves = (*inputs, *original.parameters())
    leaves = (*inputs, *fast.parameters())
    for a, b in zip(_grads(loss, leaves, None), _grads(ref_loss, ref_leaves, None)):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # BN running statistics (train mode) move the same way
    torch.testing.assert_close(fast.state_dict(), original.state_dict(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels,spatial", [(8, (5, 7)), (24, (3, 11)), (16, (1, 1))],
                         ids=["C8_dk1", "C24_prime", "N1"])
def test_pam_module_strict_load_same_outputs_and_grads(channels, spatial):
    original = _randomise(ref.PAM_Module(channels).double())
    fast = compat.PAM_Module(channels).double()
    fast.load_state_dict(original.state_dict(), strict=True)
    fast.chunk_size = 4   # several chunks, not dividing N
    x = torch.randn(2, channels, *spatial, dtype=F64, requires_grad=True)
    _assert_same_forward_backward(original, fast, (x,))


@pytest.mark.parametrize("batch", [1, 3])
def test_cam_module_strict_load_same_outputs_and_grads(batch):
    original = _randomise(ref.CAM_Module(7).double())
    fast = compat.CAM_Module(7).double()
    fast.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(batch, 7, 5, 3, dtype=F64, requires_grad=True)
    _assert_same_forward_backward(original, fast, (x,))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_danet_head_strict_load_same_outputs_and_grads(train):
    original = _randomise(ref.DANetHead(32, 5).double()).train(train)
    fast = compat.DANetHead(32, 5).double().train(train)
    fast.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(2, 32, 6, 5, dtype=F64, requires_grad=True)
    _assert_same_forward_backward(original, fast, (x,))


def test_state_dict_keys_are_the_originals():
    assert list(compat.PAM_Module(16).state_dict()) == list(ref.PAM_Module(16).state_dict())
    assert list(compat.CAM_Module(16).state_dict()) == ["gamma"]
    keys = list(compat.DANetHead(64, 3).state_dict())
    assert keys == list(ref.DANetHead(64, 3).state_dict())
    assert {"conv5a.0.weight", "conv5a.1.running_var", "sa.query_conv.weight", "sc.gamma",
            "conv51.0.weight", "conv6.1.weight", "conv8.1.bias"} <= set(keys)
    assert compat.COMPAT_CLASSES == {"PAM_Module": compat.PAM_Module, "CAM_Module": compat.CAM_Module,
                                     "DANetHead": compat.DANetHead}


@pytest.mark.parametrize("name", ["PAM_Module", "CAM_Module", "DANetHead"])
def test_from_original(name):
    args = (32, 4) if name == "DANetHead" else (16,)
    original = _randomise(getattr(ref, name)(*args)).double().eval()
    if name == "DANetHead":
        original.conv6.train()   # mixed training flags are copied module by module
    fast = compat.COMPAT_CLASSES[name].from_original(original)
    assert type(fast) is compat.COMPAT_CLASSES[name]
    assert next(fast.parameters()).dtype == F64
    flags = {n: m.training for n, m in original.named_modules()}   # (it also has a stateless Softmax)
    assert {n: m.training for n, m in fast.named_modules()} == {n: flags[n] for n, _ in fast.named_modules()}
    if name == "DANetHead":
        assert fast.conv6.training and not fast.conv7.training and not fast.training
    torch.testing.assert_close(fast.state_dict(), original.state_dict(), rtol=0, atol=0)
    channels = args[0]
    x = torch.randn(2, channels, 4, 6, dtype=F64)
    torch.manual_seed(3)
    expected = original(x)
    torch.manual_seed(3)
    got = fast(x)
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-11)


def test_from_original_keeps_the_originals_norm_layer():
    original = ref.DANetHead(64, 2, norm_layer=lambda c: nn.GroupNorm(2, c))
    fast = compat.DANetHead.from_original(original)
    assert isinstance(fast.conv5a[1], nn.GroupNorm) and fast.conv5a[1].num_groups == 2
    x = torch.randn(1, 64, 5, 4)
    for a, b in zip(fast.eval()(x), original.eval()(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compat_pam_rejects_5d_input():
    with pytest.raises(ValueError, match=r"PAM_Module: input must be \(B, C, H, W\), got shape \(1, 16, 2, 3, 4\)"):
        compat.PAM_Module(16)(torch.randn(1, 16, 2, 3, 4))


def test_compat_cam_rejects_non_tensor():
    with pytest.raises(TypeError, match=r"CAM_Module: input must be a torch.Tensor, got list"):
        compat.CAM_Module(4)([1.0])


def test_compat_pam_float16_runs_and_matches_float32():
    original = _randomise(ref.PAM_Module(16))
    fast = compat.PAM_Module.from_original(original)
    x = torch.randn(2, 16, 9, 8)
    out16 = compat.PAM_Module.from_original(original.half())(x.half())
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.float(), fast(x), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------
# nn.DualAttention is the DANet head with clean names
# ------------------------------------------------------------------------------------------------
_DUAL_KEYS = {"conv5a": "position_stem", "conv5c": "channel_stem", "conv51": "position_conv",
              "conv52": "channel_conv", "conv6": "classify_position", "conv7": "classify_channel",
              "conv8": "classify_fused", "sc": "channel"}


def _danet_head_to_dual(state):
    out = {}
    for key, value in state.items():
        head, rest = key.split(".", 1)
        if head == "sa":   # PAM 1×1 convs -> (out, in) matrices of nn.PositionAttention
            rest = rest.replace("query_conv", "query").replace("key_conv", "key").replace("value_conv", "value")
            out["position." + rest] = value.flatten(1) if value.dim() == 4 else value
        else:
            out[_DUAL_KEYS[head] + "." + rest] = value
    return out


def test_nn_dual_attention_matches_danet_head():
    original = _randomise(ref.DANetHead(32, 3).double()).train()   # inter 8: C/8 = 1
    dual = DualAttention(32, 3, chunk_size=5).double().train()
    dual.load_state_dict(_danet_head_to_dual(original.state_dict()), strict=True)
    x = torch.randn(2, 32, 5, 6, dtype=F64, requires_grad=True)
    torch.manual_seed(5)
    expected = original(x)
    torch.manual_seed(5)
    got = dual(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    cot = [torch.randn_like(t) for t in expected]
    g = torch.autograd.grad(sum((t * c).sum() for t, c in zip(got, cot)), x)[0]
    g_ref = torch.autograd.grad(sum((t * c).sum() for t, c in zip(expected, cot)), x)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_nn_dual_attention_3d():
    dual = DualAttention(16, 2, spatial_dims=3).eval()
    with torch.no_grad():
        dual.position.gamma.fill_(0.5)
        dual.channel.gamma.fill_(0.5)
    x = torch.randn(1, 16, 3, 4, 5, requires_grad=True)
    fused, position, channel = dual(x)
    assert fused.shape == position.shape == channel.shape == (1, 2, 3, 4, 5)
    fused.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert dual.position.gamma.grad is not None and dual.channel.gamma.grad is not None


def test_nn_dual_attention_wrong_rank():
    with pytest.raises(ValueError, match=r"DualAttention: expected a 4-dim input \(spatial_dims=2\), got shape \(1, 16, 2, 3, 4\)"):
        DualAttention(16, 2)(torch.randn(1, 16, 2, 3, 4))

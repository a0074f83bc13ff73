"""compat.guided_attention (Multi-Scale Guided Attention) against the
originals, 2D and 3D: strict
loading, same outputs and gradients (inputs, every conv weight, BN running stats in train mode),
the quirks (V @ A, unused pam), from_original, bad inputs."""
import pytest
import torch

from medattn_fast.compat import guided_attention as compat
from medattn_fast.reference import guided_attention as ref

F64 = torch.float64
SPATIAL = {2: (5, 7), 3: (3, 4, 5)}


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn_like(p))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return module


def _compare(original, fast, inputs):
    torch.testing.assert_close(fast.state_dict(), original.state_dict(), rtol=0, atol=0)
    expected, got = original(*inputs), fast(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-11)
    cot = torch.randn_like(expected)
    leaves_ref = (*inputs, *original.parameters())
    leaves = (*inputs, *fast.parameters())
    g_ref = torch.autograd.grad(expected, leaves_ref, cot, allow_unused=True)
    g = torch.autograd.grad(got, leaves, cot, allow_unused=True)
    for (name, _), a, b in zip([("input", None)] * len(inputs) + list(fast.named_parameters()), g, g_ref):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    torch.testing.assert_close(fast.state_dict(), original.state_dict(), rtol=1e-12, atol=1e-12)
    return g


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", [8, 24], ids=["C8_dk1", "C24"])
def test_position_attention_module(spatial_dims, channels):
    original = _randomise(ref.PositionAttentionModule(channels, spatial_dims=spatial_dims).double())
    fast = compat.PositionAttentionModule(channels, spatial_dims=spatial_dims).double()
    fast.load_state_dict(original.state_dict(), strict=True)
    fast.chunk_size = 6
    x = torch.randn(2, channels, *SPATIAL[spatial_dims], dtype=F64, requires_grad=True)
    _compare(original, fast, (x,))


def test_position_attention_module_is_v_times_a_untransposed():
    module = _randomise(ref.PositionAttentionModule(8).double())
    x = torch.randn(1, 8, 3, 4, dtype=F64)
    q = module.first_branch_conv(x).flatten(2)
    k = module.second_branch_conv(x).flatten(2)
    v = module.third_branch_conv(x).flatten(2)
    a = torch.softmax(q.transpose(1, 2) @ k, dim=-1)          # rows sum to 1
    expected = module.output_conv((v @ a).reshape(x.shape) * x)  # o_j = Σ_i A_ij v_i
    torch.testing.assert_close(module(x), expected)
    assert not torch.allclose(v @ a, v @ a.transpose(1, 2))   # the quirk matters


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_channel_attention_module(spatial_dims, batch):
    original = _randomise(ref.ChannelAttentionModule(6, spatial_dims=spatial_dims).double())
    fast = compat.ChannelAttentionModule(6, spatial_dims=spatial_dims).double()
    fast.load_state_dict(original.state_dict(), strict=True)
    x = (0.5 * torch.randn(batch, 6, *SPATIAL[spatial_dims], dtype=F64)).requires_grad_(True)
    _compare(original, fast, (x,))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_guided_attention_module(spatial_dims, train):
    original = _randomise(ref.GuidedAttentionModule(4, 4, spatial_dims=spatial_dims).double()).train(train)
    fast = compat.GuidedAttentionModule(4, 4, spatial_dims=spatial_dims).double().train(train)
    fast.load_state_dict(original.state_dict(), strict=True)
    f = (0.5 * torch.randn(2, 4, *SPATIAL[spatial_dims], dtype=F64)).requires_grad_(True)
    f_ms = (0.5 * torch.randn(2, 4, *SPATIAL[spatial_dims], dtype=F64)).requires_grad_(True)
    grads = _compare(original, fast, (f, f_ms))
    # pam is built but never used: its parameters get no gradient, in both
    names = [n for n, _ in fast.named_parameters()]
    for name, g in zip(names, grads[2:]):
        assert (g is None) == name.startswith("pam."), name


def test_guided_attention_state_dict_keys():
    keys = list(compat.GuidedAttentionModule(8, 8).state_dict())
    assert keys == list(ref.GuidedAttentionModule(8, 8).state_dict())
    assert "pam.first_branch_conv.weight" in keys and "attention_map_conv.1.running_mean" in keys
    assert compat.GuidedAttentionModule(8, 8).pam.first_branch_conv.weight.shape == (2, 16, 1, 1)
    assert compat.GuidedAttentionModule(8, 8, spatial_dims=3).pam.first_branch_conv.weight.shape == (2, 16, 1, 1, 1)
    assert set(compat.COMPAT_CLASSES) == {"PositionAttentionModule", "ChannelAttentionModule", "GuidedAttentionModule"}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", ["PositionAttentionModule", "ChannelAttentionModule", "GuidedAttentionModule"])
def test_from_original(name, spatial_dims):
    args = (4, 4) if name == "GuidedAttentionModule" else (16,)
    original = _randomise(getattr(ref, name)(*args, spatial_dims=spatial_dims)).double().eval()
    fast = compat.COMPAT_CLASSES[name].from_original(original)
    assert type(fast) is compat.COMPAT_CLASSES[name] and fast.spatial_dims == spatial_dims
    assert not fast.training and next(fast.parameters()).dtype == F64
    torch.testing.assert_close(fast.state_dict(), original.state_dict(), rtol=0, atol=0)
    inputs = [torch.randn(2, 4 if name == "GuidedAttentionModule" else 16, *SPATIAL[spatial_dims], dtype=F64)
              for _ in range(2 if name == "GuidedAttentionModule" else 1)]
    torch.testing.assert_close(fast(*inputs), original(*inputs), rtol=1e-11, atol=1e-11)


def test_from_original_guided_infers_unequal_widths():
    original = ref.GuidedAttentionModule(1, 7)       # F has 1 channel: broadcasts against 7
    fast = compat.GuidedAttentionModule.from_original(original)
    assert fast.attention_map_conv[0].weight.shape == (7, 8, 1, 1)
    f, f_ms = torch.randn(2, 1, 4, 3), torch.randn(2, 7, 4, 3)
    torch.testing.assert_close(fast(f, f_ms), original(f, f_ms), rtol=1e-5, atol=1e-5)


def test_error_wrong_rank_2d():
    with pytest.raises(ValueError, match=r"PositionAttentionModule: argument 'F' must be \(B, C, H, W\) \(spatial_dims=2\), got shape \(1, 8, 2, 3, 4\)"):
        compat.PositionAttentionModule(8)(torch.randn(1, 8, 2, 3, 4))


def test_error_wrong_rank_3d():
    with pytest.raises(ValueError, match=r"ChannelAttentionModule: argument 'F' must be \(B, C, D, H, W\) \(spatial_dims=3\), got shape \(1, 8, 3, 4\)"):
        compat.ChannelAttentionModule(8, spatial_dims=3)(torch.randn(1, 8, 3, 4))


def test_error_guided_f_ms_not_tensor():
    with pytest.raises(TypeError, match=r"GuidedAttentionModule: argument 'F_ms' must be a torch.Tensor, got NoneType"):
        compat.GuidedAttentionModule(4, 4)(torch.randn(1, 4, 3, 3), None)


def test_error_bad_spatial_dims():
    with pytest.raises(ValueError, match=r"spatial_dims must be 2 or 3, got 1"):
        compat.PositionAttentionModule(8, spatial_dims=1)
    with pytest.raises(ValueError, match=r"spatial_dims must be 2 or 3, got 4"):
        ref.ChannelAttentionModule(8, spatial_dims=4)

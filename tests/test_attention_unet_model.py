"""AttentionUNet (medattn_fast.models): shapes in 2-D/3-D, the fast path against the reference
backend (logits, attention maps, every parameter gradient, BN running statistics; train and eval,
fp64), bad inputs, a few training steps, and MONAI AttentionUnet checkpoints through a module tree
that mirrors MONAI's (medattn_fast/testing/monai_attention_unet.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import medattn_fast
from medattn_fast.models import AttentionUNet

from medattn_fast.testing.monai_attention_unet import AttentionUnet as MonaiAttentionUnet

F64 = torch.float64


def _randomise(model: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Random weights and a trained-looking BN state (so that eval folding does real work)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".N.weight" in name or name.endswith(("W_x.1.weight", "W_g.1.weight",
                                                                                       "psi.1.weight")):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, scale)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.2)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model


def _forward_backward(model, x, cotangent, *, backend=None):
    """Logits, attention maps, input and parameter gradients of ``<logits, cotangent>``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    if backend is None:
        logits, alphas = model(x, return_attention=True)
    else:
        with medattn_fast.use_backend(backend):
            logits, alphas = model(x, return_attention=True)
    (logits * cotangent).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return logits.detach(), [a.detach() for a in alphas], x.grad, grads


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------
def test_forward_shapes_2d():
    model = AttentionUNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2))
    x = torch.randn(2, 1, 32, 48)
    logits, alphas = model(x, return_attention=True)
    assert logits.shape == (2, 3, 32, 48)
    assert [tuple(a.shape) for a in alphas] == [(2, 1, 32, 48), (2, 1, 16, 24)]
    assert all(((a > 0) & (a < 1)).all() for a in alphas)
    assert torch.equal(model(x), logits)  # return_attention does not change the logits (same BN batch stats)


def test_forward_shapes_3d_anisotropic_strides():
    # per-dim strides: the first level keeps depth, so the divisors are (2, 4, 4)
    model = AttentionUNet(3, 2, 2, channels=(4, 6, 8), strides=((1, 2, 2), 2)).eval()
    x = torch.randn(1, 2, 16, 16, 24)
    logits, alphas = model(x, return_attention=True)
    assert logits.shape == (1, 2, 16, 16, 24)
    assert [tuple(a.shape) for a in alphas] == [(1, 1, 16, 16, 24), (1, 1, 16, 8, 12)]
    assert model.size_divisor == (2, 4, 4)
    x_odd_depth = torch.randn(1, 2, 6, 8, 12)  # depth only needs to be even
    assert model(x_odd_depth).shape == (1, 2, 6, 8, 12)


# ------------------------------------------------------------------------------------------------
# fast path vs the reference backend
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spatial_dims, size, channels, strides", [
    (2, (12, 20), (6, 10, 14), (2, 2)),        # H != W, C_int = 3 and 5
    (3, (4, 6, 10), (2, 6), (2,)),             # C_int = 1, one level
], ids=["2d", "3d"])
def test_auto_matches_reference_fp64(spatial_dims, size, channels, strides, training):
    torch.manual_seed(1)
    fast = _randomise(AttentionUNet(spatial_dims, 3, 5, channels=channels, strides=strides)).to(F64)
    oracle = copy.deepcopy(fast)
    fast.train(training)
    oracle.train(training)
    x = torch.randn(2, 3, *size, dtype=F64)
    cotangent = torch.randn(2, 5, *size, dtype=F64)

    logits, alphas, gx, grads = _forward_backward(fast, x, cotangent)
    logits_ref, alphas_ref, gx_ref, grads_ref = _forward_backward(oracle, x, cotangent, backend="reference")

    tol = dict(rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(logits, logits_ref, **tol)
    for a, a_ref in zip(alphas, alphas_ref, strict=True):
        torch.testing.assert_close(a, a_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], grads_ref[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
    # train mode: both forwards updated the BN running statistics identically
    for (name, b), (_, b_ref) in zip(fast.named_buffers(), oracle.named_buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_eval_folding_matches_unfolded_batch_norm():
    """Eval mode folds BN into the convs: same as running the conv and BN modules one after another."""
    model = _randomise(AttentionUNet(2, 2, 3, channels=(4, 8), strides=(2,))).to(F64).eval()
    x = torch.randn(1, 2, 10, 14, dtype=F64)
    unit = model.encoder[0][0]
    manual = F.relu(unit.norm(unit.conv(model.stem(x))))
    torch.testing.assert_close(unit(model.stem(x)), manual, rtol=1e-12, atol=1e-12)
    upconv = model.decoder[0].upconv
    lower = torch.randn(1, 8, 5, 7, dtype=F64)
    torch.testing.assert_close(upconv(lower), F.relu(upconv.norm(upconv.conv(lower))), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_input_not_divisible_by_strides_raises():
    model = AttentionUNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2))
    with pytest.raises(ValueError, match=r"argument 'x' must have spatial sizes divisible by \(4, 4\) \(the "
                                         r"product of the strides per dim\), got shape \(1, 1, 30, 48\)"):
        model(torch.randn(1, 1, 30, 48))


def test_input_wrong_channels_raises():
    model = AttentionUNet(2, 1, 3, channels=(4, 8), strides=(2,))
    with pytest.raises(ValueError, match=r"argument 'x' must have 1 channels \(dim 1\), got shape \(1, 2, 8, 8\)"):
        model(torch.randn(1, 2, 8, 8))


def test_input_wrong_rank_raises():
    model = AttentionUNet(3, 1, 3, channels=(4, 8), strides=(2,))
    with pytest.raises(ValueError, match=r"argument 'x' must be \(B, C, D, H, W\).*got shape \(1, 1, 8, 8\)"):
        model(torch.randn(1, 1, 8, 8))


def test_input_empty_raises():
    model = AttentionUNet(2, 1, 3, channels=(4, 8), strides=(2,))
    with pytest.raises(ValueError, match=r"argument 'x' must not have an empty batch, got shape \(0, 1, 8, 8\)"):
        model(torch.randn(0, 1, 8, 8))


def test_input_not_a_tensor_raises():
    model = AttentionUNet(2, 1, 3, channels=(4, 8), strides=(2,))
    with pytest.raises(TypeError, match=r"argument 'x' must be a torch.Tensor, got list"):
        model([[1.0]])


@pytest.mark.parametrize("kwargs, message", [
    (dict(spatial_dims=1), r"'spatial_dims' must be 2 or 3, got 1"),
    (dict(in_channels=0), r"'in_channels' must be a positive int, got 0"),
    (dict(out_channels=2.0), r"'out_channels' must be a positive int, got 2.0"),
    (dict(channels=(4,)), r"'channels' must be at least 2 positive ints, got \(4,\)"),
    (dict(channels=(1, 8)), r"'channels' must be >= 2 at every level but the last.*got \(1, 8\)"),
    (dict(strides=(2,)), r"'strides' must have len\(channels\) - 1 = 2 entries, got 1"),
    (dict(strides=(2, (2, 0))), r"'strides' must hold positive ints or tuples of 2 positive ints, got \(2, 0\)"),
    (dict(kernel_size=4), r"'kernel_size' must be an odd positive int or 2 odd positive ints, got 4"),
    (dict(up_kernel_size=(3, 3, 3)), r"'up_kernel_size' must be an odd positive int or 2 .*got \(3, 3, 3\)"),
    (dict(dropout=1.0), r"'dropout' must be in \[0, 1\), got 1.0"),
], ids=["spatial_dims", "in_channels", "out_channels", "channels_len", "channels_small", "strides_len",
        "stride_value", "kernel_even", "up_kernel_len", "dropout"])
def test_constructor_bad_arguments_raise(kwargs, message):
    args = dict(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        AttentionUNet(**args)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def test_training_steps_reduce_the_loss():
    """Ten Adam steps fitting random labels on one random batch: the loss falls steadily."""
    torch.manual_seed(2)
    model = AttentionUNet(2, 1, 3, channels=(4, 8, 16), strides=(2, 2)).train()
    x = torch.randn(2, 1, 16, 24)
    target = torch.randint(0, 3, (2, 16, 24))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(10):
        optimiser.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0], losses


# ------------------------------------------------------------------------------------------------
# MONAI checkpoints
# ------------------------------------------------------------------------------------------------
MONAI_CONFIGS = [
    dict(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2)),
    dict(spatial_dims=3, in_channels=2, out_channels=2, channels=(4, 6, 8, 10), strides=(2, 1, 2),
         kernel_size=5, up_kernel_size=1, dropout=0.2),
]
MONAI_SIZES = [(2, 1, 20, 28), (1, 2, 8, 12, 4)]


@pytest.mark.parametrize("config, shape", list(zip(MONAI_CONFIGS, MONAI_SIZES)), ids=["2d", "3d"])
def test_from_monai_state_dict_matches_monai_eval(config, shape):
    torch.manual_seed(3)
    monai = _randomise(MonaiAttentionUnet(**config)).to(F64).eval()
    state = monai.state_dict()
    model = AttentionUNet.from_monai_state_dict(state, **config).eval()
    assert next(model.parameters()).dtype == F64  # the checkpoint's dtype
    assert set(model.monai_key_map()) == set(state)  # no missing, no unexpected key
    x = torch.randn(*shape, dtype=F64)
    torch.testing.assert_close(model(x), monai(x), rtol=1e-10, atol=1e-11)


def test_from_monai_state_dict_matches_monai_train_step():
    """Train mode: logits, every parameter gradient (through the key map) and running statistics."""
    config = MONAI_CONFIGS[0]
    torch.manual_seed(4)
    monai = _randomise(MonaiAttentionUnet(**config)).to(F64).train()
    model = AttentionUNet.from_monai_state_dict(monai.state_dict(), **config).train()
    x = torch.randn(2, 1, 16, 12, dtype=F64)
    cotangent = torch.randn(2, 3, 16, 12, dtype=F64)
    logits, monai_logits = model(x), monai(x)
    torch.testing.assert_close(logits, monai_logits, rtol=1e-10, atol=1e-11)
    (logits * cotangent).sum().backward()
    (monai_logits * cotangent).sum().backward()
    monai_params = dict(monai.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, monai_params[model.monai_key(name)].grad, rtol=1e-9, atol=1e-10,
                                   msg=lambda m, n=name: f"{n}: {m}")
    monai_buffers = dict(monai.named_buffers())
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, monai_buffers[model.monai_key(name)], rtol=1e-12, atol=1e-12)


def test_to_monai_state_dict_round_trip():
    config = MONAI_CONFIGS[0]
    model = _randomise(AttentionUNet(**config)).to(F64).eval()
    monai = MonaiAttentionUnet(**config).to(F64).eval()
    result = monai.load_state_dict(model.to_monai_state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 1, 8, 16, dtype=F64)
    torch.testing.assert_close(monai(x), model(x), rtol=1e-10, atol=1e-11)


def test_from_monai_state_dict_wrong_architecture_raises():
    config = MONAI_CONFIGS[0]
    state = MonaiAttentionUnet(**config).state_dict()
    shallower = dict(config, channels=(4, 8), strides=(2,))
    # one level less: MONAI's last level keeps its down block at submodule.conv, not submodule.0.conv
    with pytest.raises(KeyError, match=r"missing \['model\.1\.submodule\.conv\.0\..*"
                                       r"unexpected \['model\.1\.submodule\.0\.conv\.0\."):
        AttentionUNet.from_monai_state_dict(state, **shallower)
    state_missing = {k: v for k, v in state.items() if k != "model.2.conv.weight"}
    with pytest.raises(KeyError, match=r"missing \['model\.2\.conv\.weight'\]"):
        AttentionUNet.from_monai_state_dict(state_missing, **config)

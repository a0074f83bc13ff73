"""Full attention networks: DAUNet, CrossAttentionUNet, MSGANet.

Each fast network is checked against its reference twin (``medattn_fast.testing.twins.reference_twin``: a copy
whose attention modules are the faithful, materialising ones of ``medattn_fast.reference``, holding
the same weights) in float64, in eval and train mode: logits, the input gradient, every parameter
gradient and (train) the BatchNorm running statistics. Plus shapes
(2-D, 3-D, H != W, B = 1), the input-size and argument errors, a few optimiser steps with a falling
loss, MSGANet's losses and the backbone weight loading. Configurations are tiny on purpose.
"""
from __future__ import annotations

import pytest
import torch

from medattn_fast.testing.twins import PlanarCAM, PlanarPAM, reference_twin
from medattn_fast import nn as fast_nn
from medattn_fast.models import AttentionUNet, CrossAttentionUNet, DAUNet, MSGANet, MSGANetOutputs, msganet_loss
from medattn_fast.reference import cross_attention as reference_cross
from medattn_fast.reference import danet as reference_danet

F64 = dict(rtol=1e-9, atol=1e-10)


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Nonzero attention gammas (0 at init makes PAM/CAM the identity), position-attention biases of
    order 1 (at their default ±1/√C init a query/key bias swap moves the outputs by only ~1e-10), BN
    affine and running statistics away from 1/0, so that every part of the network shows in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, fast_nn.Pointwise) and m.bias is not None:
                m.bias.normal_(0.0, 1.0)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _run(model, x, cotangent_seed=1):
    """Forward + backward of a fixed random cotangent; returns (outputs, x.grad, param grads, buffers)."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    outs = list(out.predictions) if isinstance(out, MSGANetOutputs) else [out]
    gen = torch.Generator().manual_seed(cotangent_seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return [o.detach() for o in outs], x.grad, grads, buffers


def _assert_twins_agree(fast, x, training: bool):
    fast = _randomise(fast.double()).train(training)
    reference, names = reference_twin(fast)
    assert set(names.values()) == {n for n, _ in reference.named_parameters()}
    out_f, gx_f, grads_f, buf_f = _run(fast, x)
    out_r, gx_r, grads_r, buf_r = _run(reference, x)
    for a, b in zip(out_f, out_r):
        torch.testing.assert_close(a, b, **F64)
    torch.testing.assert_close(gx_f, gx_r, **F64)
    assert grads_f.keys() == names.keys()
    for name, twin_name in names.items():
        if grads_r[twin_name] is None:
            assert grads_f[name] is None, name
        else:
            torch.testing.assert_close(grads_f[name], grads_r[twin_name].reshape(grads_f[name].shape), **F64,
                                       msg=lambda m: f"{name}: {m}")
    assert buf_f.keys() == buf_r.keys()
    for name in buf_r:
        torch.testing.assert_close(buf_f[name], buf_r[name], **F64, msg=lambda m: f"{name}: {m}")


def _train_steps(model, x, target, steps=6, loss_fn=None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        out = model(x)
        loss = loss_fn(out, target) if loss_fn else torch.nn.functional.cross_entropy(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# DAUNet
# ---------------------------------------------------------------------------------------------
def _daunet(spatial_dims=2, **kw):
    cfg = dict(channels=(8, 16, 32), strides=(2, 2), attention_at=("bottleneck", "skip-1"), attention_reduction=2)
    cfg.update(kw)
    return DAUNet(spatial_dims, 2, 3, **cfg)


@pytest.mark.parametrize("shape", [(2, 2, 12, 20), (1, 2, 4, 8)])
def test_daunet_shapes_2d(shape):
    model = _daunet()
    assert model(torch.randn(shape)).shape == (shape[0], 3, *shape[2:])


def test_daunet_shapes_3d_anisotropic_strides():
    model = _daunet(3, strides=((1, 2, 2), 2))
    x = torch.randn(2, 2, 6, 8, 12)
    assert model(x).shape == (2, 3, 6, 8, 12)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("spatial_dims,size", [(2, (12, 20)), (3, (4, 4, 8))])
def test_daunet_fast_matches_reference(spatial_dims, size, training):
    model = _daunet(spatial_dims, attention_at=("bottleneck", "skip-1", "skip-2"), attention_reduction=1)
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    _assert_twins_agree(model, x, training)


_SWAPPED = {fast_nn.PositionAttention: PlanarPAM, fast_nn.ChannelAttention: PlanarCAM,
            fast_nn.SEChannelAttention: reference_cross.SEChannelAttention,
            fast_nn.SelfAttentionLayer: reference_cross.SelfAttentionLayer,
            fast_nn.SkipCrossAttentionLayer: reference_cross.SkipCrossAttentionLayer}


@pytest.mark.parametrize("build", [lambda: _daunet(3), lambda: _cross_unet(), lambda: _msganet()],
                         ids=["DAUNet", "CrossAttentionUNet", "MSGANet"])
def test_reference_twin_holds_the_reference_modules(build):
    """Where the fast network has an attention module of medattn_fast.nn, the twin has the reference
    one (DANet's PAM/CAM, the reference cross-attention blocks), and no module of medattn_fast.nn is left."""
    fast = build()
    twin, _ = reference_twin(fast)
    fast_modules, twin_modules = dict(fast.named_modules()), dict(twin.named_modules())
    attention = {path: type(m) for path, m in fast_modules.items() if type(m) in _SWAPPED}
    assert attention
    reference_classes = (reference_danet.PAM_Module, reference_danet.CAM_Module, reference_cross.SEChannelAttention,
                         reference_cross.SelfAttentionLayer, reference_cross.SkipCrossAttentionLayer)
    for path, cls in attention.items():
        assert type(twin_modules[path]) is _SWAPPED[cls] and isinstance(twin_modules[path], reference_classes), path
    assert not [p for p, m in twin_modules.items() if type(m).__module__.startswith("medattn_fast.nn")]


def test_reference_twin_refuses_modules_without_reference():
    with pytest.raises(TypeError, match=r"reference_twin: .*\.AttentionGate\) has no reference counterpart"):
        reference_twin(AttentionUNet(2, 1, 2, (8, 16), (2,)))
    with pytest.raises(TypeError, match=r"PositionAttention\(16\) has 4 query channels; DANet's PAM_Module has "
                                        r"channels // 8 = 2"):
        reference_twin(torch.nn.Sequential(fast_nn.PositionAttention(16, reduction=4)))
    with pytest.raises(TypeError, match=r"ChannelAttention\(negate=False\) has no reference counterpart"):
        reference_twin(torch.nn.Sequential(fast_nn.ChannelAttention(negate=False)))


@pytest.mark.parametrize("seed,build", [(1, lambda: _daunet()), (2, lambda: _cross_unet())],
                         ids=["DAUNet", "CrossAttentionUNet"])
def test_unet_trains(seed, build):
    torch.manual_seed(seed)
    model = build()
    x, target = torch.randn(2, 2, 8, 12), torch.randint(0, 3, (2, 8, 12))
    _train_steps(model, x, target)


def test_daunet_bad_input_size():
    with pytest.raises(ValueError, match=r"DAUNet: argument 'x' must have spatial sizes divisible by \(4, 4\).*"
                                         r"got shape \(1, 2, 12, 10\)"):
        _daunet()(torch.randn(1, 2, 12, 10))


def test_daunet_bad_input_rank_and_channels():
    with pytest.raises(ValueError, match=r"DAUNet: argument 'x' must be \(B, C, H, W\).*got shape \(2, 8, 8\)"):
        _daunet()(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match=r"DAUNet: argument 'x' must have 2 channels.*got shape \(1, 3, 8, 8\)"):
        _daunet()(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="DAUNet: argument 'x' must be a torch.Tensor, got list"):
        _daunet()([1.0])


def test_daunet_bad_arguments():
    with pytest.raises(ValueError, match=r"DAUNet: argument 'attention_at' entries must be among .*got \['skip-3'\]"):
        _daunet(attention_at=("skip-3",))
    with pytest.raises(ValueError, match="DAUNet: dual attention on 16 channels with attention_reduction=4 gives 4 "
                                         "inner channels; position attention needs at least 8"):
        _daunet(attention_at=("skip-1",), attention_reduction=4)
    with pytest.raises(ValueError, match=r"DAUNet: argument 'strides' must have len\(channels\) - 1 = 2 entries, got 1"):
        DAUNet(2, 1, 2, channels=(8, 16, 32), strides=(2,))
    with pytest.raises(ValueError, match="DAUNet: argument 'norm' must be one of .*got 'layer'"):
        _daunet(norm="layer")


# ---------------------------------------------------------------------------------------------
# CrossAttentionUNet
# ---------------------------------------------------------------------------------------------
def _cross_unet(spatial_dims=2, **kw):
    cfg = dict(channels=(4, 8, 16), strides=(2, 2), heads=2, se_reduction=4)
    cfg.update(kw)
    return CrossAttentionUNet(spatial_dims, 2, 3, **cfg)


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 2, 12, 8)), (2, (1, 2, 8, 4)), (3, (1, 2, 4, 8, 4))])
def test_cross_attention_unet_shapes(spatial_dims, shape):
    model = _cross_unet(spatial_dims)
    assert model(torch.randn(shape)).shape == (shape[0], 3, *shape[2:])


def test_cross_attention_unet_attention_placement():
    model = _cross_unet(self_attention_levels=1, cross_attention_levels=1)
    assert [e.self_attention is not None for e in model.encoder] == [False, True]
    assert [d.cross_attention is not None for d in model.decoder] == [False, True]
    assert model(torch.randn(1, 2, 8, 8)).shape == (1, 3, 8, 8)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("spatial_dims,size", [(2, (12, 8)), (3, (4, 4, 8))])
def test_cross_attention_unet_fast_matches_reference(spatial_dims, size, training):
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    _assert_twins_agree(_cross_unet(spatial_dims), x, training)


def test_cross_attention_unet_bad_input_size():
    with pytest.raises(ValueError, match=r"CrossAttentionUNet: argument 'x' must have spatial sizes divisible by "
                                         r"\(4, 4, 4\).*got shape \(1, 2, 4, 6, 4\)"):
        _cross_unet(3)(torch.randn(1, 2, 4, 6, 4))


def test_cross_attention_unet_bad_arguments():
    with pytest.raises(ValueError, match=r"CrossAttentionUNet: argument 'heads' \(3\) must divide the channels of "
                                         r"every attention level, got channels \[4, 8, 16\]"):
        _cross_unet(heads=3)
    with pytest.raises(ValueError, match=r"CrossAttentionUNet: argument 'self_attention_levels' must be an int in "
                                         r"\[0, 2\] or None, got 5"):
        _cross_unet(self_attention_levels=5)


# ---------------------------------------------------------------------------------------------
# MSGANet
# ---------------------------------------------------------------------------------------------
def _msganet(**kw):
    return MSGANet(1, 3, 8, backbone_widths=(8, 8, 16, 16), backbone_depths=(1, 1, 1, 1), **kw)


def test_msganet_outputs_train_and_eval():
    model = _msganet()
    x = torch.randn(2, 1, 64, 32)
    out = model(x)
    assert isinstance(out, MSGANetOutputs)
    assert len(out.predictions) == 8 and all(p.shape == (2, 3, 64, 32) for p in out.predictions)
    assert all(z.shape == (2, 64, 4, 2) for z in out.latents_1 + out.latents_2)
    assert all(j.shape == r.shape == (2, 16, 16, 8)
               for j, r in zip(out.inputs_1 + out.inputs_2, out.reconstructions_1 + out.reconstructions_2))
    model.eval()
    with torch.no_grad():
        averaged = model(x)
    assert averaged.shape == (2, 3, 64, 32)
    # eval output = the mean of the four refined (step-2) maps: compare with the train-mode
    # outputs computed with the BatchNorms in eval mode (the same statistics on both sides)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    with torch.no_grad():
        outputs = model(x)
    torch.testing.assert_close(outputs.average(), averaged)
    torch.testing.assert_close(averaged, sum(outputs.predictions[4:]) / 4)


@pytest.mark.parametrize("training", [False, True])
def test_msganet_fast_matches_reference(training):
    x = torch.randn(2, 1, 32, 64, dtype=torch.float64)
    _assert_twins_agree(_msganet(), x, training)


def test_msganet_losses_finite_and_differentiable():
    model = _randomise(_msganet())
    out = model(torch.randn(2, 1, 32, 32))
    losses = MSGANet.losses(out, torch.randint(0, 3, (2, 32, 32)))
    assert set(losses) == {"total", "segmentation", "guided", "reconstruction"}
    assert all(v.dim() == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    torch.testing.assert_close(losses["total"], losses["segmentation"] + 0.25 * losses["guided"]
                               + 0.1 * losses["reconstruction"])
    # The guided term alone reaches both steps' semantic encoders (the two latents it compares).
    encoders = [model.step1.semantic.encode2[0].weight, model.step2.semantic.encode2[0].weight]
    for grad in torch.autograd.grad(losses["guided"], encoders, retain_graph=True):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    losses["total"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


def test_msganet_trains():
    torch.manual_seed(3)
    model = _msganet()
    x, target = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 32, 32))
    _train_steps(model, x, target, loss_fn=lambda out, t: msganet_loss(out, t)["total"])


def test_msganet_load_backbone_weights(tmp_path):
    source = _msganet().backbone
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = source.state_dict()
    path = tmp_path / "resnet.pth"
    # a torchvision-style checkpoint: backbone keys plus a classifier that is ignored
    torch.save({**state, "fc.weight": torch.randn(5, 16), "fc.bias": torch.randn(5)}, path)
    model = _msganet()
    assert model.load_backbone_weights(path) == ["fc.bias", "fc.weight"]
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    # a state_dict mapping behind a "backbone." prefix loads the same way
    other = _msganet()
    other.load_backbone_weights({f"backbone.{k}": v for k, v in state.items()})
    assert all(torch.equal(v, state[k]) for k, v in other.backbone.state_dict().items())


def test_msganet_load_backbone_weights_mismatch():
    state = dict(_msganet().backbone.state_dict())
    state["conv1.weight"] = torch.randn(8, 3, 7, 7)
    del state["bn1.bias"]
    with pytest.raises(ValueError, match=r"MSGANet.load_backbone_weights: the weights do not fit the backbone: "
                                         r"missing \['bn1.bias'\], unexpected \[\], shape mismatches "
                                         r"\['conv1.weight: expected \(8, 1, 7, 7\), got \(8, 3, 7, 7\)'\]"):
        _msganet().load_backbone_weights(state)
    with pytest.raises(TypeError, match="MSGANet.load_backbone_weights: argument 'weights' must be a path or a "
                                        "state_dict mapping, got int"):
        _msganet().load_backbone_weights(3)


def test_msganet_bad_input_size():
    with pytest.raises(ValueError, match=r"MSGANet: argument 'x' must have spatial sizes divisible by \(32, 32\).*"
                                         r"got shape \(1, 1, 32, 48\)"):
        _msganet()(torch.randn(1, 1, 32, 48))


def test_msganet_bad_arguments():
    with pytest.raises(ValueError, match="MSGANet: argument 'base_channels' must be an int >= 8.*got 4"):
        MSGANet(1, 2, 4)
    out = _msganet()(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"msganet_loss: argument 'target' must be int64 class indices of shape "
                                         r"\(2, 32, 32\), got \(2, 16, 32\) torch.int64"):
        msganet_loss(out, torch.zeros(2, 16, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"msganet_loss: argument 'target' must be int64 .*got \(2, 32, 32\) "
                                         r"torch.float32"):
        msganet_loss(out, torch.randn(2, 32, 32))
    with pytest.raises(TypeError, match="msganet_loss: argument 'outputs' must be MSGANetOutputs"):
        msganet_loss(torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.int64))

"""MT-UNet as a whole network: the reference MTUNet (faithful to the original), its compat twin (strict original
keys, same outputs and gradients) and the clean models.MTUNet (any size, 1/3 channels, low
precision, training, loading original checkpoints)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medattn_fast import models
from medattn_fast.compat import mtunet as C
from medattn_fast.models import mtunet as M
from medattn_fast.reference import mtunet as R

F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-10)
KEYS_FILE = Path(__file__).resolve().parent / "data" / "mtunet_state_dict_keys.txt"
ORIGINAL_PARAMETERS = 79_075_389
CFG = {"win_size": 4, "head": 2}
# The original is tied to 224² by its 784-token embedding. The fp64 comparisons run at 64² (an
# 8×8 token grid: 2×2 Gaussian grids, the bottleneck's 2×2 tokens padded to a window) with a
# 64-token embedding on both.
SMALL_SIDE = 64


def _checkpoint_shapes():
    shapes = []
    for line in KEYS_FILE.read_text().splitlines():
        name, shape = line.split("\t")
        shapes.append((name, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return shapes


def _randomise(model, seed=0):
    """Non-trivial BN statistics and affines, LayerNorm affines and position embedding (the
    originals initialise them to constants)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=gen))
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
            if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
                mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=gen))
        for name, p in model.named_parameters():
            if name.endswith("position_embedding"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _grads(module):
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad) for n, p in module.named_parameters()}


def _bn_stats(module):
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n}


@pytest.fixture(scope="module")
def small_reference():
    """The original MTUNet(9) (seeded), with a 64-token position embedding for 64² inputs, fp64."""
    torch.manual_seed(0)
    ref = R.MTUNet(9)
    ref.stem.position_embedding = nn.Parameter(torch.zeros(1, (SMALL_SIDE // 8) ** 2, 256))
    return _randomise(ref).to(F64)


# ---------------------------------------------------------------------------------------------
# compat.MTUNet and models.MTUNet vs the reference
# ---------------------------------------------------------------------------------------------

def test_original_checkpoint_keys_and_strict_loading():
    expected = _checkpoint_shapes()
    assert len(expected) == 487
    torch.manual_seed(0)
    ref = R.MTUNet(9)
    torch.manual_seed(0)
    fast = C.MTUNet(9)
    for model in (ref, fast):
        assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
        assert sum(p.numel() for p in model.parameters()) == ORIGINAL_PARAMETERS
    # built in the original's order: one seed, the same initial weights
    for name, value in ref.state_dict().items():
        assert torch.equal(fast.state_dict()[name], value), name
    fast.load_state_dict(ref.state_dict(), strict=True)
    # the clean model: every original key mapped or dropped, nothing left over
    clean = models.MTUNet.from_original_state_dict(ref.state_dict())
    mapped = M.convert_original_state_dict(ref.state_dict())
    assert mapped.keys() == clean.state_dict().keys()
    assert len(expected) - len(mapped) == len(M.DROPPED_ORIGINAL_PARAMETERS) * 10  # ten mixed-transformer modules
    dropped = sum(v.numel() for k, v in ref.named_parameters() if k.endswith(M.DROPPED_ORIGINAL_PARAMETERS))
    assert sum(p.numel() for p in clean.parameters()) == ORIGINAL_PARAMETERS - dropped
    assert (clean.in_channels, clean.num_classes, clean.base_channels, clean.num_heads, clean.window_size,
            clean.embedding_grid) == (3, 9, 64, 8, 4, (28, 28))


@pytest.mark.parametrize("train", [False, True])
def test_compat_and_clean_match_the_reference_fp64(small_reference, train):
    """Forward, input gradient, every parameter gradient (and BN running stats in train mode) of
    compat.MTUNet and of models.MTUNet loaded from the same state_dict, vs the reference."""
    ref = small_reference
    fast = C.MTUNet.from_original(ref)
    in_channels = 3 if train else 1  # eval: the original's repeat of a 1-channel input
    clean = models.MTUNet.from_original_state_dict(ref.state_dict(), in_channels=in_channels)
    assert fast.stem.position_embedding.shape == (1, 64, 256) and clean.embedding_grid == (8, 8)
    x = torch.randn(1, in_channels, SMALL_SIDE, SMALL_SIDE, dtype=F64)
    before = _bn_stats(ref)
    outs, input_grads, grads, stats = [], [], [], []
    for model in (ref, fast, clean):
        model.train(train)
        model.zero_grad(set_to_none=True)
        xin = x.clone().requires_grad_(True)
        out = model(xin)
        if not outs:
            cot = torch.randn(out.shape, dtype=F64)  # not randn_like: outputs' strides differ
        (out * cot).sum().backward()
        outs.append(out.detach())
        input_grads.append(xin.grad)
        grads.append(_grads(model))
        stats.append(_bn_stats(model))
    ref.load_state_dict({**ref.state_dict(), **before}, strict=True)  # the fixture stays as it was
    assert outs[0].shape == (x.shape[0], 9, SMALL_SIDE, SMALL_SIDE)
    for out, gx in zip(outs[1:], input_grads[1:]):
        torch.testing.assert_close(out, outs[0], **TIGHT)
        torch.testing.assert_close(gx, input_grads[0], **TIGHT)
    scale = max(g.abs().max().item() for g in grads[0].values())
    tol = dict(rtol=1e-8, atol=1e-10 * scale)  # the dead parameters' gradients are rounding noise around 0
    assert grads[1].keys() == grads[0].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, **tol, msg=name)
    # the clean model's gradients are the reference's through the (linear) key map
    expected = M.convert_original_state_dict(grads[0])
    if in_channels == 1:  # the first conv sees 3 copies of x: the summed kernel's gradient is any slice's
        expected["encoder_convs.0.conv1.conv.weight"] = grads[0]["stem.model.res1.conv.0.conv.weight"][:, :1]
    assert expected.keys() == grads[2].keys()
    for name, g in expected.items():
        torch.testing.assert_close(grads[2][name], g, **tol, msg=name)
    if train:
        assert any(not torch.equal(stats[0][k], before[k]) for k in before)
        for name, value in stats[0].items():
            torch.testing.assert_close(stats[1][name], value, **TIGHT, msg=name)
        for name, value in M.convert_original_state_dict(stats[0]).items():
            torch.testing.assert_close(stats[2][name], value, **TIGHT, msg=name)


def test_original_configuration_224_three_models_agree():
    """The only configuration the original runs: 3-channel 224², its 784-token embedding (fp32)."""
    torch.manual_seed(1)
    ref = _randomise(R.MTUNet(9), seed=1).eval()
    fast = C.MTUNet.from_original(ref)
    clean = models.MTUNet.from_original_state_dict(ref.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
        got_fast, got_clean = fast(x), clean(x)
    assert expected.shape == (1, 9, 224, 224)
    tol = dict(rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    torch.testing.assert_close(got_fast, expected, **tol)
    torch.testing.assert_close(got_clean, expected, **tol)


@pytest.mark.parametrize("train", [False, True])
def test_compat_encoder_and_decoder_blocks_fp64(train):
    """encoder_block / decoder_block (both flags) vs the reference, odd grids, outputs and grads."""
    cases = [
        (R.encoder_block(8, CFG), [torch.randn(2, 36, 8, dtype=F64)]),  # 6×6 tokens -> 3×3
        (R.decoder_block(16, False, CFG), [torch.randn(2, 16, 3, 3, dtype=F64), torch.randn(2, 8, 6, 6, dtype=F64)]),
        (R.decoder_block(16, True, CFG), [torch.randn(2, 16, 5, 5, dtype=F64), torch.randn(2, 8, 10, 10, dtype=F64)]),
    ]
    for ref, inputs in cases:
        ref = _randomise(ref).to(F64).train(train)
        fast = C.COMPAT_CLASSES[type(ref).__name__].from_original(ref)
        assert fast.training == train
        outs = []
        for model in (ref, fast):
            xs = [t.clone().requires_grad_(True) for t in inputs]
            out = model(*xs)
            out = out if isinstance(out, tuple) else (out,)
            gen = torch.Generator().manual_seed(5)  # not randn_like: the outputs' strides differ
            sum((o * torch.randn(o.shape, dtype=F64, generator=gen)).sum() for o in out).backward()
            outs.append((out, [t.grad for t in xs], _grads(model)))
        (ro, rgx, rg), (fo, fgx, fg) = outs
        for a, b in zip(fo + tuple(fgx), ro + tuple(rgx)):
            torch.testing.assert_close(a, b, **TIGHT)
        for name in rg:
            torch.testing.assert_close(fg[name], rg[name], rtol=1e-9, atol=1e-9, msg=name)


def test_convert_swaps_a_whole_original_mtunet():
    from medattn_fast import convert

    torch.manual_seed(2)
    wrapper = nn.Sequential(R.MTUNet(4))
    report = convert(wrapper, families=["mtunet"])
    assert [(p, new) for p, _, new in report.swapped] == [("0", "medattn_fast.compat.mtunet.MTUNet")]
    assert isinstance(wrapper[0], C.MTUNet) and wrapper[0].SegmentationHead.out_channels == 4


# ---------------------------------------------------------------------------------------------
# models.MTUNet: sizes, channels, precision, training
# ---------------------------------------------------------------------------------------------

def _tiny(in_channels=1, **kw):
    torch.manual_seed(3)
    return models.MTUNet(in_channels, 5, base_channels=4, num_heads=4, **kw)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [(224, 224), (256, 256), (192, 256)])
def test_clean_model_sizes_and_channels(size, in_channels):
    model = _tiny(in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(1, in_channels, *size))
    assert out.shape == (1, 5, *size) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_clean_model_default_width_non_square():
    model = models.MTUNet().eval()  # the original's widths, 1-channel input, 9 classes
    with torch.no_grad():
        out = model(torch.randn(1, 1, 192, 256))
    assert out.shape == (1, 9, 192, 256) and torch.isfinite(out).all()


def test_position_embedding_is_resampled_to_the_token_grid():
    model = _tiny()
    with torch.no_grad():
        model.position_embedding.normal_()
    assert model.position_embedding_for(28, 28) is model.position_embedding
    got = model.position_embedding_for(8, 12)
    expected = F.interpolate(model.position_embedding.permute(0, 3, 1, 2), size=(8, 12), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1)
    assert got.shape == (1, 8, 12, 16)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    model(torch.randn(1, 1, 64, 96)).square().mean().backward()  # the embedding learns at other sizes too
    assert model.position_embedding.grad.abs().sum() > 0


def test_clean_model_bf16_and_autocast_close_to_fp32():
    model = _tiny().eval()
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        expected = model(x)
        scale = expected.abs().max().item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
        low = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert torch.isfinite(mixed).all()
    assert (low.float() - expected).abs().max().item() < 5e-2 * scale
    assert (mixed.float() - expected).abs().max().item() < 5e-2 * scale


def test_clean_model_trains():
    model = _tiny().train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    torch.manual_seed(4)
    x = torch.randn(2, 1, 64, 64)
    target = torch.randint(0, 5, (2, 64, 64))
    losses = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_clean_model_bad_input_size():
    with pytest.raises(ValueError, match=r"MTUNet: argument 'x' must have shape \(B, 1, H, W\) with B ≥ 1 and H, W "
                                         r"positive multiples of 32, got \(1, 1, 100, 96\)"):
        _tiny()(torch.randn(1, 1, 100, 96))


def test_clean_model_bad_input_channels():
    with pytest.raises(ValueError, match=r"argument 'x' must have shape \(B, 3, H, W\).*got \(1, 1, 64, 64\)"):
        _tiny(3)(torch.randn(1, 1, 64, 64))


def test_clean_model_bad_input_type():
    with pytest.raises(TypeError, match=r"MTUNet: argument 'x' must be a Tensor, got list"):
        _tiny()([1.0])


def test_clean_model_bad_heads():
    with pytest.raises(ValueError, match=r"MTUNet: num_heads=3 must divide the first transformer width "
                                         r"4·base_channels=32"):
        models.MTUNet(1, 2, base_channels=8, num_heads=3)


def test_clean_model_bad_channels_argument():
    with pytest.raises(ValueError, match=r"MTUNet: argument 'in_channels' must be a positive int, got 0"):
        models.MTUNet(0)


def test_clean_model_bad_embedding_grid():
    with pytest.raises(ValueError, match=r"argument 'embedding_grid' must be two positive ints \(gh, gw\), got 28"):
        models.MTUNet(embedding_grid=28)


def test_clean_model_bad_pad_mode():
    with pytest.raises(ValueError, match=r"MTUNet: argument 'pad_mode' must be one of .*, got 'zeros'"):
        models.MTUNet(pad_mode="zeros")


def test_from_original_state_dict_unexpected_key():
    sd = {k: torch.zeros(s) for k, s in _checkpoint_shapes()}
    sd["decoder.1.block.9.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected key 'decoder.1.block.9.weight' \(not a key of MT-UNet's MTUNet\)"):
        models.MTUNet.from_original_state_dict(sd)


def test_from_original_state_dict_missing_key():
    sd = {k: torch.zeros(s) for k, s in _checkpoint_shapes()}
    del sd["bottleneck.1.EAttention.proj.bias"]
    with pytest.raises(ValueError, match=r"does not fit this model: missing \['bottleneck.1.external.proj.bias'\]"):
        models.MTUNet.from_original_state_dict(sd)


def test_from_original_state_dict_not_an_mtunet():
    with pytest.raises(ValueError, match=r"not an MT-UNet MTUNet state_dict, missing keys \['stem.model.res1"):
        models.MTUNet.from_original_state_dict({"weight": torch.zeros(2)})


def test_from_original_state_dict_bad_in_channels():
    sd = {k: torch.zeros(s) for k, s in _checkpoint_shapes()}
    with pytest.raises(ValueError, match=r"argument 'in_channels' must be 1 or 3 \(the original takes 3 and repeats 1\), "
                                         r"got 2"):
        models.MTUNet.from_original_state_dict(sd, in_channels=2)


def test_compat_mtunet_other_size_raises():
    model = C.MTUNet(2, num_tokens=16)
    with pytest.raises(ValueError, match=r"MTUNet: argument 'x' must have shape \(B, 1 or 3, 32, 32\) \(the position "
                                         r"embedding has 16 tokens\), got \(1, 3, 64, 64\)"):
        model(torch.randn(1, 3, 64, 64))


def test_compat_mtunet_bad_num_tokens():
    with pytest.raises(ValueError, match=r"num_tokens must be s·s with s a multiple of 4 .*, got 36"):
        C.MTUNet(2, num_tokens=36)


def test_compat_decoder_block_bad_skip():
    block = C.decoder_block(16, False, CFG)
    with pytest.raises(ValueError, match=r"decoder_block: argument 'skip' must have shape \(B, C_skip, 2h, 2w\) = "
                                         r"\(2, 8, 6, 6\), got \(2, 8, 5, 5\)"):
        block(torch.randn(2, 16, 3, 3), torch.randn(2, 8, 5, 5))

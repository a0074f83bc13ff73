"""compat.attention_unet: the originals' names, signatures and state_dict keys (strict loading),
same outputs, gradients and BN running statistics as the seed modules, in train and eval mode."""
import copy

import pytest
import torch
from _helpers import randomize_batch_norms

import medattn_fast
from medattn_fast.compat import attention_unet as C
from medattn_fast.reference import attention_gate as R

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)
BACKENDS = ("reference", "torch")


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    return randomize_batch_norms(module, batches_tracked=7)


def run_pair(original, twin, inputs, backend):
    """Forward + backward of both with one cotangent; compare outputs, input and parameter
    gradients, and buffers."""
    inputs_a = [t.clone().requires_grad_() for t in inputs]
    inputs_b = [t.clone().requires_grad_() for t in inputs]
    expected = original(*inputs_a)
    with medattn_fast.use_backend(backend):
        got = twin(*inputs_b)
    torch.testing.assert_close(got, expected, **TOL)
    cotangent = torch.randn_like(expected)
    expected.backward(cotangent)
    got.backward(cotangent)
    for a, b in zip(inputs_a, inputs_b):
        torch.testing.assert_close(b.grad, a.grad, **TOL)
    params_a, params_b = dict(original.named_parameters()), dict(twin.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name, p in params_a.items():
        assert (p.grad is None) == (params_b[name].grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(params_b[name].grad, p.grad, **TOL, msg=lambda m: f"grad of {name}: {m}")
    buffers_b = dict(twin.named_buffers())
    for name, buf in original.named_buffers():
        torch.testing.assert_close(buffers_b[name], buf, **TOL, msg=lambda m: f"buffer {name}: {m}")


def strict_twin(cls, original, *args, **kwargs):
    """The compat class built with the original's constructor arguments, loading its state_dict strictly."""
    twin = cls(*args, **kwargs).to(F64).train(original.training)
    twin.load_state_dict(original.state_dict(), strict=True)
    return twin


# ---------------------------------------------------------------------------------------------
# AttentionBlock (the widely copied Attention U-Net blocks)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("double_sigmoid", [False, True], ids=["seed000", "seed001"])
def test_attention_block_2d(double_sigmoid, training, backend):
    original = randomize(R.AttentionBlock(5, 7, 3, double_sigmoid=double_sigmoid)).double().train(training)
    twin = strict_twin(C.AttentionBlock, original, 5, 7, 3, double_sigmoid=double_sigmoid)
    assert list(twin.state_dict()) == list(original.state_dict())
    x, g = torch.randn(2, 5, 7, 9, dtype=F64), torch.randn(2, 7, 3, 4, dtype=F64)
    run_pair(original, twin, (x, g), backend)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_attention_block_3d_and_same_size(training):
    original = randomize(R.AttentionBlock(3, 4, 1, spatial_dims=3)).double().train(training)
    twin = strict_twin(C.AttentionBlock, original, 3, 4, 1, spatial_dims=3)
    run_pair(original, twin, (torch.randn(1, 3, 5, 4, 3, dtype=F64), torch.randn(1, 4, 2, 3, 2, dtype=F64)), "torch")
    run_pair(original, twin, (torch.randn(2, 3, 3, 4, 5, dtype=F64), torch.randn(2, 4, 3, 4, 5, dtype=F64)), "torch")


def test_attention_block_state_dict_keys():
    keys = list(C.AttentionBlock(8, 16, 4).state_dict())
    assert keys == [f"{m}.{i}.{p}" for m in ("Wx", "Wg", "psi") for i, ps in
                    ((0, ("weight", "bias")), (1, ("weight", "bias", "running_mean", "running_var",
                                                   "num_batches_tracked"))) for p in ps]


# ---------------------------------------------------------------------------------------------
# AttentionUpBlock (the widely copied Attention U-Net blocks)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_attention_up_block(training, backend):
    original = randomize(R.AttentionUpBlock(6, 4)).double().train(training)
    twin = strict_twin(C.AttentionUpBlock, original, 6, 4)
    assert list(twin.state_dict()) == list(original.state_dict())
    x, skip = torch.randn(2, 6, 4, 5, dtype=F64), torch.randn(2, 4, 7, 9, dtype=F64)
    run_pair(original, twin, (x, skip), backend)
    assert twin.upsample.weight.grad is None  # built, never used — as in the original


def test_attention_up_block_same_size_and_batch_one():
    original = randomize(R.AttentionUpBlock(3, 2, double_sigmoid=True)).double().train()
    twin = strict_twin(C.AttentionUpBlock, original, 3, 2, double_sigmoid=True)
    run_pair(original, twin, (torch.randn(1, 3, 5, 6, dtype=F64), torch.randn(1, 2, 5, 6, dtype=F64)), "torch")


def test_conv_batch_norm_fold_equals_unfolded():
    original = randomize(R.ConvBatchNorm(3, 5)).double().eval()
    twin = strict_twin(C.ConvBatchNorm, original, 3, 5)
    run_pair(original, twin, (torch.randn(2, 3, 7, 6, dtype=F64),), "torch")


# ---------------------------------------------------------------------------------------------
# Attention_block (LeeJunHyun)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_attention_block_leejunhyun(training, backend):
    original = randomize(R.Attention_block(F_g=6, F_l=4, F_int=3)).double().train(training)
    twin = strict_twin(C.Attention_block, original, F_g=6, F_l=4, F_int=3)
    assert list(twin.state_dict()) == list(original.state_dict())
    g, x = torch.randn(2, 6, 7, 5, dtype=F64), torch.randn(2, 4, 7, 5, dtype=F64)
    run_pair(original, twin, (g, x), backend)


def test_attention_block_leejunhyun_broadcast_gating_equals_upsampled():
    """The original broadcasts a 1x1 gating map; interpolating it is the same thing."""
    original = randomize(R.Attention_block(3, 2, 2)).double().train()
    twin = strict_twin(C.Attention_block, original, 3, 2, 2)
    run_pair(original, twin, (torch.randn(2, 3, 1, 1, dtype=F64), torch.randn(2, 2, 5, 7, dtype=F64)), "torch")


# ---------------------------------------------------------------------------------------------
# from_original and COMPAT_CLASSES
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_from_original_attention_block(training):
    original = randomize(R.AttentionBlock(4, 6, 2, spatial_dims=3, double_sigmoid=True)).double().train(training)
    original.Wg[1].momentum = None  # cumulative running average: must carry over
    twin = C.AttentionBlock.from_original(copy.deepcopy(original))
    assert isinstance(twin, C.AttentionBlock) and twin.double_sigmoid and twin.spatial_dims == 3
    assert twin.training == training and twin.Wx[0].weight.dtype == F64
    assert twin.Wx[0].weight.device == original.Wx[0].weight.device
    run_pair(original, twin, (torch.randn(2, 4, 5, 4, 3, dtype=F64), torch.randn(2, 6, 3, 2, 2, dtype=F64)), "torch")


def test_from_original_keeps_bias_free_convs_and_bn_settings():
    original = randomize(R.AttentionBlock(4, 5, 3)).double().train()
    original.Wx[0].register_parameter("bias", None)
    original.psi[1].eps = 1e-3
    original.psi[1].momentum = 0.25
    twin = C.AttentionBlock.from_original(copy.deepcopy(original))
    assert twin.Wx[0].bias is None and twin.psi[1].eps == 1e-3 and twin.psi[1].momentum == 0.25
    run_pair(original, twin, (torch.randn(2, 4, 6, 5, dtype=F64), torch.randn(2, 5, 3, 3, dtype=F64)), "torch")


def test_from_original_double_sigmoid_argument_for_classes_without_the_flag():
    """A seed-001 class has its extra sigmoid in code, not as an attribute: the argument says so."""
    original = randomize(R.AttentionBlock(3, 3, 2, double_sigmoid=True)).double().eval()
    flagless = torch.nn.Module()  # same submodules, no ``double_sigmoid`` attribute
    flagless.Wx, flagless.Wg, flagless.psi = (copy.deepcopy(m) for m in (original.Wx, original.Wg, original.psi))
    flagless.eval()
    assert not C.AttentionBlock.from_original(flagless).double_sigmoid  # default: the single sigmoid
    twin = C.AttentionBlock.from_original(flagless, double_sigmoid=True)
    assert twin.double_sigmoid
    run_pair(original, twin, (torch.randn(2, 3, 5, 5, dtype=F64), torch.randn(2, 3, 2, 2, dtype=F64)), "torch")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_from_original_attention_up_block(training):
    original = randomize(R.AttentionUpBlock(5, 4, double_sigmoid=True)).double().train(training)
    twin = C.AttentionUpBlock.from_original(copy.deepcopy(original))
    assert twin.training == training and twin.attention.double_sigmoid
    run_pair(original, twin, (torch.randn(2, 5, 3, 4, dtype=F64), torch.randn(2, 4, 6, 7, dtype=F64)), "torch")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_from_original_attention_block_leejunhyun(training):
    original = randomize(R.Attention_block(5, 3, 2)).double().train(training)
    twin = C.Attention_block.from_original(copy.deepcopy(original))
    assert twin.training == training and twin.W_g[0].in_channels == 5 and twin.W_x[0].in_channels == 3
    run_pair(original, twin, (torch.randn(2, 5, 4, 6, dtype=F64), torch.randn(2, 3, 4, 6, dtype=F64)), "torch")


def test_compat_classes_registry():
    assert C.COMPAT_CLASSES == {"AttentionBlock": (C.AttentionBlock, C.MonaiAttentionBlock),
                                "AttentionUpBlock": C.AttentionUpBlock, "Attention_block": C.Attention_block,
                                "GridAttentionBlock2D": C.GridAttentionBlock2D,
                                "GridAttentionBlock3D": C.GridAttentionBlock3D}
    for name, cls in C.COMPAT_CLASSES.items():
        for twin in cls if isinstance(cls, tuple) else (cls,):
            assert callable(getattr(twin, "from_original"))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_convert_swaps_every_gate_and_keeps_outputs(training):
    model = randomize(torch.nn.ModuleDict({
        "up": R.AttentionUpBlock(6, 4), "gate": R.Attention_block(3, 4, 2),
        "block3d": R.AttentionBlock(4, 6, 2, spatial_dims=3)})).double().train(training)
    original = copy.deepcopy(model)
    # imported from the submodule: the package-level ``medattn_fast.convert`` function is shadowed
    # by the ``medattn_fast.convert`` module once that module has been imported
    from medattn_fast.convert import convert
    report = convert(model, families=["attention_unet"])
    assert len(report) == 3
    assert isinstance(model["up"], C.AttentionUpBlock) and isinstance(model["up"].attention, C.AttentionBlock)
    assert isinstance(model["gate"], C.Attention_block) and isinstance(model["block3d"], C.AttentionBlock)
    assert model.training == training
    run_pair(original["up"], model["up"], (torch.randn(2, 6, 4, 5, dtype=F64), torch.randn(2, 4, 7, 9, dtype=F64)),
             "torch")
    run_pair(original["block3d"], model["block3d"],
             (torch.randn(2, 4, 3, 5, 4, dtype=F64), torch.randn(2, 6, 2, 3, 2, dtype=F64)), "torch")


# ---------------------------------------------------------------------------------------------
# Oktay's grid gate: GridAttentionBlock2D / 3D
# ---------------------------------------------------------------------------------------------

class GridAttentionBlock2D(R.GridAttentionBlock):
    """Stands in for Oktay's class of that name: the reference's module tree and keys are the
    original's (reference/attention_gate.py)."""


class GridAttentionBlock3D(R.GridAttentionBlock):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, spatial_dims=3, **kwargs)


def run_grid_pair(original, twin, x, g, backend):
    """(W_y, α) of both, then every gradient and buffer, for one pair of cotangents."""
    xa, ga, xb, gb = (t.clone().requires_grad_() for t in (x, g, x, g))
    expected = original(xa, ga)
    with medattn_fast.use_backend(backend):
        got = twin(xb, gb)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, **TOL)
    cots = [torch.randn_like(e) for e in expected]
    torch.autograd.backward(expected, cots)
    torch.autograd.backward(got, cots)
    torch.testing.assert_close(xb.grad, xa.grad, **TOL)
    torch.testing.assert_close(gb.grad, ga.grad, **TOL)
    for (name, a), (_, b) in zip(original.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, **TOL, msg=lambda m: f"grad {name}: {m}")
    for (name, a), (_, b) in zip(original.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b, a, **TOL, msg=lambda m: f"buffer {name}: {m}")


@pytest.mark.parametrize("backend", ("reference", "torch", "cpp"))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_grid_attention_block_matches_oktay(spatial_dims, training, backend):
    if spatial_dims == 2:
        original, cls = GridAttentionBlock2D(4, 6, 3, sub_sample_factor=(2, 3)), C.GridAttentionBlock2D
        x, g = torch.randn(2, 4, 9, 11, dtype=F64), torch.randn(2, 6, 3, 2, dtype=F64)
        twin = cls(4, 6, 3, sub_sample_factor=(2, 3))
    else:
        original, cls = GridAttentionBlock3D(3, 5, sub_sample_factor=2), C.GridAttentionBlock3D
        x, g = torch.randn(2, 3, 5, 6, 7, dtype=F64), torch.randn(2, 5, 2, 3, 3, dtype=F64)
        twin = cls(3, 5, sub_sample_factor=2)
    original = randomize(original).double().train(training)
    assert set(twin.state_dict()) == set(original.state_dict())
    twin.load_state_dict(original.state_dict(), strict=True)
    run_grid_pair(original, twin.double().train(training), x, g, backend)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_convert_swaps_grid_blocks(training):
    from medattn_fast.convert import convert

    model = randomize(torch.nn.ModuleDict({"g2": GridAttentionBlock2D(4, 6, 2, sub_sample_factor=2),
                                           "g3": GridAttentionBlock3D(3, 5, 2, sub_sample_factor=2)}))
    model = model.double().train(training)
    original = copy.deepcopy(model)
    report = convert(model, families=["attention_unet"])
    assert len(report) == 2
    assert type(model["g2"]) is C.GridAttentionBlock2D and type(model["g3"]) is C.GridAttentionBlock3D
    assert model["g2"].sub_sample_factor == (2, 2) and model["g2"].training == training
    run_grid_pair(original["g2"], model["g2"], torch.randn(2, 4, 9, 8, dtype=F64), torch.randn(2, 6, 3, 4, dtype=F64),
                  "cpp")
    run_grid_pair(original["g3"], model["g3"], torch.randn(1, 3, 6, 5, 4, dtype=F64),
                  torch.randn(1, 5, 3, 2, 2, dtype=F64), "cpp")


def test_grid_block_refuses_other_modes():
    with pytest.raises(ValueError, match="only mode 'concatenation'.*got 'concatenation_debug'"):
        C.GridAttentionBlock2D(4, 6, mode="concatenation_debug")


class GridNet3D(torch.nn.Module):
    """Oktay's ``unet_grid_attention_3D`` in miniature (a restatement): the encoder pools by
    (2, 2, 1), so the gating signal keeps the input's depth while each gate's strided θ grid halves
    it — g is downsampled along depth and upsampled along height and width."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv3d
        self.conv3 = torch.nn.Sequential(conv(2, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.ReLU())
        self.conv4 = torch.nn.Sequential(conv(4, 6, 3, padding=1), torch.nn.BatchNorm3d(6), torch.nn.ReLU())
        self.center = torch.nn.Sequential(conv(6, 8, 3, padding=1), torch.nn.BatchNorm3d(8), torch.nn.ReLU())
        self.gating = torch.nn.Sequential(conv(8, 6, 1), torch.nn.BatchNorm3d(6), torch.nn.ReLU())
        self.pool = torch.nn.MaxPool3d(kernel_size=(2, 2, 1))
        self.attentionblock3 = GridAttentionBlock3D(4, 6, 4, sub_sample_factor=(2, 2, 2))
        self.attentionblock4 = GridAttentionBlock3D(6, 6, 6, sub_sample_factor=(2, 2, 2))

    def forward(self, x):
        conv3 = self.conv3(x)
        conv4 = self.conv4(self.pool(conv3))
        gating = self.gating(self.center(self.pool(conv4)))
        g_conv4, att4 = self.attentionblock4(conv4, gating)
        g_conv3, att3 = self.attentionblock3(conv3, gating)
        return g_conv3, att3, g_conv4, att4


@pytest.mark.parametrize("backend", ("torch", "cpp"))
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_convert_grid_network_with_a_full_depth_gating_signal(training, backend):
    from medattn_fast.convert import convert

    model = randomize(GridNet3D()).double().train(training)
    original = copy.deepcopy(model)
    report = convert(model, families=["attention_unet"])
    assert [p for p, _, _ in report.swapped] == ["attentionblock3", "attentionblock4"]
    x = torch.randn(2, 2, 8, 8, 5, dtype=F64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = original(xa)
    with medattn_fast.use_backend(backend):
        got = model(xb)
    assert expected[0].shape == (2, 4, 8, 8, 5)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, **TOL)
    cots = [torch.randn_like(e) for e in expected]
    torch.autograd.backward(expected, cots)
    torch.autograd.backward(got, cots)
    torch.testing.assert_close(xb.grad, xa.grad, **TOL)
    for (name, a), (_, b) in zip(original.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, **TOL, msg=lambda m: f"grad {name}: {m}")
    for (name, a), (_, b) in zip(original.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(b, a, **TOL, msg=lambda m: f"buffer {name}: {m}")


@pytest.mark.parametrize("mode", ["concatenation_debug", "concatenation_residual"])
def test_convert_skips_oktays_other_modes(mode):
    from medattn_fast.convert import convert

    model = torch.nn.ModuleDict({"gate": GridAttentionBlock3D(3, 5, 2, sub_sample_factor=2, mode=mode)})
    report = convert(model)
    assert len(report) == 0 and type(model["gate"]) is GridAttentionBlock3D
    (path, _, why), = report.skipped
    assert path == "gate" and f"mode {mode!r} is not reproduced" in why
    x, g = torch.randn(1, 3, 4, 4, 4), torch.randn(1, 5, 2, 2, 2)
    out, alpha = model["gate"](x, g)   # the restatement's own mode still runs
    if mode == "concatenation_residual":   # a softmax over the coarse positions, upsampled
        assert alpha.shape == (1, 1, 4, 4, 4) and float(alpha.detach().max()) < 1


def test_convert_monai_attention_unet():
    """MONAI's AttentionBlock shares the seeds' class name; convert swaps it for its own twin.
    (The restatement's code is ours, not MONAI's: it is vouched for with trust=; real MONAI 1.6.1 is
    recognised by its code fingerprint.)"""
    from medattn_fast.testing.monai_attention_unet import AttentionBlock as MonaiBlock, AttentionUnet
    from medattn_fast.convert import convert

    torch.manual_seed(0)
    model = randomize(AttentionUnet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2))).double()
    refused = convert(copy.deepcopy(model))
    assert len(refused) == 0 and all("code fingerprint" in why for _, _, why in refused.skipped)
    for training in (False, True):
        model.train(training)
        original = copy.deepcopy(model)
        converted = copy.deepcopy(model)
        report = convert(converted, trust=[MonaiBlock])
        assert [p for p, _, _ in report.swapped] == ["model.1.attention", "model.1.submodule.1.attention"]
        assert type(converted.model[1].attention) is C.MonaiAttentionBlock
        assert converted.state_dict().keys() == original.state_dict().keys()
        run_pair(original, converted, (torch.randn(2, 1, 12, 8, dtype=F64),), "cpp")

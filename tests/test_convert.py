"""convert(model): swaps the originals (found by class name and parameter structure) anywhere in a
model, keeps weights, buffers, mode and device, and reports what it did."""
import pytest
import torch
from torch import nn

import medattn_fast
from medattn_fast.reference import danet as ref_danet


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Sequential(ref_danet.PAM_Module(16), nn.ReLU(), ref_danet.CAM_Module(16))

    def forward(self, x):
        return self.head(self.stem(x))


class PAM_Module(nn.Module):  # a stranger with the original's name but another structure
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x * self.weight.sum()


def test_convert_swaps_keeps_outputs_grads_and_mode():
    net = _Net().double()
    with torch.no_grad():
        for m in net.head:
            if hasattr(m, "gamma"):
                m.gamma.fill_(0.7)
    net.eval()
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    expected = net(x)
    (g_expected,) = torch.autograd.grad(expected.square().sum(), x)
    state = {k: v.clone() for k, v in net.state_dict().items()}

    report = medattn_fast.convert(net)

    assert [p for p, _, _ in report.swapped] == ["head.0", "head.2"]
    assert type(net.head[0]).__module__ == "medattn_fast.compat.danet"
    assert type(net.head[2]).__module__ == "medattn_fast.compat.danet"
    assert not net.training and not net.head[0].training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    got = net(x)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_got, g_expected, rtol=1e-10, atol=1e-10)
    assert "head.0" in str(report) and "swapped 2 module(s)" in str(report)


def test_convert_is_idempotent():
    net = _Net()
    assert len(medattn_fast.convert(net)) == 2
    assert len(medattn_fast.convert(net)) == 0


def test_convert_leaves_a_same_named_stranger_alone():
    net = nn.Sequential(PAM_Module())
    report = medattn_fast.convert(net)
    assert len(report) == 0 and type(net[0]) is PAM_Module
    assert report.skipped and report.skipped[0][0] == "0"


def test_convert_families_filter_and_bad_arguments():
    net = _Net()
    assert len(medattn_fast.convert(net, families=["mtunet"])) == 0
    with pytest.raises(ValueError, match="families"):
        medattn_fast.convert(net, families=["resnet"])
    with pytest.raises(TypeError, match="argument 'model' must be a torch.nn.Module, got str"):
        medattn_fast.convert("not a model")


# ---------------------------------------------------------------------------------------------
# the swap keeps what a training script holds (as SyncBatchNorm.convert_sync_batchnorm does)
# ---------------------------------------------------------------------------------------------

def _gate_net():
    from medattn_fast.reference import attention_gate as ref_gate

    net = nn.ModuleDict({"gate": ref_gate.AttentionBlock(4, 6, 3), "pam": ref_danet.PAM_Module(16)}).double()
    with torch.no_grad():
        net["pam"].gamma.fill_(0.5)
    return net


def test_convert_keeps_parameter_objects_flags_and_an_optimizer_trains_them():
    net = _gate_net().train()
    params_before = {name: p for name, p in net.named_parameters()}
    buffers_before = {name: b for name, b in net.named_buffers()}
    net["gate"].Wg[0].bias.requires_grad_(False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    report = medattn_fast.convert(net)

    assert [p for p, _, _ in report.swapped] == ["gate", "pam"]
    assert type(net["gate"]).__module__ == "medattn_fast.compat.attention_unet"
    for name, p in net.named_parameters():
        assert p is params_before[name], name
    for name, b in net.named_buffers():
        assert b is buffers_before[name], name
    assert net["gate"].Wx is not None and not net["gate"].Wg[0].bias.requires_grad
    assert net.training and net["gate"].training and net["gate"].Wx[1].training
    snapshot = {name: p.detach().clone() for name, p in net.named_parameters()}
    x, g = torch.randn(2, 4, 6, 5, dtype=torch.float64), torch.randn(2, 6, 3, 3, dtype=torch.float64)
    loss = net["gate"](x, g).square().sum() + net["pam"](torch.randn(2, 16, 3, 4, dtype=torch.float64)).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    moved = {name for name, p in net.named_parameters() if not torch.equal(p, snapshot[name])}
    assert {"gate.Wx.0.weight", "gate.Wg.0.weight", "gate.psi.0.weight", "pam.query_conv.weight",
            "pam.gamma"} <= moved
    assert "gate.Wg.0.bias" not in moved   # frozen before convert: still frozen


def test_convert_keeps_the_swapped_modules_hooks():
    net = _gate_net().eval()
    calls = []
    handle = net["gate"].register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    net["gate"].register_forward_pre_hook(lambda m, args: calls.append("pre"))
    medattn_fast.convert(net)
    x, g = torch.randn(1, 4, 5, 5, dtype=torch.float64), torch.randn(1, 6, 2, 2, dtype=torch.float64)
    net["gate"](x, g)
    assert calls == ["pre", "AttentionBlock"] and type(net["gate"]).__module__.startswith("medattn_fast.compat")
    handle.remove()   # the user's handle still removes the hook from the swapped module
    net["gate"](x, g)
    assert calls == ["pre", "AttentionBlock", "pre"]


def test_convert_skips_a_block_whose_submodules_carry_hooks():
    net = _gate_net()
    net["gate"].Wx[0].register_forward_hook(lambda m, args, out: None)
    report = medattn_fast.convert(net)
    assert [p for p, _, _ in report.swapped] == ["pam"]
    assert report.skipped[0][0] == "gate" and "Wx.0" in report.skipped[0][2] and "hooks" in report.skipped[0][2]


def test_convert_dry_run_reports_and_changes_nothing():
    net = _gate_net()
    before = [type(m) for m in net.modules()]
    report = medattn_fast.convert(net, dry_run=True)
    assert [type(m) for m in net.modules()] == before
    assert report.dry_run and len(report) == 2 and str(report).startswith("convert: would swap 2 module(s)")


class CAM_Module(nn.Module):  # noqa: N801 - a public 3-D fork of DANet's CAM: same single gamma
    def __init__(self, in_dim):
        super().__init__()
        self.chanel_in = in_dim
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        m_batchsize, C, depth, height, width = x.size()
        proj_query = x.view(m_batchsize, C, -1)
        energy = torch.bmm(proj_query, proj_query.permute(0, 2, 1))
        energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        out = torch.bmm(self.softmax(energy_new), proj_query).view(m_batchsize, C, depth, height, width)
        return self.gamma * out + x


def test_convert_skips_a_fork_whose_forward_differs_and_says_why():
    net = nn.Sequential(CAM_Module(8), ref_danet.CAM_Module(8))
    report = medattn_fast.convert(net)
    assert [p for p, _, _ in report.swapped] == ["1"] and type(net[0]) is CAM_Module
    (path, cls, why), = report.skipped
    assert path == "0" and cls.endswith("CAM_Module") and "code fingerprint" in why and "trust=" in why
    x = torch.randn(2, 8, 3, 4, 5)
    net[0].gamma.data.fill_(0.3)
    assert net[0](x).shape == x.shape   # still the fork's own 3-D forward


def test_code_fingerprint_ignores_comments_docstrings_and_layout_only():
    from medattn_fast.convert import code_fingerprint

    class A(nn.Module):
        def forward(self, x):
            """doc"""
            return x * 2  # comment

    class B(nn.Module):
        def forward(self,   x):

            return x   *   2

    class C(nn.Module):
        def forward(self, x):
            return x * 3

    assert code_fingerprint(A) == code_fingerprint(B) != code_fingerprint(C)
    assert code_fingerprint(ref_danet.CAM_Module) != code_fingerprint(CAM_Module)


def test_convert_trust_argument():
    net = nn.Sequential(PAM_Module())
    report = medattn_fast.convert(net, trust=[PAM_Module])   # vouched for, but its structure is not PAM's
    assert len(report) == 0 and "from_original refused it" in report.skipped[0][2]
    with pytest.raises(TypeError, match="argument 'trust' must hold nn.Module classes"):
        medattn_fast.convert(net, trust=["PAM_Module"])


# ---------------------------------------------------------------------------------------------
# from_original refuses an original not built like its twin (the twin's forward would compute
# something else), in every family; convert() skips such a module and says why
# ---------------------------------------------------------------------------------------------
def _fork(name):
    """(compat class, original with one layer changed in a setting no parameter carries, the error,
    the original's inputs)."""
    from medattn_fast.compat import attention_unet as gate, danet, guided_attention as guided, mtunet
    from medattn_fast.reference import attention_gate as ref_gate, guided_attention as ref_guided
    from medattn_fast.reference import mtunet as ref_mtunet

    configs = {"win_size": 4, "head": 2}
    if name == "danet-dilated-stem":
        module = ref_danet.DANetHead(64, 3)
        module.conv5a[0] = nn.Conv2d(64, 16, 3, padding=2, dilation=2, bias=False)
        return danet.DANetHead, module, r"conv5a\.0 must be Conv2d\(64, 16.*padding=\(1, 1\).*got .*dilation=\(2, 2\)", \
            (torch.randn(2, 64, 9, 11),)
    if name == "danet-dropout-rate":
        module = ref_danet.DANetHead(64, 3)
        module.conv8[0] = nn.Dropout2d(0.5)
        return danet.DANetHead, module, r"conv8\.0 must be Dropout2d\(p=0\.1.*got Dropout2d\(p=0\.5", \
            (torch.randn(2, 64, 9, 11),)
    if name == "guided-leaky-relu":
        module = ref_guided.GuidedAttentionModule(8, 8)
        module.attention_map_conv[2] = nn.LeakyReLU(0.2)
        return guided.GuidedAttentionModule, module, r"attention_map_conv\.2 must be ReLU\(\), got LeakyReLU", \
            (torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6))
    if name == "gate-group-norm":
        module = ref_gate.Attention_block(4, 6, 3)
        module.psi[1] = nn.GroupNorm(1, 1)
        return gate.Attention_block, module, r"psi\.1 must be a BatchNorm, got GroupNorm", \
            (torch.randn(2, 4, 5, 6), torch.randn(2, 6, 5, 6))
    if name == "mtunet-softmax-dim":
        module = ref_mtunet.Attention(16, configs)
        module.softmax = nn.Softmax(dim=-2)
        return mtunet.Attention, module, r"softmax must be Softmax\(dim=-1\), got Softmax\(dim=-2\)", \
            (torch.randn(2, 3, 3, 16, 16),)
    module = ref_mtunet.CSAttention(16, configs)          # "mtunet-upsample-factor"
    module.up = nn.UpsamplingBilinear2d(scale_factor=2)
    return mtunet.CSAttention, module, r"up must be UpsamplingBilinear2d\(scale_factor=4\.0.*got .*scale_factor=2\.0", \
        (torch.randn(2, 64, 16),)


FORKS = ["danet-dilated-stem", "danet-dropout-rate", "guided-leaky-relu", "gate-group-norm", "mtunet-softmax-dim",
         "mtunet-upsample-factor"]


@pytest.mark.parametrize("name", FORKS)
def test_from_original_refuses_a_module_not_built_like_its_twin(name, monkeypatch):
    torch.manual_seed(0)
    compat_class, fork, message, inputs = _fork(name)
    fork = fork.double().train(name == "danet-dropout-rate")
    inputs = [x.double() for x in inputs]

    with pytest.raises(ValueError, match=message):
        compat_class.from_original(fork)
    report = medattn_fast.convert(nn.Sequential(fork))
    assert "0" not in [path for path, _, _ in report.swapped]
    assert [why for path, _, why in report.skipped if path == "0"][0].startswith(
        f"{compat_class.__name__}.from_original refused it: ValueError")

    # the refusal is needed: without the check the twin computes something else than the fork,
    # answers where the fork itself fails, or fails with an unclear error (a gate reading a
    # GroupNorm's running statistics)
    monkeypatch.setattr(compat_class, "_check_layers", classmethod(lambda cls, new, module: None))
    if name == "gate-group-norm":
        with pytest.raises(AttributeError, match="'GroupNorm' object has no attribute 'running_mean'"):
            compat_class.from_original(fork)(*inputs)
        return
    twin = compat_class.from_original(fork)
    torch.manual_seed(1)
    got = twin(*inputs)
    torch.manual_seed(1)
    if name == "mtunet-upsample-factor":
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            fork(*inputs)
        return
    want = fork(*inputs)
    got, want = (t[0] if isinstance(t, tuple) else t for t in (got, want))
    assert (got - want).abs().max() > 1e-3


def test_convert_skips_a_module_whose_submodule_code_is_edited(tmp_path, monkeypatch):
    # a user's copy of MT-UNet's file with ConvBNReLU edited: encoder_block's own code is the
    # original's, but its twin would run our ConvBNReLU in place of the edited one
    import importlib
    import pathlib

    from medattn_fast.reference import mtunet as ref_mtunet

    source = pathlib.Path(ref_mtunet.__file__).read_text()
    source = source.replace("from .gaussian_trans import", "from medattn_fast.reference.gaussian_trans import")
    edited = source.replace("            x = self.relu(x)\n        return x", "            x = self.relu(x) * 0.5\n        return x")
    assert edited != source
    (tmp_path / "user_mtunet.py").write_text(edited)
    monkeypatch.syspath_prepend(str(tmp_path))
    user = importlib.import_module("user_mtunet")
    torch.manual_seed(0)
    net = nn.Sequential(user.encoder_block(16, {"win_size": 4, "head": 2})).double().eval()
    x = torch.randn(2, 64, 16, dtype=torch.float64)
    want = net(x)

    report = medattn_fast.convert(net)
    why = [why for path, _, why in report.skipped if path == "0"][0]
    assert "its submodule block.2 (user_mtunet.ConvBNReLU) has code" in why and "trust=[ConvBNReLU]" in why
    assert [path for path, _, _ in report.swapped] == ["0.block.0", "0.block.1"]   # the EAmodules
    torch.testing.assert_close(net(x)[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net(x)[1], want[1], rtol=1e-10, atol=1e-10)

    trusting = nn.Sequential(user.encoder_block(16, {"win_size": 4, "head": 2}))
    assert [p for p, _, _ in medattn_fast.convert(trusting, trust=[user.ConvBNReLU]).swapped] == ["0"]

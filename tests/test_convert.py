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

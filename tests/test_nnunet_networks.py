"""Attention-gated nnU-Net networks built through nnU-Net's own ``get_network_from_plans`` (the
dotted class path in the plans): both families, 2-D and 3-D with anisotropic strides and kernels,
the deep-supervision outputs and toggle, the state_dict keys, the fused gate backends against the
reference inside the network, torch.compile without graph breaks, and the warm start from a stock
network. Skipped where nnU-Net is not installed (CI's newest-torch stage installs it)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 not installed (pip install \"medattn-fast[nnunet]\")")

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: E402

import medattn_fast  # noqa: E402
from medattn_fast.integrations import nnunet as integration  # noqa: E402
from medattn_fast.integrations.nnunet.plans import gated_architecture  # noqa: E402
from medattn_fast.nn import AttentionGate  # noqa: E402

from _nnunet_plans import architecture, patch_size  # noqa: E402

NUM_CLASSES = 3


def build(arch: dict, *, gated: bool, deep_supervision: bool = True, **gate_kwargs) -> torch.nn.Module:
    if gated:
        arch = gated_architecture(arch, **gate_kwargs)
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  1, NUM_CLASSES, allow_init=True, deep_supervision=deep_supervision)


def _randomise_norms(network: torch.nn.Module) -> None:
    """nnU-Net initialises the norms' affine parameters to 1 / 0: draw them, so that a swapped
    scale and shift would show."""
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, (torch.nn.modules.batchnorm._NormBase)) and m.affine:
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)


@pytest.mark.parametrize("family", ["plain", "resenc"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("gate_from", ["coarse", "upsampled"])
def test_built_by_nnunet_outputs_and_keys(family, dims, gate_from):
    arch = architecture(family, dims)
    network = build(arch, gated=True, gate_from=gate_from)
    expected_class = (integration.AttentionGatedPlainConvUNet if family == "plain"
                      else integration.AttentionGatedResidualEncoderUNet)
    assert type(network) is expected_class
    stock = build(arch, gated=False)
    stock_keys, keys = set(stock.state_dict()), set(network.state_dict())
    assert stock_keys < keys and all(k.startswith("decoder.gates.") for k in keys - stock_keys)

    strides = arch["arch_kwargs"]["strides"]
    features = arch["arch_kwargs"]["features_per_stage"]
    gates = list(network.decoder.gates)
    assert len(gates) == len(strides) - 1
    for s, gate in enumerate(gates):   # decoder order: coarsest skip first
        skip, below = features[-(s + 2)], features[-(s + 1)]
        assert isinstance(gate, AttentionGate) and gate.norm == "instance"
        assert gate.x_conv.in_channels == skip and gate.x_conv.out_channels == skip // 2
        assert gate.g_conv.in_channels == (below if gate_from == "coarse" else skip)

    size = patch_size(dims)
    x = torch.randn(2, 1, *size)
    outputs = network(x)
    sizes, current = [], list(size)
    for stride in strides:   # resolution of each stage, highest first
        current = [c // s for c, s in zip(current, stride)]
        sizes.append(tuple(current))
    sizes = sizes[:-1]   # one output per decoder stage; the bottleneck has none
    assert isinstance(outputs, list) and [tuple(o.shape) for o in outputs] == [(2, NUM_CLASSES, *s) for s in sizes]
    outputs_again, alphas = network(x, return_attention=True)
    assert [tuple(a.shape) for a in alphas] == [(2, 1, *s) for s in sizes]
    assert all(bool(((a > 0) & (a < 1)).all()) for a in alphas)

    network.decoder.deep_supervision = False   # what nnU-Net's trainer toggles for validation/inference
    single = network(x)
    assert isinstance(single, torch.Tensor) and single.shape == outputs[0].shape
    torch.testing.assert_close(single, outputs_again[0])


def test_gate_norm_follows_the_network():
    for norm, expected in (("batch", "batch"), (None, None), ("instance", "instance")):
        network = build(architecture("plain", 3, norm=norm), gated=True)
        assert {g.norm for g in network.decoder.gates} == {expected}
        if norm == "batch":
            assert isinstance(network.decoder.gates[0].x_norm, torch.nn.BatchNorm3d)
    with pytest.raises(ValueError, match="norm_op.*BatchNorm or InstanceNorm.*GroupNorm"):
        integration.gate_norm_of(torch.nn.GroupNorm)
    with pytest.raises(ValueError, match="gate_from must be one of"):
        build(architecture("plain", 2), gated=True, gate_from="sideways")


@pytest.mark.parametrize("norm", ["batch", None])
@pytest.mark.parametrize("train", [True, False])
def test_fused_gate_backends_equal_reference_inside_the_network(norm, train):
    torch.manual_seed(1)
    network = build(architecture("plain", 3, norm=norm), gated=True).double()
    _randomise_norms(network)
    if norm == "batch":   # running statistics that are not the initial 0 / 1
        network.train()
        with torch.no_grad():
            network(torch.randn(2, 1, *patch_size(3), dtype=torch.float64))
    network.train(train)
    x = torch.randn(2, 1, *patch_size(3), dtype=torch.float64, requires_grad=True)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    results = {}
    for backend in ("reference", "torch", "cpp"):
        network.load_state_dict(state)   # each backend starts from the same running statistics
        with medattn_fast.use_backend(backend):
            outputs = network(x)
            cot = [torch.randn_like(o, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outputs)]
            loss = sum((o * c).sum() for o, c in zip(outputs, cot))
            grads = torch.autograd.grad(loss, [x, *network.parameters()])
        results[backend] = (outputs, grads, {k: v.clone() for k, v in network.state_dict().items()})
    names = ["x", *(n for n, _ in network.named_parameters())]
    for backend in ("torch", "cpp"):
        for got, want in zip(results[backend][0], results["reference"][0]):
            torch.testing.assert_close(got, want)
        for name, got, want in zip(names, results[backend][1], results["reference"][1]):
            torch.testing.assert_close(got, want, msg=lambda m, n=name: f"{backend}: gradient of {n}: {m}")
        for key, value in results[backend][2].items():   # running statistics updated alike
            torch.testing.assert_close(value, results["reference"][2][key], msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_compiles_without_graph_breaks(norm):
    """fullgraph=True raises at the first graph break; the training forward (deep supervision
    outputs, batch statistics) is what nnU-Net compiles on CUDA."""
    torch._dynamo.reset()
    network = build(architecture("plain", 2, norm=norm), gated=True)
    x = torch.randn(2, 1, *patch_size(2))
    state = {k: v.clone() for k, v in network.state_dict().items()}
    compiled = torch.compile(network, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    network.load_state_dict(state)
    for g, want in zip(got, network(x)):
        torch.testing.assert_close(g, want)


@pytest.mark.parametrize("family,dims,norm", [("plain", 3, "instance"), ("resenc", 2, "batch"),
                                              ("plain", 2, None)])
def test_warm_start_equals_the_stock_network(family, dims, norm):
    torch.manual_seed(2)
    arch = architecture(family, dims, norm=norm)
    stock = build(arch, gated=False)
    _randomise_norms(stock)
    network = build(arch, gated=True)
    changed = integration.warm_start(network, stock.state_dict())
    assert len(changed) == 2 * len(network.decoder.gates)
    x = torch.randn(2, 1, *patch_size(dims))
    for train in (True, False):
        stock.train(train)
        network.train(train)
        outputs, alphas = network(x, return_attention=True)
        for got, want in zip(outputs, stock(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert all(bool((a == 0.5).all()) for a in alphas)
    # the gates learn from the first step on: their last norm (or psi conv) gets a gradient
    network.train()
    sum(o.square().sum() for o in network(x)).backward()
    for gate in network.decoder.gates:
        learning = gate.psi_norm.weight if gate.psi_norm is not None else gate.psi_conv.weight
        assert learning.grad is not None and float(learning.grad.abs().max()) > 0


def test_warm_start_refuses_weights_that_do_not_fit():
    stock = build(architecture("plain", 2), gated=False)
    weights = stock.state_dict()
    network = build(architecture("plain", 2), gated=True)
    missing = dict(weights)
    missing.pop("decoder.stages.0.convs.0.conv.weight")
    with pytest.raises(ValueError, match=r"missing \['decoder.stages.0.convs.0.conv.weight'\]"):
        integration.warm_start(network, missing)
    other = build(architecture("plain", 2, features=(4, 8, 16)), gated=False).state_dict()
    with pytest.raises(ValueError, match="shape mismatches"):
        integration.warm_start(network, other)


def test_warm_start_checkpoint_loads_through_nnunets_pretrained_weights(tmp_path):
    """nnU-Net's ``-pretrained_weights`` refuses a stock checkpoint for the gated network (a key of
    the new network is missing); the converted checkpoint loads, with the stock weights and the
    pass-through gates."""
    from _nnunet_plans import DATASET_JSON, plans
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    plans_dict = plans(architecture("plain", 3), architecture("plain", 2))
    stock = integration.build_network(plans_dict, "3d_fullres", DATASET_JSON)
    _randomise_norms(stock)
    stock_file = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": stock.state_dict(), "optimizer_state": {"x": 1}, "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans_dict, "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": DATASET_JSON}}, stock_file)
    gated = integration.build_network(plans_dict, "3d_fullres", DATASET_JSON, gated=True)
    with pytest.raises(AssertionError, match="decoder.gates"):
        load_pretrained_weights(gated, str(stock_file))

    out = tmp_path / "gated.pth"
    written = integration.convert_checkpoint(stock_file, out)
    assert "optimizer_state" not in written and written["trainer_name"] == "nnUNetTrainer"
    load_pretrained_weights(gated, str(out))
    loaded = gated.state_dict()
    for key, value in stock.state_dict().items():
        if ".seg_layers." in key:   # nnU-Net's rule: pretrained weights never carry the heads
            continue
        first_conv = key.startswith("decoder.stages.") and key.endswith(("convs.0.conv.weight",
                                                                          "convs.0.all_modules.0.weight"))
        if first_conv:
            half = value.shape[1] // 2
            torch.testing.assert_close(loaded[key][:, :half], value[:, :half])
            torch.testing.assert_close(loaded[key][:, half:], 2 * value[:, half:])
        else:
            torch.testing.assert_close(loaded[key], value, msg=lambda m, k=key: f"{k}: {m}")
    assert all(float(g.psi_norm.weight.abs().max()) == 0 for g in gated.decoder.gates)

"""``AttentionGate(norm=...)``: BatchNorm (fused, as before), no norm (fused) and InstanceNorm
(nnU-Net's networks' norm: the module's own layers, unfused).

InstanceNorm normalises each image by its own statistics, which is what a training-mode BatchNorm
computes on a batch of one image: so the InstanceNorm gate on a batch must equal, image by image,
the BatchNorm gate's ``reference`` backend in training mode with the same weights — forward and
every gradient (an independent oracle, not the same code)."""
from __future__ import annotations

import pytest
import torch

import medattn_fast
from medattn_fast.nn import AttentionGate
from medattn_fast.nn.attention_gate import UNFUSED_NORMS

torch.manual_seed(0)


def _randomise(gate: AttentionGate) -> AttentionGate:
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return gate


def _twin_batchnorm(instance_gate: AttentionGate, **kwargs) -> AttentionGate:
    """A BatchNorm gate with the instance gate's weights (the norms' affine parameters included)."""
    twin = AttentionGate(*kwargs.pop("sizes"), norm="batch", dtype=torch.float64, **kwargs)
    missing, unexpected = twin.load_state_dict(instance_gate.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in missing)
    return twin


@pytest.mark.parametrize("spatial_dims,mode,train", [(2, "additive", True), (3, "additive", True),
                                                     (2, "additive", False), (2, "grid", True)])
def test_instance_norm_equals_per_image_batch_norm(spatial_dims, mode, train):
    sizes = (5, 7, 3)
    kw = dict(spatial_dims=spatial_dims, mode=mode)
    gate = _randomise(AttentionGate(*sizes, norm="instance", dtype=torch.float64, **kw)).train(train)
    twin = _twin_batchnorm(gate, sizes=sizes, backend="reference", **kw).train()
    S = (6, 10) if spatial_dims == 2 else (4, 6, 5)
    Sg = (3, 5) if spatial_dims == 2 else (2, 3, 3)
    x = torch.randn(3, 5, *S, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, *Sg, dtype=torch.float64, requires_grad=True)
    out, alpha = gate(x, g, return_alpha=True)
    cot = torch.randn_like(out)
    grads = torch.autograd.grad((out * cot).sum() + alpha.sum(), [x, g, *gate.parameters()])

    expected_out, expected_alpha, expected_grads = [], [], [torch.zeros_like(t) for t in grads]
    for b in range(3):
        xb, gb = x[b:b + 1].detach().requires_grad_(), g[b:b + 1].detach().requires_grad_()
        ob, ab = twin(xb, gb, return_alpha=True)
        gr = torch.autograd.grad((ob * cot[b:b + 1]).sum() + ab.sum(), [xb, gb, *twin.parameters()])
        expected_out.append(ob)
        expected_alpha.append(ab)
        expected_grads[0][b:b + 1] = gr[0]
        expected_grads[1][b:b + 1] = gr[1]
        for acc, p in zip(expected_grads[2:], gr[2:]):
            acc += p
    torch.testing.assert_close(out, torch.cat(expected_out))
    torch.testing.assert_close(alpha, torch.cat(expected_alpha))
    names = ["x", "g", *(n for n, _ in gate.named_parameters())]
    for name, got, want in zip(names, grads, expected_grads):
        torch.testing.assert_close(got, want, msg=lambda m, n=name: f"gradient of {n}: {m}")


def test_instance_norm_modules_and_options():
    gate = AttentionGate(4, 3, 2, spatial_dims=3, norm="instance", norm_kwargs={"eps": 1e-3})
    assert isinstance(gate.x_norm, torch.nn.InstanceNorm3d) and gate.x_norm.affine and gate.x_norm.eps == 1e-3
    assert "norm='instance'" in repr(gate)
    plain = AttentionGate(4, 3, 2, norm=None)
    assert plain.x_norm is None and plain.g_norm is None and plain.psi_norm is None
    keys = set(AttentionGate(4, 3, 2).state_dict())
    assert "x_norm.running_mean" in keys   # the default is the BatchNorm gate, keys as before


def test_no_norm_fused_backends_equal_reference():
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    gate = _randomise(AttentionGate(6, 4, 3, norm=None, dtype=torch.float64))
    cot = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    results = {}
    for backend in ("reference", "torch", "cpp"):
        gate.backend = backend
        out = gate(x, g)
        results[backend] = (out, torch.autograd.grad((out * cot).sum(), [x, g, *gate.parameters()]))
    for backend in ("torch", "cpp"):
        torch.testing.assert_close(results[backend][0], results["reference"][0])
        for got, want in zip(results[backend][1], results["reference"][1]):
            torch.testing.assert_close(got, want)


def test_instance_norm_refuses_a_forced_fused_backend():
    gate = AttentionGate(4, 3, 2, norm="instance", backend="cpp")
    x, g = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 4, 4)
    with pytest.raises(medattn_fast.BackendUnavailable, match="InstanceNorm"):
        gate(x, g)
    gate.backend = None
    with medattn_fast.use_backend("triton"), pytest.raises(medattn_fast.BackendUnavailable, match="InstanceNorm"):
        gate(x, g)
    with medattn_fast.use_backend("torch"):
        assert gate(x, g).shape == x.shape


def test_bad_norm_and_bad_input():
    with pytest.raises(ValueError, match="norm must be one of"):
        AttentionGate(4, 3, 2, norm="group")
    gate = AttentionGate(4, 3, 2, norm="instance")
    with pytest.raises(ValueError, match=r"x \(B, Cx, \*S\).*got x \(2, 4, 8\)"):
        gate(torch.randn(2, 4, 8), torch.randn(2, 3, 4, 4))


def test_info_says_why_instance_norm_is_not_fused(capsys):
    from medattn_fast.cli import main

    assert main(["info"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "norm='instance'" in l)
    assert UNFUSED_NORMS["instance"] in line

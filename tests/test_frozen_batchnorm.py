"""Each BatchNorm follows its own training flag inside the fused gates, whatever the flag of the
module around it — as the unfused modules do.

A network fine-tuned the usual way is ``model.train()`` with every BatchNorm put back in ``eval()``
(frozen statistics); the reverse (an ``eval()`` model with some BNs in training mode) also occurs.
For every mixed pattern, on the originals' blocks (the widely copied ``AttentionBlock`` /
``AttentionUpBlock``, LeeJunHyun's ``Attention_block``, MONAI's ``AttentionBlock`` as restated in
``medattn_fast.testing.monai_attention_unet``, Oktay's ``GridAttentionBlock2D/3D``: their reference modules against
their compat twins) and on ours (``nn.AttentionGate`` additive and grid, ``models.AttentionUNet``
against the unfused modules holding the same weights), on every backend that runs on CPU: the
outputs, the gradients of every input and parameter, and every buffer (running statistics,
``num_batches_tracked``) equal the unfused module's — float64 where the backend allows it,
float32 on Triton (interpreted here).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, NamedTuple, Optional

import pytest
import torch
from _helpers import randomize_batch_norms
from medattn_fast.testing.monai_attention_unet import AttentionBlock as MonaiBlock
from medattn_fast.testing.monai_attention_unet import AttentionUnet as MonaiAttentionUnet

import medattn_fast
from medattn_fast.compat import attention_unet as C
from medattn_fast.models import AttentionUNet
from medattn_fast.nn import AttentionGate
from medattn_fast.reference import attention_gate as R

F64, F32 = torch.float64, torch.float32
BACKENDS = ("reference", "torch", "cpp", "triton")
DTYPE = {"triton": F32}   # the Triton interpreter runs float32
TOL = {F64: dict(rtol=1e-9, atol=1e-11), F32: dict(rtol=2e-4, atol=3e-5)}

# (the module's own flag, the flag of the i-th BatchNorm in module order)
PATTERNS: Dict[str, tuple] = {
    "train-all-bn-eval": (True, lambda i: False),       # fine-tuning with frozen BatchNorm
    "train-some-bn-eval": (True, lambda i: i % 2 == 1),
    "eval-all-bn-train": (False, lambda i: True),
    "eval-some-bn-train": (False, lambda i: i % 2 == 0),
}


def _batch_norms(module: torch.nn.Module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _set_pattern(module: torch.nn.Module, pattern: str) -> None:
    outer, inner = PATTERNS[pattern]
    module.train(outer)
    for i, bn in enumerate(_batch_norms(module)):
        bn.train(inner(i))


class Case(NamedTuple):
    unfused: torch.nn.Module                 # flags already set
    fast: torch.nn.Module                    # same weights, same flags
    inputs: tuple
    name: Callable[[str], str]               # a parameter/buffer name of ``fast`` -> ``unfused``'s


def _same(name: str) -> str:
    return name


def _copy_flags(unfused: torch.nn.Module, fast: torch.nn.Module, name: Callable[[str], str]) -> None:
    """Every flag of ``fast`` from its counterpart in ``unfused`` (the module holding the mapped
    name of its first parameter or buffer; the root's own flag for the rest)."""
    flags = {n: m.training for n, m in unfused.named_modules()}
    fast.train(unfused.training)
    for n, m in fast.named_modules():
        own = [p for p, _ in m.named_parameters(recurse=False)] + [b for b, _ in m.named_buffers(recurse=False)]
        if own:
            theirs = name(f"{n}.{own[0]}" if n else own[0]).rpartition(".")[0]
            m.training = flags[theirs]


def _compat(original: torch.nn.Module, compat_cls, pattern: str, inputs: tuple) -> Case:
    _set_pattern(original, pattern)
    fast = compat_cls.from_original(copy.deepcopy(original))
    assert type(fast) is compat_cls
    _copy_flags(original, fast, _same)
    return Case(original, fast, inputs, _same)


def _randn(*shape):
    return torch.randn(*shape, dtype=F64)


def case_attention_block(pattern):
    ref = randomize_batch_norms(R.AttentionBlock(3, 5, 4), batches_tracked=7).double()
    return _compat(ref, C.AttentionBlock, pattern, (_randn(2, 3, 6, 5), _randn(2, 5, 3, 3)))


def case_attention_up_block(pattern):
    ref = randomize_batch_norms(R.AttentionUpBlock(6, 4), batches_tracked=7).double()
    return _compat(ref, C.AttentionUpBlock, pattern, (_randn(2, 6, 3, 3), _randn(2, 4, 6, 6)))


def case_leejunhyun_block(pattern):
    ref = randomize_batch_norms(R.Attention_block(5, 3, 4), batches_tracked=7).double()
    return _compat(ref, C.Attention_block, pattern, (_randn(2, 5, 6, 5), _randn(2, 3, 6, 5)))


def case_monai_block_2d(pattern):
    ref = randomize_batch_norms(MonaiBlock(2, 4, 5, 3), batches_tracked=7).double()
    return _compat(ref, C.MonaiAttentionBlock, pattern, (_randn(2, 5, 6, 5), _randn(2, 3, 6, 5)))


def case_monai_block_3d(pattern):
    ref = randomize_batch_norms(MonaiBlock(3, 4, 5, 3), batches_tracked=7).double()
    return _compat(ref, C.MonaiAttentionBlock, pattern, (_randn(2, 5, 4, 3, 5), _randn(2, 3, 4, 3, 5)))


def case_grid_block_2d(pattern):
    ref = randomize_batch_norms(R.GridAttentionBlock(3, 5, 4, spatial_dims=2), batches_tracked=7).double()
    return _compat(ref, C.GridAttentionBlock2D, pattern, (_randn(2, 3, 7, 6), _randn(2, 5, 2, 3)))


def case_grid_block_3d(pattern):
    ref = randomize_batch_norms(R.GridAttentionBlock(3, 5, 4, spatial_dims=3), batches_tracked=7).double()
    return _compat(ref, C.GridAttentionBlock3D, pattern, (_randn(2, 3, 5, 4, 6), _randn(2, 5, 2, 2, 3)))


def _renamer(prefixes: Dict[str, str]) -> Callable[[str], str]:
    def name(n: str) -> str:
        module, _, leaf = n.rpartition(".")
        return f"{prefixes[module]}.{leaf}"

    return name


def _ours(unfused: torch.nn.Module, fast: torch.nn.Module, prefixes: Dict[str, str], pattern: str,
          inputs: tuple) -> Case:
    name = _renamer(prefixes)
    theirs = unfused.state_dict()
    fast.load_state_dict({n: theirs[name(n)] for n in fast.state_dict()}, strict=True)
    _set_pattern(unfused, pattern)
    _copy_flags(unfused, fast, name)
    return Case(unfused, fast, inputs, name)


def case_nn_gate_additive(pattern):
    ref = randomize_batch_norms(R.AttentionBlock(3, 5, 4), batches_tracked=7).double()
    gate = AttentionGate(3, 5, 4).double()
    prefixes = {"x_conv": "Wx.0", "x_norm": "Wx.1", "g_conv": "Wg.0", "g_norm": "Wg.1", "psi_conv": "psi.0",
                "psi_norm": "psi.1"}
    return _ours(ref, gate, prefixes, pattern, (_randn(2, 3, 6, 5), _randn(2, 5, 3, 3)))


def case_nn_gate_grid(pattern):
    ref = randomize_batch_norms(R.GridAttentionBlock(3, 5, 4, spatial_dims=2), batches_tracked=7).double()
    gate = AttentionGate(3, 5, 4, mode="grid", return_alpha=True).double()
    prefixes = {"x_conv": "theta", "g_conv": "phi", "psi_conv": "psi", "out_conv": "W.0", "out_norm": "W.1"}
    return _ours(ref, gate, prefixes, pattern, (_randn(2, 3, 7, 6), _randn(2, 5, 2, 3)))


def case_attention_unet(pattern):
    config = dict(spatial_dims=2, in_channels=2, out_channels=2, channels=(4, 6, 8), strides=(2, 2))
    monai = randomize_batch_norms(MonaiAttentionUnet(**config), batches_tracked=7).double()
    model = AttentionUNet.from_monai_state_dict(monai.state_dict(), **config).double()
    _set_pattern(monai, pattern)
    _copy_flags(monai, model, model.monai_key)
    return Case(monai, model, (_randn(2, 2, 12, 8),), model.monai_key)


CASES = {
    "AttentionBlock": case_attention_block,
    "AttentionUpBlock": case_attention_up_block,
    "Attention_block": case_leejunhyun_block,
    "MonaiAttentionBlock-2d": case_monai_block_2d,
    "MonaiAttentionBlock-3d": case_monai_block_3d,
    "GridAttentionBlock2D": case_grid_block_2d,
    "GridAttentionBlock3D": case_grid_block_3d,
    "nn.AttentionGate-additive": case_nn_gate_additive,
    "nn.AttentionGate-grid": case_nn_gate_grid,
    "models.AttentionUNet": case_attention_unet,
}


def _step(module: torch.nn.Module, inputs: tuple, cotangents: Optional[list], backend: Optional[str]):
    """Forward + backward: outputs, input gradients, parameter gradients, buffers after the step."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    if backend is None:
        out = module(*inputs)
    else:
        with medattn_fast.use_backend(backend):
            out = module(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    if cotangents is None:
        torch.manual_seed(5)
        cotangents = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, cotangents)
    return dict(outs=[o.detach() for o in outs], cotangents=cotangents, input_grads=[t.grad for t in inputs],
                param_grads={n: p.grad for n, p in module.named_parameters()},
                buffers={n: b.detach().clone() for n, b in module.named_buffers()})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("case", list(CASES))
def test_each_batch_norm_follows_its_own_flag(case, pattern, backend):
    dtype = DTYPE.get(backend, F64)
    torch.manual_seed(0)
    c = CASES[case](pattern)
    unfused, fast = c.unfused.to(dtype), c.fast.to(dtype)
    inputs = tuple(t.to(dtype) for t in c.inputs)
    flags = [bn.training for bn in _batch_norms(unfused)]
    assert any(flags) != all(flags) or unfused.training != flags[0], "the pattern mixes the flags"
    expected = _step(unfused, inputs, None, None)
    got = _step(fast, inputs, expected["cotangents"], backend)
    tol = TOL[dtype]
    for a, b in zip(got["outs"], expected["outs"]):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(got["input_grads"], expected["input_grads"]):
        torch.testing.assert_close(a, b, **tol)
    theirs = expected["param_grads"]
    assert len(got["param_grads"]) == len(theirs)
    for n, grad in got["param_grads"].items():
        ref = theirs[c.name(n)]
        assert (grad is None) == (ref is None), n
        if ref is not None:
            torch.testing.assert_close(grad, ref, **tol, msg=lambda m: f"gradient of {n}: {m}")
    theirs = expected["buffers"]
    assert len(got["buffers"]) == len(theirs)
    for n, buf in got["buffers"].items():
        torch.testing.assert_close(buf, theirs[c.name(n)], **tol, msg=lambda m: f"buffer {n}: {m}")
    # the flags themselves are untouched by the call
    assert [bn.training for bn in _batch_norms(unfused)] == flags


def test_batch_norm_params_carry_the_module_flag():
    bn = torch.nn.BatchNorm2d(3)
    assert medattn_fast.functional.BatchNormParams.from_module(bn.train()).training is True
    assert medattn_fast.functional.BatchNormParams.from_module(bn.eval()).training is False
    # without its own flag a BatchNormParams takes the call's ``training``
    params = medattn_fast.functional.BatchNormParams(bn.weight, bn.bias, bn.running_mean, bn.running_var)
    assert params.training is None
    assert params.in_mode(True).uses_batch_stats and not params.in_mode(False).uses_batch_stats
    assert not params._replace(training=False).in_mode(True).uses_batch_stats


class _NoGroup:
    """A process group that must never be used: a collective on it fails."""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sync_batch_norm_in_eval_mode_never_synchronises(backend):
    """A SyncBatchNorm synchronises only in its own training mode (SyncBatchNorm.forward: ``need_sync``
    needs ``self.training``), even inside a gate called in training mode and even when, without
    running statistics, it normalises with this batch's statistics."""
    dtype = DTYPE.get(backend, F64)
    torch.manual_seed(0)
    ref = randomize_batch_norms(R.AttentionBlock(3, 5, 4), batches_tracked=7)
    ref.psi[1] = torch.nn.BatchNorm2d(1, track_running_stats=False)
    ref = ref.to(dtype).train()
    for bn in _batch_norms(ref):
        bn.eval()
    x, g = torch.randn(2, 3, 6, 5, dtype=dtype), torch.randn(2, 5, 3, 3, dtype=dtype)
    twin = copy.deepcopy(ref)

    def frozen_sync(bn):
        return medattn_fast.functional.BatchNormParams.from_module(bn)._replace(process_group=_NoGroup())

    out = medattn_fast.functional.attention_gate(
        x, g, twin.Wx[0].weight, twin.Wx[0].bias, twin.Wg[0].weight, twin.Wg[0].bias, twin.psi[0].weight,
        twin.psi[0].bias, bn_x=frozen_sync(twin.Wx[1]), bn_g=frozen_sync(twin.Wg[1]),
        bn_psi=frozen_sync(twin.psi[1]), training=True, backend=backend)
    torch.testing.assert_close(out, ref(x, g), **TOL[dtype])
    for a, b in zip(twin.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_convert_keeps_each_batch_norm_flag(backend):
    """``convert()`` on a fine-tuned model (``train()``, every BatchNorm ``eval()``): it swaps the
    gates, keeps every submodule's flag, and the converted model equals the original in outputs,
    gradients and buffers."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "up": R.AttentionUpBlock(6, 4), "gate": R.Attention_block(5, 3, 4),
        "block3d": R.AttentionBlock(3, 5, 4, spatial_dims=3)})
    model = randomize_batch_norms(model, batches_tracked=7).double()
    _set_pattern(model, "train-all-bn-eval")
    converted = copy.deepcopy(model)
    report = medattn_fast.convert(converted)
    assert sorted(path for path, _, _ in report.swapped) == ["block3d", "gate", "up"], str(report)
    assert {n: m.training for n, m in converted.named_modules()} == {n: m.training for n, m in model.named_modules()}

    class Run(torch.nn.Module):   # the three blocks on their own inputs, one output list
        def __init__(self, blocks):
            super().__init__()
            self.blocks = blocks

        def forward(self, x_up, skip, g, x, x3, g3):
            return self.blocks["up"](x_up, skip), self.blocks["gate"](g, x), self.blocks["block3d"](x3, g3)

    inputs = (_randn(2, 6, 3, 3), _randn(2, 4, 6, 6), _randn(2, 5, 6, 5), _randn(2, 3, 6, 5),
              _randn(2, 3, 4, 5, 6), _randn(2, 5, 2, 3, 3))
    expected = _step(Run(model), inputs, None, None)
    got = _step(Run(converted), inputs, expected["cotangents"], backend)
    tol = TOL[F64]
    for key in ("outs", "input_grads"):
        for a, b in zip(got[key], expected[key]):
            torch.testing.assert_close(a, b, **tol)
    for key in ("param_grads", "buffers"):
        assert got[key].keys() == expected[key].keys()
        for n, t in got[key].items():
            if expected[key][n] is None:
                assert t is None, n
            else:
                torch.testing.assert_close(t, expected[key][n], **tol, msg=lambda m: f"{key} {n}: {m}")

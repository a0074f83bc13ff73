"""convert() and hooks: every kind of hook ``nn.Module`` offers — forward (plain, with kwargs,
always_call), forward-pre (plain, with kwargs), full backward, full backward-pre, state_dict (post and pre), load_state_dict (pre,
with and without the module, and post) — placed on a block or on one of its submodules of every
kind (container, conv, BatchNorm, activation, a nested block that gets a compat twin of its own,
a parameter-holding leaf) is either

* carried over: the converted model fires it exactly as the original did — same hooks, same
  order, same module object handed to the hook (the one now in the model, never the dropped
  original), same values seen (tensors compared at 1e-10 in float64, state_dict keys exactly); or
* refused: the block is not swapped and the report names the submodule and says why (a fused
  forward reads a submodule's parameters without calling it, so its forward/backward hooks
  could not run).

Each case is compared with an untouched deep copy of the same model carrying the same hooks.
"""
import copy

import pytest
import torch
from torch import nn

import medattn_fast
from medattn_fast.reference import attention_gate as ref_gate
from medattn_fast.reference import mtunet as ref_mtunet

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _summary(value):
    """What a hook saw, comparable across the two models: tensors (float64 clones), key tuples."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(F64).clone()
    if isinstance(value, (tuple, list)):
        return tuple(_summary(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted(value))            # a state_dict: its keys
    return value


# kind -> (register(module, record, owner), fires on: "run" = forward+backward, "state" = state_dict /
# load_state_dict). ``owner()`` is the module now at the hook's path: the hook records whether it was
# handed that very object.
def _hooks():
    def fwd(m, rec, owner):
        return m.register_forward_hook(lambda mod, args, out: rec.append(("forward", mod is owner(), _summary(out))))

    def fwd_kwargs(m, rec, owner):
        return m.register_forward_hook(
            lambda mod, args, kwargs, out: rec.append(("forward_kwargs", mod is owner(), _summary(out))),
            with_kwargs=True)

    def fwd_pre(m, rec, owner):
        return m.register_forward_pre_hook(
            lambda mod, args: rec.append(("forward_pre", mod is owner(), _summary(args))))

    def fwd_pre_kwargs(m, rec, owner):
        return m.register_forward_pre_hook(
            lambda mod, args, kwargs: rec.append(("forward_pre_kwargs", mod is owner(), _summary(args))),
            with_kwargs=True)

    def fwd_always(m, rec, owner):
        return m.register_forward_hook(
            lambda mod, args, out: rec.append(("forward_always", mod is owner(), _summary(out))), always_call=True)

    def bwd(m, rec, owner):
        return m.register_full_backward_hook(
            lambda mod, gin, gout: rec.append(("backward", mod is owner(), _summary(gin), _summary(gout))))

    def bwd_pre(m, rec, owner):
        return m.register_full_backward_pre_hook(
            lambda mod, gout: rec.append(("backward_pre", mod is owner(), _summary(gout))))

    def sd_post(m, rec, owner):
        return m._register_state_dict_hook(
            lambda mod, dest, prefix, meta: rec.append(("state_dict", mod is owner(), prefix, _summary(dest))))

    def sd_pre(m, rec, owner):
        return m.register_state_dict_pre_hook(
            lambda mod, prefix, keep_vars: rec.append(("state_dict_pre", mod is owner(), prefix)))

    def load_pre_module(m, rec, owner):
        return m.register_load_state_dict_pre_hook(
            lambda mod, sd, prefix, *rest: rec.append(("load_pre", mod is owner(), prefix, _summary(sd))))

    def load_pre_plain(m, rec, owner):
        return m._register_load_state_dict_pre_hook(
            lambda sd, prefix, *rest: rec.append(("load_pre_plain", prefix, _summary(sd))))

    def load_post(m, rec, owner):
        return m.register_load_state_dict_post_hook(
            lambda mod, keys: rec.append(("load_post", mod is owner(), tuple(keys.missing_keys))))

    return {"forward": (fwd, "run"), "forward_kwargs": (fwd_kwargs, "run"), "forward_pre": (fwd_pre, "run"),
            "forward_pre_kwargs": (fwd_pre_kwargs, "run"), "forward_always_call": (fwd_always, "run"),
            "full_backward": (bwd, "run"), "full_backward_pre": (bwd_pre, "run"),
            "state_dict": (sd_post, "state"), "state_dict_pre": (sd_pre, "state"),
            "load_state_dict_pre": (load_pre_module, "state"), "load_state_dict_pre_plain": (load_pre_plain, "state"),
            "load_state_dict_post": (load_post, "state")}


HOOKS = _hooks()
RUN_KINDS = [k for k, (_, when) in HOOKS.items() if when == "run"]


def _gate_model():
    torch.manual_seed(3)
    return nn.ModuleDict({"block": ref_gate.AttentionBlock(4, 6, 3)}).to(F64).eval()


def _gate_inputs():
    torch.manual_seed(4)
    return torch.randn(2, 4, 6, 5, dtype=F64), torch.randn(2, 6, 3, 3, dtype=F64)


def _cs_model():
    torch.manual_seed(5)
    return nn.ModuleDict({"block": ref_mtunet.CSAttention(8, {"win_size": 4, "head": 2})}).to(F64)


def _cs_inputs():
    torch.manual_seed(6)
    return (torch.randn(1, 16, 8, dtype=F64),)


# block -> (model, inputs, the submodules a hook goes on: one of each kind)
BLOCKS = {
    # the gate: Sequential, Conv, BatchNorm, activation
    "gate": (_gate_model, _gate_inputs, ("", "Wx", "Wx.0", "Wx.1", "psi.2")),
    # MT-UNet's local-global block: nested blocks with compat twins of their own (at two depths),
    # a block holding only parameters, a plain conv
    "csattention": (_cs_model, _cs_inputs, ("", "win_atten", "win_atten.attention", "gaussiantrans", "queeze")),
}


def _exercise(model, inputs, when: str):
    """What fires the hook: ``"run"``, forward + backward on fresh leaves (returns the output and
    the input gradients); ``"state"``, state_dict() then load_state_dict() of the whole model."""
    if when == "state":
        model.load_state_dict(model.state_dict())
        return None, []
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = model["block"](*leaves)
    torch.manual_seed(8)
    out.backward(torch.randn_like(out))
    return out.detach(), [t.grad for t in leaves]


def _assert_same(got, expected, where):
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: got {got!r}, expected a tensor"
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{where}: {m}")
    elif isinstance(expected, tuple):
        assert isinstance(got, tuple) and len(got) == len(expected), f"{where}: got {got!r}, expected {expected!r}"
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_same(g, e, f"{where}[{i}]")
    else:
        assert got == expected, f"{where}: got {got!r}, expected {expected!r}"


def _assert_same_records(got, expected, where):
    assert [r[0] for r in got] == [r[0] for r in expected], f"{where}: hook calls {got} != {expected}"
    for i, (g, e) in enumerate(zip(got, expected)):
        _assert_same(g, e, f"{where}: hook call {i} ({e[0]})")


CASES = [(block, path, kind) for block, (_, _, paths) in BLOCKS.items() for path in paths for kind in HOOKS]


@pytest.mark.parametrize("block,path,kind", CASES, ids=[f"{b}-{p or 'root'}-{k}" for b, p, k in CASES])
def test_convert_carries_a_hook_over_or_refuses_the_block_with_its_reason(block, path, kind):
    make, inputs, _ = BLOCKS[block]
    register, when = HOOKS[kind]
    original = make()
    twin = copy.deepcopy(original)            # untouched: what the hooks see without convert
    full = f"block.{path}" if path else "block"
    records = {"converted": [], "original": []}
    handles = {}
    for name, model in (("converted", original), ("original", twin)):
        handles[name] = register(model.get_submodule(full), records[name],
                                 lambda model=model: model.get_submodule(full))

    report = medattn_fast.convert(original)

    refused = path and kind in RUN_KINDS
    if refused:
        # the block stays; blocks inside it may still be swapped on their own (a hooked one
        # keeps its hooks as the root of its swap)
        skips = {s[0]: s[2] for s in report.skipped}
        assert "block" in skips and "block" not in [s[0] for s in report.swapped], str(report)
        assert f"submodule(s) {path} carry forward/backward hooks" in skips["block"], skips["block"]
        assert type(original["block"]) is type(twin["block"])
    else:
        assert [s[0] for s in report.swapped] == ["block"], str(report)
        assert type(original["block"]).__module__.startswith("medattn_fast.compat")

    out, grads = _exercise(original, inputs(), when)
    expected_out, expected_grads = _exercise(twin, inputs(), when)
    if when == "run":
        torch.testing.assert_close(out, expected_out, **TOL)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, **TOL)
    assert records["original"], f"the {kind} hook never fired on the unconverted model"
    _assert_same_records(records["converted"], records["original"], f"{block} {path or '<root>'} {kind}")

    # the user's handle still removes the hook from the converted model
    handles["converted"].remove()
    records["converted"].clear()
    _exercise(original, inputs(), when)
    assert records["converted"] == []


def test_load_state_dict_pre_hook_with_the_module_survives_the_dropped_original():
    """register_load_state_dict_pre_hook keeps a weak reference to its module; after convert the
    original block is gone, and the hook must get the converted module (not 'a dead Module')."""
    model = _gate_model()
    seen = []
    model["block"].register_load_state_dict_pre_hook(lambda mod, *rest: seen.append(mod))
    medattn_fast.convert(model)
    import gc

    gc.collect()
    model.load_state_dict(model.state_dict())
    assert seen == [model["block"]] and type(seen[0]).__module__.startswith("medattn_fast.compat")

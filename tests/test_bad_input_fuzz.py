"""Bad-input fuzzing (hypothesis): start from a valid call of a public op, corrupt ONE argument in a
way that makes the call invalid — not a tensor, a wrong rank, an integer or mismatched dtype,
another device (``meta``), an empty or wrong-sized dim, a bad keyword value — and require a
``ValueError``/``TypeError`` whose message names that argument, raised before any kernel runs.
A crash of another kind, a hang, or a silent answer fails the test.

Example counts follow the hypothesis profile (tests/_hypothesis_profiles.py).
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import medattn_fast.functional as MF

from _hypothesis_profiles import examples

PRIMES = st.sampled_from([1, 2, 3, 5, 7])


@dataclass
class Arg:
    """How an argument may be corrupted. ``kind``: tensor | scalar_param | choice | int | real.

    ``checked_dims``: dims whose size the op checks against another argument; ``ranks``: the
    ranks it accepts; ``leads``: the argument others are checked against (its dtype and device
    define the call's, so changing them blames the others); ``bad``: invalid non-tensor values."""

    kind: str
    checked_dims: Sequence[int] = ()
    ranks: Sequence[int] = ()
    leads: bool = False
    optional: bool = False
    bad: Sequence = field(default_factory=tuple)


NOT_TENSORS = (3, 2.5, "x", [1.0, 2.0], np.ones(3, dtype=np.float32))
BAD_CHOICES = ("bogus", None, 2, 0.5)
BAD_INTS = (0, -1, 1.5, "2", True)
BAD_REALS = ("a", None, True, [1.0])


def _split(kw, names):
    """(positional values in ``names`` order, the remaining keywords)."""
    kw = dict(kw)
    return [kw.pop(n) for n in names], kw


def _calling(fn, names):
    def call(**kw):
        positional, rest = _split(kw, names)
        return fn(*positional, **rest)
    return call


def _position(draw):
    batch, nq, nk, dk, dv = (draw(PRIMES) for _ in range(5))
    args = dict(q=torch.randn(batch, nq, dk), k=torch.randn(batch, nk, dk), v=torch.randn(batch, nk, dv),
                gamma=torch.randn(1), residual=torch.randn(batch, nq, dv), multiply=torch.randn(batch, nq, dv),
                scale=0.5, transpose=False, layout="tokens", chunk_size=None)
    specs = dict(q=Arg("tensor", ranks=(3,), leads=True), k=Arg("tensor", (0, 2), (3,)), v=Arg("tensor", (0, 1), (3,)),
                 gamma=Arg("scalar_param", optional=True), residual=Arg("tensor", (0, 1, 2), (3,), optional=True),
                 multiply=Arg("tensor", (0, 1, 2), (3,), optional=True), scale=Arg("real", bad=BAD_REALS),
                 transpose=Arg("choice", bad=BAD_CHOICES), layout=Arg("choice", bad=BAD_CHOICES),
                 chunk_size=Arg("int", bad=(0, -1, 1.5, True)))
    return _calling(MF.position_attention, ("q", "k", "v")), args, specs


def _channel(draw):
    shape = (draw(PRIMES), draw(PRIMES), *(draw(PRIMES) for _ in range(draw(st.integers(1, 3)))))
    args = dict(x=torch.randn(shape), gamma=torch.randn(1), residual=torch.randn(shape), multiply=torch.randn(shape),
                negate=True)
    dims = tuple(range(len(shape)))
    specs = dict(x=Arg("tensor", ranks=(3, 4, 5), leads=True), gamma=Arg("scalar_param", optional=True),
                 residual=Arg("tensor", dims, (len(shape),), optional=True),
                 multiply=Arg("tensor", dims, (len(shape),), optional=True), negate=Arg("choice", bad=BAD_CHOICES))
    return _calling(MF.channel_attention, ("x",)), args, specs


def _axial(draw):
    shape = tuple(draw(PRIMES) for _ in range(4))
    if draw(st.booleans(), label="from scores"):
        b, h, w, _ = shape
        args = dict(atten_x=torch.randn(b, h, w, w), atten_y=torch.randn(b, w, h, h), v=torch.randn(shape),
                    shift=torch.tensor([0.3]), bias=torch.tensor([0.1]))
        specs = dict(atten_x=Arg("tensor", (0, 1, 2, 3), (4,)), atten_y=Arg("tensor", (0, 1, 2, 3), (4,)),
                     v=Arg("tensor", ranks=(4,), leads=True), shift=Arg("scalar_param"),
                     bias=Arg("scalar_param", optional=True))
        return _calling(MF.gaussian_axial_from_scores, ("atten_x", "atten_y", "v", "shift")), args, specs
    args = dict(q=torch.randn(shape), k=torch.randn(shape), v=torch.randn(shape), shift=torch.tensor([0.3]),
                bias=torch.tensor([0.1]))
    specs = dict(q=Arg("tensor", ranks=(4,), leads=True), k=Arg("tensor", (0, 1, 2, 3), (4,)),
                 v=Arg("tensor", (0, 1, 2, 3), (4,)), shift=Arg("scalar_param"), bias=Arg("scalar_param", optional=True))
    return _calling(MF.gaussian_axial_attention, ("q", "k", "v", "shift")), args, specs


LINEAR_NAMES = ("x", "query_weight", "query_bias", "key_weight", "key_bias", "value_weight", "value_bias",
                "proj_weight", "proj_bias")


def _linear_specs(inner_bias, key_bias_dims, value_bias_dims):
    return dict(x=Arg("tensor", ranks=None, leads=True), query_weight=Arg("tensor", (1,), (2,)),
                query_bias=Arg("tensor", (0,), (1,), optional=True), key_weight=Arg("tensor", (0, 1), (2,)),
                key_bias=Arg("tensor", key_bias_dims, (1,), optional=True), value_weight=Arg("tensor", (0, 1), (2,)),
                value_bias=Arg("tensor", value_bias_dims, (1,), optional=True), proj_weight=Arg("tensor", (1,), (2,)),
                proj_bias=Arg("tensor", (0,), (1,), optional=True),
                num_heads=Arg("int", bad=BAD_INTS + ("not dividing",)))


def _window(draw):
    batch, h, w, c, heads, d, co = (draw(PRIMES) for _ in range(7))
    a = heads * d
    args = dict(x=torch.randn(batch, h, w, c), query_weight=torch.randn(a, c), query_bias=torch.randn(a),
                key_weight=torch.randn(a, c), key_bias=torch.randn(a), value_weight=torch.randn(a, c),
                value_bias=torch.randn(a), proj_weight=torch.randn(co, a), proj_bias=torch.randn(co),
                window_size=draw(st.sampled_from([1, 2, 4])), num_heads=heads, pad_mode="mtunet", layout="grid")
    specs = _linear_specs(a, (0,), (0,))
    specs["x"].ranks = (4,)
    specs.update(window_size=Arg("int", bad=BAD_INTS), pad_mode=Arg("choice", bad=BAD_CHOICES),
                 layout=Arg("choice", bad=BAD_CHOICES))
    return _calling(MF.window_attention, LINEAR_NAMES), args, specs


def _external(draw):
    batch, n, c, heads, d, s, co = (draw(PRIMES) for _ in range(7))
    a = heads * d
    args = dict(x=torch.randn(batch, n, c), query_weight=torch.randn(a, c), query_bias=torch.randn(a),
                key_weight=torch.randn(s, d), key_bias=torch.randn(s), value_weight=torch.randn(d, s),
                value_bias=torch.randn(d), proj_weight=torch.randn(co, a), proj_bias=torch.randn(co), num_heads=heads)
    specs = _linear_specs(a, (0,), (0,))
    specs["x"].ranks = (3,)
    specs["key_weight"].checked_dims = (1,)        # the memory (S, d): d follows from query_weight
    # the memories are called key_memory / value_memory
    renamed = dict(key_weight="key_memory", value_weight="value_memory")
    args = {renamed.get(k, k): v for k, v in args.items()}
    specs = {renamed.get(k, k): v for k, v in specs.items()}
    return _calling(MF.external_attention, [renamed.get(n, n) for n in LINEAR_NAMES]), args, specs


def _gate(draw):
    nd = draw(st.sampled_from([2, 3]))
    size = [draw(st.sampled_from([2, 3, 5])) for _ in range(nd)]
    coarse = [draw(st.integers(1, s)) for s in size]
    batch, cx, cg, ci = (draw(PRIMES) for _ in range(4))
    args = dict(x=torch.randn(batch, cx, *size), g=torch.randn(batch, cg, *coarse), wx_weight=torch.randn(ci, cx),
                wx_bias=torch.randn(ci), wg_weight=torch.randn(ci, cg), wg_bias=torch.randn(ci),
                psi_weight=torch.randn(1, ci), psi_bias=torch.randn(1), mode="additive")
    specs = dict(x=Arg("tensor", ranks=(4, 5), leads=True), g=Arg("tensor", (0,) + tuple(range(2, 2 + nd)), (2 + nd,)),
                 wx_weight=Arg("tensor", (1,), (2, 2 + nd)), wx_bias=Arg("tensor", (0,), (1,), optional=True),
                 wg_weight=Arg("tensor", (0, 1), (2, 2 + nd)), wg_bias=Arg("tensor", (0,), (1,), optional=True),
                 psi_weight=Arg("tensor", (0, 1), (2, 2 + nd)), psi_bias=Arg("tensor", (0,), (1,), optional=True),
                 mode=Arg("choice", bad=BAD_CHOICES))
    order = ("x", "g", "wx_weight", "wx_bias", "wg_weight", "wg_bias", "psi_weight", "psi_bias")
    return _calling(MF.attention_gate, order), args, specs


OPS: Dict[str, Callable] = {"position": _position, "channel": _channel, "gaussian_axial": _axial,
                            "window": _window, "external": _external, "attention_gate": _gate}


def _corrupt(draw, name: str, spec: Arg, value, args) -> Tuple[object, str]:
    """An invalid replacement for ``value`` and what was done."""
    if spec.kind in ("choice", "int", "real"):
        bad = draw(st.sampled_from(list(spec.bad)), label="bad value")
        if bad == "not dividing":
            return args["query_weight"].shape[0] + 1, bad
        return bad, repr(bad)
    kinds = ["not a tensor", "integer dtype", "empty dim"]
    if not spec.leads:
        kinds += ["other float dtype", "other device"] if spec.kind == "tensor" else ["other device"]
    if spec.kind == "scalar_param":
        kinds += ["not a scalar"]
    if spec.ranks:
        kinds += ["rank"]
    if spec.checked_dims:
        kinds += ["size"]
    kind = draw(st.sampled_from(kinds), label="corruption")
    if kind == "not a tensor":
        return draw(st.sampled_from(list(NOT_TENSORS) + ([] if spec.optional else [None]))), kind
    if kind == "integer dtype":
        return value.to(draw(st.sampled_from([torch.int64, torch.bool]))), kind
    if kind == "empty dim":
        if value.dim() == 0:
            return value.new_empty((0,)), kind
        shape = list(value.shape)
        shape[draw(st.integers(0, len(shape) - 1))] = 0
        return value.new_empty(shape), kind
    if kind == "other float dtype":
        return value.to(torch.float64), kind
    if kind == "other device":
        return value.to("meta"), kind
    if kind == "not a scalar":
        return torch.randn(2), kind
    if kind == "rank":
        rank = draw(st.sampled_from([r for r in range(1, 7) if r not in spec.ranks]), label="rank")
        shape = list(value.shape[:rank]) + [2] * max(0, rank - value.dim())
        return torch.randn(shape), f"rank {rank}"
    dim = draw(st.sampled_from(list(spec.checked_dims)), label="dim")
    shape = list(value.shape)
    if name == "g" and dim >= 2:       # the gating grid larger than x's
        shape[dim] = args["x"].shape[dim] + 1
    else:
        shape[dim] += 1
    return torch.randn(shape), f"size of dim {dim}"


@settings(**examples(60))
@given(data=st.data())
def test_malformed_call_gets_a_named_value_or_type_error(data):
    op = data.draw(st.sampled_from(sorted(OPS)), label="op")
    call, args, specs = OPS[op](data.draw)
    call(**dict(args))                       # the valid call runs
    name = data.draw(st.sampled_from(sorted(specs)), label="argument")
    bad, what = _corrupt(data.draw, name, specs[name], args.get(name), args)
    args[name] = bad
    with pytest.raises((ValueError, TypeError)) as info:
        call(**args)
    assert name in str(info.value), f"{op}: {name} <- {what}: the message does not name it: {info.value}"

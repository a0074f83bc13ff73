"""The conformance matrix: every public op × every backend registered for it × dtype × input layout ×
every optional argument on and off × 1-/2-/3-D where the op has them × batch 1 and odd sizes.

Each combination runs the op forward and backward (a fresh random float64 cotangent) and compares the
output and the gradient of every input and parameter (γ, biases, shift, BatchNorm affine ...) with
the ``reference`` backend in float64, under the library's one tolerance rule
(:mod:`medattn_fast.testing.tolerance`, the rule of ``medattn-fast verify`` too).

A combination a backend documents it cannot run (``BackendUnavailable`` from its capability
predicate: dtype, device, a size limit of the family table) is a refusal, not a failure; the test
checks the refusal carries the predicate's reasons and comes before any computation: no backend
implementation is entered and no ATen op other than views runs inside the public call. A wrong
answer, any other exception, or a refusal without a reason fails.

The table: the dispatchers come from the op families (``medattn_fast.ops._families.FAMILIES``) and
the backends of each from its registered dispatcher (``medattn_fast.backend.registered_ops()``), so
a backend is in the matrix the moment it registers. Each dispatcher's axes (its optional arguments
and modes) and input builder are in ``SPECS`` below; a family without an entry fails
``test_every_dispatcher_of_the_family_table_has_a_spec``.

The full product is large (``full_size()``, printed by ``python tests/test_conformance.py``), so CI
runs a pairwise covering design of it, generated here: every pair of values of any two axes (backend
× dtype, backend × layout, an option subset × backend, dtype × ndim ...) appears in at least one case.
``MEDATTN_CONFORMANCE=full`` runs the whole product (hours on 2 cores).
"""
from __future__ import annotations

import itertools
import os
import random
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import medattn_fast.functional as MF
from medattn_fast import backend as B
from medattn_fast.functional import BatchNormParams
from medattn_fast.ops._families import FAMILIES
from medattn_fast.testing.tolerance import F64, check, max_errors, rounded, worse

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = (F32, F64, BF16, F16)
LAYOUTS = ("contiguous", "channels_last", "permuted", "sliced", "expanded")
SIZES = ("batch1", "odd")
MODE = os.environ.get("MEDATTN_CONFORMANCE", "pairwise")


def subsets(names: Sequence[str]) -> Tuple[Tuple[str, ...], ...]:
    """Every subset of ``names`` (the on/off combinations of optional arguments)."""
    return tuple(c for r in range(len(names) + 1) for c in itertools.combinations(names, r))


# ---------------------------------------------------------------------------------------------
# inputs in every layout
# ---------------------------------------------------------------------------------------------

def make_input(shape: Sequence[int], layout: str, scale: float = 1.0):
    """(leaf, view): ``view(leaf)`` has ``shape`` and the layout's strides; the gradient lands on the
    leaf. contiguous; channels_last (rank 4/5); permuted (dense, the last two dims swapped in
    memory: neither contiguous nor channels_last); sliced (every other element of a twice-as-wide
    last dim: not dense); expanded (stride 0 along the batch, or dim 1 when the batch is 1)."""
    shape = tuple(shape)
    rand = lambda *s: scale * torch.randn(*s, dtype=F64)  # noqa: E731
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return rand(*shape).contiguous(memory_format=fmt), lambda t: t
    if layout == "permuted":
        return rand(*shape[:-2], shape[-1], shape[-2]), lambda t: t.transpose(-1, -2)
    if layout == "sliced":
        return rand(*shape[:-1], 2 * shape[-1]), lambda t: t[..., ::2]
    if layout == "expanded":
        dim = 0 if shape[0] > 1 else 1
        small = list(shape)
        small[dim] = 1
        return rand(*small), lambda t: t.expand(shape)
    return rand(*shape), lambda t: t


def layouts_for(rank: int) -> Tuple[str, ...]:
    return LAYOUTS if rank in (4, 5) else tuple(x for x in LAYOUTS if x != "channels_last")


# ---------------------------------------------------------------------------------------------
# refusals come before any computation
# ---------------------------------------------------------------------------------------------

class _OpRecorder(TorchDispatchMode):
    """Records every ATen/custom op that runs while armed."""

    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (getattr(func, "is_view", False) or func.__name__.split(".")[0] in ("detach", "alias")):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


_RECORDER: List[_OpRecorder] = []


def public(fn: Callable, *args, **kwargs):
    """Calls a public op; while a refusal is being checked, records the non-view ops it runs."""
    if not _RECORDER:
        return fn(*args, **kwargs)
    with _RECORDER[0]:
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# the specs: each dispatcher's axes and input builder
# ---------------------------------------------------------------------------------------------

@dataclass
class Built:
    fn: Callable          # fn(*leaves, backend=...) -> one tensor
    leaves: List[torch.Tensor]
    names: List[str]      # "grad <leaf>" for each leaf


@dataclass
class Spec:
    axes: Dict[str, tuple]                           # the dispatcher's own axes (options, ndim)
    build: Callable[[dict], Built]
    rank: Callable[[dict], int] = lambda case: 3     # rank of the input the layout applies to


EPILOGUES = subsets(("gamma", "residual", "multiply"))


def _position(case) -> Built:
    b, nq, nk, dk, dv = (1, 7, 5, 1, 3) if case["size"] == "batch1" else (3, 13, 11, 5, 2)
    transpose, tokens = case["transpose"], case["token_layout"]
    n_v, n_out = (nq, nk) if transpose else (nk, nq)
    dims = {"q": (nq, dk), "k": (nk, dk), "v": (n_v, dv), "out": (n_out, dv)}
    shape = {n: (b, *(d if tokens == "tokens" else d[::-1])) for n, d in dims.items()}
    made = [make_input(shape[n], case["layout"]) for n in ("q", "k", "v")]
    parts = case["epilogue"]
    extra = {"gamma": torch.randn(1, dtype=F64), "residual": torch.randn(shape["out"], dtype=F64),
             "multiply": torch.randn(shape["out"], dtype=F64)}

    def fn(q, k, v, *epilogue, backend):
        q, k, v = (view(t) for (_, view), t in zip(made, (q, k, v)))
        return public(MF.position_attention, q, k, v, scale=case["scale"], transpose=transpose, layout=tokens,
                      backend=backend, **dict(zip(parts, epilogue)))
    return Built(fn, [m[0] for m in made] + [extra[p] for p in parts], ["q", "k", "v", *parts])


def _channel_shape(case):
    b, c = (1, 5) if case["size"] == "batch1" else (3, 7)
    spatial = {("batch1", 1): (7,), ("batch1", 2): (3, 5), ("batch1", 3): (3, 2, 5),
               ("odd", 1): (11,), ("odd", 2): (5, 3), ("odd", 3): (3, 1, 5)}[case["size"], case["ndim"]]
    return (b, c, *spatial)


def _channel(case) -> Built:
    shape = _channel_shape(case)
    x, view = make_input(shape, case["layout"], scale=0.5)
    parts = case["epilogue"]
    extra = {"gamma": torch.randn(1, dtype=F64), "residual": torch.randn(shape, dtype=F64),
             "multiply": torch.randn(shape, dtype=F64)}

    def fn(x, *epilogue, backend):
        return public(MF.channel_attention, view(x), negate=case["negate"], backend=backend,
                      **dict(zip(parts, epilogue)))
    return Built(fn, [x] + [extra[p] for p in parts], ["x", *parts])


def _gaussian(entry):
    def build(case) -> Built:
        b, h, w, d = (1, 5, 3, 4) if case["size"] == "batch1" else (3, 3, 5, 3)
        shapes = [(b, h, w, d)] * 3 if entry == "qkv" else [(b, h, w, w), (b, w, h, h), (b, h, w, d)]
        made = [make_input(s, case["layout"], scale=0.5) for s in shapes]
        shift = torch.tensor([case["shift"]], dtype=F64)
        extra = [torch.randn(1, dtype=F64)] if case["bias"] else []

        def fn(a, c, v, shift, *bias, backend):
            a, c, v = (view(t) for (_, view), t in zip(made, (a, c, v)))
            op = MF.gaussian_axial_attention if entry == "qkv" else MF.gaussian_axial_from_scores
            return public(op, a, c, v, shift, bias=bias[0] if bias else None, backend=backend)
        names = ["q", "k", "v"] if entry == "qkv" else ["atten_x", "atten_y", "v"]
        return Built(fn, [m[0] for m in made] + [shift] + extra, names + ["shift"] + (["bias"] if extra else []))
    return build


PROJ_BIASES = ("query_bias", "key_bias", "value_bias", "proj_bias")


def _window(case) -> Built:
    b, h, w, c, ws, heads, hd, co = (1, 5, 7, 4, 3, 2, 2, 3) if case["size"] == "batch1" else (3, 5, 3, 5, 2, 1, 3, 5)
    inner = heads * hd
    x, view = make_input((b, h, w, c), case["layout"])
    weights = [0.5 * torch.randn(inner, c, dtype=F64) for _ in range(3)] + [torch.randn(co, inner, dtype=F64)]
    sizes = dict(query_bias=inner, key_bias=inner, value_bias=inner, proj_bias=co)
    given = tuple(n for n in PROJ_BIASES if case[n])

    def fn(x, w_q, w_k, w_v, w_o, *biases, backend):
        bias = dict.fromkeys(PROJ_BIASES)
        bias.update(zip(given, biases))
        return public(MF.window_attention, view(x), w_q, bias["query_bias"], w_k, bias["key_bias"], w_v,
                      bias["value_bias"], w_o, bias["proj_bias"], window_size=ws, num_heads=heads,
                      pad_mode=case["pad_mode"], layout=case["out_layout"], backend=backend)
    return Built(fn, [x, *weights] + [torch.randn(sizes[n], dtype=F64) for n in given],
                 ["x", "W_q", "W_k", "W_v", "W_o", *given])


def _external(case) -> Built:
    b, n, c, heads, hd, slots, co = (1, 13, 4, 2, 3, 5, 3) if case["size"] == "batch1" else (3, 7, 5, 3, 2, 7, 4)
    inner = heads * hd
    x, view = make_input((b, n, c), case["layout"])
    weights = [0.5 * torch.randn(inner, c, dtype=F64), torch.randn(slots, hd, dtype=F64),
               torch.randn(hd, slots, dtype=F64), torch.randn(co, inner, dtype=F64)]
    sizes = dict(query_bias=inner, key_bias=slots, value_bias=hd, proj_bias=co)
    given = tuple(n for n in PROJ_BIASES if case[n])

    def fn(x, w_q, m_k, m_v, w_o, *biases, backend):
        bias = dict.fromkeys(PROJ_BIASES)
        bias.update(zip(given, biases))
        return public(MF.external_attention, view(x), w_q, bias["query_bias"], m_k, bias["key_bias"], m_v,
                      bias["value_bias"], w_o, bias["proj_bias"], num_heads=heads, backend=backend)
    return Built(fn, [x, *weights] + [torch.randn(sizes[n], dtype=F64) for n in given],
                 ["x", "W_q", "M_k", "M_v", "W_o", *given])


GATE_BIASES = ("wx_bias", "wg_bias", "psi_bias")
# BatchNorm: none; all in eval; all in training (batch statistics, running stats updated);
# mixed: the op called in training but bn_g frozen by its own flag (a fine-tuned, frozen BN)
GATE_BN = ("none", "eval", "train", "mixed")


def _gate(case) -> Built:
    nd, grid = case["ndim"], case["mode"] == "grid"
    if case["size"] == "batch1":
        b, cx, cg, ci = 1, 3, 5, 2
        size, coarse = ((5, 7), (3, 4)) if nd == 2 else ((3, 5, 4), (2, 3, 2))
    else:
        b, cx, cg, ci = 3, 5, 2, 3
        size, coarse = ((7, 5), (7, 5)) if nd == 2 else ((3, 5, 3), (3, 5, 3))
    kernel = (2,) * nd if grid else (1,) * nd   # grid: θ strided by 2; g (any size) resampled to S // 2
    x, view_x = make_input((b, cx, *size), case["layout"])
    g, view_g = make_input((b, cg, *coarse), case["layout"])
    leaves = [x, g, 0.7 * torch.randn(ci, cx, *kernel, dtype=F64), torch.randn(ci, cg, dtype=F64),
              torch.randn(1, ci, dtype=F64)]
    names = ["x", "g", "W_x", "W_g", "w_psi"]
    given = case["biases"]
    sizes = dict(wx_bias=ci, wg_bias=ci, psi_bias=1)
    leaves += [0.5 * torch.randn(sizes[n], dtype=F64) for n in given]
    names += list(given)
    bns = [] if case["bn"] == "none" else [("bn_x", ci), ("bn_g", ci), ("bn_psi", 1)]
    with_out = case["out"]
    if with_out:
        bns.append(("bn_out", cx))
        leaves += [0.5 * torch.randn(cx, cx, dtype=F64), 0.5 * torch.randn(cx, dtype=F64)]
        names += ["out_weight", "out_bias"]
    stats = {n: (0.3 * torch.randn(c, dtype=F64), torch.rand(c, dtype=F64) + 0.5) for n, c in bns}
    for n, c in bns:
        leaves += [1 + 0.3 * torch.randn(c, dtype=F64), 0.3 * torch.randn(c, dtype=F64)]
        names += [f"{n}.weight", f"{n}.bias"]
    training = case["bn"] in ("train", "mixed")
    n_fixed = 5 + len(given) + (2 if with_out else 0)

    def fn(x, g, w_x, w_g, w_psi, *rest, backend):
        bias = dict.fromkeys(GATE_BIASES)
        bias.update(zip(given, rest[:len(given)]))
        out_w, out_b = rest[len(given):len(given) + 2] if with_out else (None, None)
        affine = rest[n_fixed - 5:]
        bn = {}
        for i, (n, _) in enumerate(bns):
            # fresh running statistics per call: training mode updates them in place
            mean, var = (s.to(x.dtype).clone() for s in stats[n])
            own = False if case["bn"] == "mixed" and n == "bn_g" else None
            bn[n] = BatchNormParams(affine[2 * i], affine[2 * i + 1], mean, var, training=own)
        result = public(MF.attention_gate, view_x(x), view_g(g), w_x, bias["wx_bias"], w_g, bias["wg_bias"],
                        w_psi, bias["psi_bias"], out_weight=out_w, out_bias=out_b, training=training,
                        mode=case["mode"], double_sigmoid=case["double_sigmoid"],
                        return_alpha=case["return_alpha"], backend=backend, **bn)
        if case["return_alpha"]:   # both outputs (and their gradients) in one tensor
            out, alpha = result
            return torch.cat([out.flatten(), alpha.flatten()])
        return result
    return Built(fn, leaves, names)


SPECS: Dict[str, Spec] = {
    "position_attention": Spec(dict(epilogue=EPILOGUES, transpose=(False, True), token_layout=("tokens", "channels"),
                                    scale=(1.0, 0.37)), _position),
    "channel_attention": Spec(dict(epilogue=EPILOGUES, negate=(True, False), ndim=(1, 2, 3)), _channel,
                              rank=lambda case: 2 + case["ndim"]),
    "gaussian_axial": Spec(dict(bias=(False, True), shift=(0.0, 0.3, 1.7)), _gaussian("qkv"), rank=lambda c: 4),
    "gaussian_axial_from_scores": Spec(dict(bias=(False, True), shift=(0.0, 0.3, 1.7)), _gaussian("scores"),
                                       rank=lambda c: 4),
    "window_attention": Spec(dict(**dict.fromkeys(PROJ_BIASES, (False, True)), pad_mode=("mtunet", "mask"),
                                  out_layout=("grid", "padded", "windows")), _window, rank=lambda c: 4),
    "external_attention": Spec(dict.fromkeys(PROJ_BIASES, (False, True)), _external),
    "attention_gate": Spec(dict(biases=subsets(GATE_BIASES), bn=GATE_BN, double_sigmoid=(False, True),
                                return_alpha=(False, True), mode=("additive", "grid"), out=(False, True),
                                ndim=(2, 3)), _gate, rank=lambda case: 2 + case["ndim"]),
}


def dispatchers() -> List[str]:
    return [name for family in FAMILIES for name in family.dispatchers]


def axes_of(name: str) -> Dict[str, tuple]:
    """The whole axis set of one dispatcher: its backends (read from the registered dispatcher),
    dtypes, layouts, sizes and its own option axes."""
    spec = SPECS[name]
    backends = tuple(b for b in B.BACKENDS[1:] if b in B.registered_ops()[name].impls)
    rank_free = "ndim" not in spec.axes
    layouts = layouts_for(spec.rank({})) if rank_free else LAYOUTS
    return dict(backend=backends, dtype=DTYPES, layout=layouts, size=SIZES, **spec.axes)


def valid(name: str, case: dict) -> bool:
    """channels_last only for 4-/5-D inputs (the one constraint between axes)."""
    spec = SPECS[name]
    if "layout" in case and "ndim" in case and "ndim" in spec.axes:
        return case["layout"] in layouts_for(spec.rank(case))
    return True


# ---------------------------------------------------------------------------------------------
# the full product and its pairwise covering design
# ---------------------------------------------------------------------------------------------

def full_product(name: str) -> List[dict]:
    axes = axes_of(name)
    return [case for case in (dict(zip(axes, values)) for values in itertools.product(*axes.values()))
            if valid(name, case)]


def full_size() -> Dict[str, int]:
    """Combinations in the full product, per dispatcher (computed without listing them)."""
    sizes = {}
    for name in dispatchers():
        axes = axes_of(name)
        total = 1
        for values in axes.values():
            total *= len(values)
        if "ndim" in SPECS[name].axes:   # minus channels_last on 1-D (the only invalid pair)
            invalid = sum(1 for nd in axes["ndim"] if not valid(name, {"layout": "channels_last", "ndim": nd}))
            total -= total // (len(axes["layout"]) * len(axes["ndim"])) * invalid
        sizes[name] = total
    return sizes


def pairwise(name: str, seed: int = 0, candidates: int = 20) -> List[dict]:
    """A pairwise covering design of the product (AETG-style greedy, deterministic): every valid
    pair of values of two axes is in at least one case, and every backend × dtype runs once with
    all optional arguments on."""
    axes = axes_of(name)
    keys = list(axes)
    uncovered = {(a, va, b, vb) for i, a in enumerate(keys) for b in keys[i + 1:]
                 for va in axes[a] for vb in axes[b] if valid(name, {a: va, b: vb})}
    rng = random.Random(seed)
    rows: List[dict] = []
    order = {k: i for i, k in enumerate(keys)}

    def pairs_of(row: dict):
        items = sorted(row.items(), key=lambda kv: order[kv[0]])
        return {(a, va, b, vb) for i, (a, va) in enumerate(items) for (b, vb) in items[i + 1:]}

    # first, per backend × dtype, a case with every optional argument on (the largest subset, True):
    # a parameter's gradient (γ, a bias, shift) in every dtype on every backend, which pairs alone
    # would not guarantee
    fullest = {k: max(v, key=lambda x: len(x)) if isinstance(v[0], tuple) else True
               for k, v in SPECS[name].axes.items() if isinstance(v[0], tuple) or set(v) == {False, True}}
    seeds = [dict(fullest, backend=b, dtype=d) for b in axes["backend"] for d in axes["dtype"]]
    while uncovered or seeds:
        first = min(uncovered, key=lambda p: (order[p[0]], order[p[2]], repr(p)))
        start = seeds.pop(0) if seeds else {first[0]: first[1], first[2]: first[3]}
        best, best_gain = None, -1
        for _ in range(candidates):
            row = dict(start)
            rest = [k for k in keys if k not in row]
            rng.shuffle(rest)
            for k in rest:
                scored = []
                for v in axes[k]:
                    trial = dict(row, **{k: v})
                    if not valid(name, trial):
                        continue
                    gain = sum(1 for (a, va) in row.items()
                               if ((a, va, k, v) if order[a] < order[k] else (k, v, a, va)) in uncovered)
                    scored.append((gain, rng.random(), v))
                row[k] = max(scored, key=lambda s: (s[0], s[1]))[2]
            gain = len(pairs_of(row) & uncovered)
            if gain > best_gain:
                best, best_gain = row, gain
        uncovered -= pairs_of(best)
        rows.append({k: best[k] for k in keys})
    return rows


def _case_id(name: str, case: dict) -> str:
    def show(v):
        if isinstance(v, torch.dtype):
            return str(v).replace("torch.", "")
        if isinstance(v, tuple):
            return "+".join(v) or "none"
        return str(v)
    return name + "-" + "-".join(f"{k}={show(v)}" for k, v in case.items())


def _cases():
    for name in dispatchers():
        if name not in SPECS:
            continue
        for case in (full_product(name) if MODE == "full" else pairwise(name)):
            yield pytest.param(name, case, id=_case_id(name, case))


# ---------------------------------------------------------------------------------------------
# running one case
# ---------------------------------------------------------------------------------------------

def run(fn: Callable, leaves: Sequence[torch.Tensor], cotangent, backend: str, dtype: torch.dtype):
    """[output, d/d leaf ...] on fresh copies of the leaves cast to ``dtype``."""
    copies = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    out = fn(*copies, backend=backend)
    grads = torch.autograd.grad(out, copies, cotangent.to(out.dtype), allow_unused=True)
    return [out.detach()] + [g if g is not None else torch.zeros_like(c) for g, c in zip(grads, copies)]


class _Spy:
    """Wraps every backend implementation of a dispatcher; records which ran and the arguments of
    the dispatcher's last backend choice."""

    def __init__(self, monkeypatch, name: str):
        self.op = B.registered_ops()[name]
        self.entered: List[str] = []
        self.last_call: Optional[tuple] = None
        for backend, impl in list(self.op.impls.items()):
            monkeypatch.setitem(self.op.impls, backend, type(impl)(self._wrap(backend, impl.fn), impl.reasons))
        select = self.op.select    # every call's choice goes through Op.select (choose is a wrapper)

        def spy_select(*args, **kwargs):
            self.last_call = (args, kwargs)
            return select(*args, **kwargs)
        monkeypatch.setattr(self.op, "select", spy_select)

    def _wrap(self, backend, fn):
        def wrapped(*args, **kwargs):
            self.entered.append(backend)
            return fn(*args, **kwargs)
        return wrapped


def check_refusal(spy: _Spy, built: Built, backend: str, dtype: torch.dtype, cotangent) -> None:
    spy.entered.clear()
    recorder = _OpRecorder()
    _RECORDER.append(recorder)
    try:
        with pytest.raises(B.BackendUnavailable) as refused:
            run(built.fn, built.leaves, cotangent, backend, dtype)
    finally:
        _RECORDER.clear()
    message = str(refused.value)
    reason = message.split("cannot run this call: ", 1)[-1].strip()
    assert reason and reason != message, f"a refusal without a reason: {message!r}"
    assert spy.entered == [], f"{backend} refused after running {spy.entered}: {message}"
    assert not recorder.ops, f"{backend} refused after computing ({recorder.ops}): {message}"
    args, kwargs = spy.last_call
    kwargs = {k: v for k, v in kwargs.items() if k != "backend"}
    documented = spy.op.why_not(backend, *args, **kwargs)
    assert documented and all(r in message for r in documented), \
        f"{backend}: refusal {message!r} is not its predicate's reasons {documented}"


@pytest.mark.parametrize("name,case", list(_cases()))
def test_conformance(name, case, monkeypatch):
    # inputs from the case's own seed: distinct numbers per case (the conftest's seed 0 would give
    # every case of one shape the same), the same on every run, in any order or xdist worker
    torch.manual_seed(zlib.crc32(_case_id(name, case).encode()))
    spy = _Spy(monkeypatch, name)
    built = SPECS[name].build(case)
    backend, dtype = case["backend"], case["dtype"]
    # the float64 reference and its cotangent
    copies = [t.detach().clone().requires_grad_(True) for t in built.leaves]
    out = built.fn(*copies, backend="reference")
    cotangent = torch.randn(out.shape, dtype=F64)
    exact = [out.detach()] + [g if g is not None else torch.zeros_like(c) for g, c in
                              zip(torch.autograd.grad(out, copies, cotangent, allow_unused=True), copies)]
    spy.entered.clear()
    try:
        got = run(built.fn, built.leaves, cotangent, backend, dtype)
    except B.BackendUnavailable:
        check_refusal(spy, built, backend, dtype, cotangent)
        return
    assert backend in spy.entered, f"forced {backend} but {spy.entered} ran"
    assert got[0].dtype == dtype and got[0].shape == exact[0].shape, (got[0].dtype, got[0].shape)
    yardstick = None
    if dtype != F64:   # the rule's yardstick: the reference in the dtype, an ideal implementation
        own = got if backend == "reference" else run(built.fn, built.leaves, cotangent, "reference", dtype)
        inputs_rounded = run(built.fn, [rounded(t, dtype) for t in built.leaves], rounded(cotangent, dtype),
                             "reference", F64)
        yardstick = worse(max_errors(own, exact), max_errors([rounded(r, dtype) for r in inputs_rounded], exact))
    names = ["output"] + [f"grad {n}" for n in built.names]
    bad = [f"{n}: error {err:.3g} > bound {bound:.3g}"
           for n, (err, bound) in zip(names, check(got, exact, dtype, yardstick)) if not err <= bound]
    assert not bad, f"{backend} {dtype} wrong against the float64 reference: " + "; ".join(bad)


def test_every_dispatcher_of_the_family_table_has_a_spec():
    """A family added to the table without a conformance spec fails here; its backends need nothing."""
    assert sorted(dispatchers()) == sorted(SPECS), (sorted(dispatchers()), sorted(SPECS))
    for name in dispatchers():
        assert set(axes_of(name)["backend"]) >= {"reference", "torch"}, name


def test_the_covering_design_covers_every_pair():
    for name in dispatchers():
        axes, rows = axes_of(name), pairwise(name)
        keys = list(axes)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                seen = {(r[a], r[b]) for r in rows}
                need = {(va, vb) for va in axes[a] for vb in axes[b] if valid(name, {a: va, b: vb})}
                assert need <= seen, (name, a, b, need - seen)
    # the counted size is the listed product's (listed for the smaller families: the gate's is 204 800)
    for name in ("channel_attention", "gaussian_axial", "external_attention"):
        assert len(full_product(name)) == full_size()[name], name


def test_the_refusal_check_fails_a_late_or_reasonless_refusal(monkeypatch):
    """The matrix's refusal check is not vacuous: a refusal after a computation, or without a
    reason, fails it; a predicate's refusal before any computation passes."""
    spy = _Spy(monkeypatch, "channel_attention")
    x = torch.randn(2, 3, 5, dtype=F64)
    cotangent = torch.randn(2, 3, 5, dtype=F64)

    def refuses(computes: bool, reason: str):
        def op(t):
            if computes:
                t.exp()
            raise B.BackendUnavailable(f"channel_attention: backend 'cpp' cannot run this call: {reason}")
        return Built(lambda t, backend: public(op, t), [x], ["x"])
    spy.last_call = ((x,), {})
    with pytest.raises(AssertionError, match="after computing"):
        check_refusal(spy, refuses(True, "a reason"), "cpp", F64, cotangent)
    with pytest.raises(AssertionError, match="without a reason"):
        check_refusal(spy, refuses(False, ""), "cpp", F64, cotangent)
    with pytest.raises(AssertionError, match="not its predicate's reasons"):   # cpp can run this call
        check_refusal(spy, refuses(False, "made up"), "cpp", F64, cotangent)
    real = Built(lambda t, backend: public(MF.channel_attention, t, backend=backend), [x], ["x"])
    check_refusal(spy, real, "triton", F64, cotangent)   # float64: the interpreter's documented refusal


if __name__ == "__main__":   # python tests/test_conformance.py: the matrix's size per dispatcher
    sizes = full_size()
    for name in dispatchers():
        print(f"{name:<28} full {sizes[name]:>8}  pairwise {len(pairwise(name)):>4}")
    print(f"{'total':<28} full {sum(sizes.values()):>8}  pairwise {sum(len(pairwise(n)) for n in dispatchers()):>4}")

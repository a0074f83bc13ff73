"""Property tests (hypothesis) of every public op and the nn modules: for any drawn shape (sizes 1
and primes; 1-, 2- and 3-D grids), input layout (contiguous, channels_last, transposed, sliced,
expanded with stride 0), epilogue/bias set, dtype and backend present, the output and the gradient
of every input and parameter match the float64 reference (tests/_compare.py: float64 within a
few roundoffs, float32/bfloat16 within twice the reference's own error in that dtype).

Example counts per test follow the hypothesis profile (tests/_hypothesis_profiles.py): a few in CI,
``MEDATTN_HYPOTHESIS_PROFILE=thorough`` for many more.
"""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import medattn_fast
import medattn_fast.functional as MF
import medattn_fast.nn as mnn
from medattn_fast.functional import BatchNormParams

from _compare import assert_matches_reference
from _hypothesis_profiles import examples

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
SIZES = st.sampled_from([1, 2, 3, 5, 7, 13])
SMALL = st.sampled_from([1, 2, 3, 5])
BATCH = st.sampled_from([1, 2, 3])
INPUT_LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def _input(shape, layout, scale=1.0):
    """(leaf, view): ``view(leaf)`` has ``shape`` and the layout's strides; the leaf gets the gradient."""
    shape = tuple(shape)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return (scale * torch.randn(shape)).contiguous(memory_format=fmt), lambda t: t
    if layout == "transposed":
        return scale * torch.randn(*shape[:-2], shape[-1], shape[-2]), lambda t: t.transpose(-1, -2)
    if layout == "sliced":
        return scale * torch.randn(*shape[:-1], 2 * shape[-1]), lambda t: t[..., ::2]
    if layout == "expanded":
        return scale * torch.randn(1, *shape[1:]), lambda t: t.expand(shape)
    return scale * torch.randn(shape), lambda t: t


def _ids(value):
    return str(value).replace("torch.", "")


def _layouts(rank):
    return st.sampled_from(INPUT_LAYOUTS + (("channels_last",) if rank in (4, 5) else ()))


# ---------------------------------------------------------------------------------------------
# position attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", [("torch", F64), ("cpp", F64), ("torch", F32), ("cpp", F32), ("cpp", BF16), ("triton", F32)], ids=_ids)
@settings(**examples(4))
@given(data=st.data())
def test_position_attention_matches_reference(backend, dtype, data):
    draw = data.draw
    batch, nq, nk = draw(BATCH), draw(SIZES), draw(SIZES)
    dk, dv = draw(st.sampled_from([1, 2, 3, 5, 8])), draw(SMALL)
    transpose, layout = draw(st.booleans()), draw(st.sampled_from(["tokens", "channels"]))
    in_layout = draw(st.sampled_from(INPUT_LAYOUTS), label="input layout")
    parts = sorted(draw(st.sets(st.sampled_from(["gamma", "residual", "multiply"]))))
    scale = draw(st.sampled_from([1.0, 0.37]))
    n_v, n_out = (nq, nk) if transpose else (nk, nq)
    dims = {"q": (nq, dk), "k": (nk, dk), "v": (n_v, dv), "out": (n_out, dv)}
    shape = {n: (batch, *(d if layout == "tokens" else d[::-1])) for n, d in dims.items()}
    made = [_input(shape[n], in_layout) for n in ("q", "k", "v")]
    extra = {"gamma": torch.randn(1), "residual": torch.randn(shape["out"]), "multiply": torch.randn(shape["out"])}

    def fn(q, k, v, *epilogue, backend):
        q, k, v = (view(t) for (_, view), t in zip(made, (q, k, v)))
        return MF.position_attention(q, k, v, scale=scale, transpose=transpose, layout=layout, backend=backend,
                                     **dict(zip(parts, epilogue)))
    assert_matches_reference(fn, [m[0] for m in made] + [extra[p] for p in parts], backend, dtype,
                             ["grad q", "grad k", "grad v"] + [f"grad {p}" for p in parts])


# ---------------------------------------------------------------------------------------------
# channel attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", [("torch", F64), ("cpp", F64), ("cpp", F32), ("cpp", BF16), ("triton", F32)], ids=_ids)
@settings(**examples(4))
@given(data=st.data())
def test_channel_attention_matches_reference(backend, dtype, data):
    draw = data.draw
    spatial = draw(st.lists(st.sampled_from([1, 2, 3, 5, 7]), min_size=1, max_size=3), label="spatial")
    shape = (draw(BATCH), draw(SIZES), *spatial)
    in_layout = draw(_layouts(len(shape)), label="input layout")
    negate = draw(st.booleans())
    parts = sorted(draw(st.sets(st.sampled_from(["gamma", "residual", "multiply"]))))
    x, view = _input(shape, in_layout, scale=0.5)
    extra = {"gamma": torch.randn(1), "residual": torch.randn(shape), "multiply": torch.randn(shape)}

    def fn(x, *epilogue, backend):
        return MF.channel_attention(view(x), negate=negate, backend=backend, **dict(zip(parts, epilogue)))
    assert_matches_reference(fn, [x] + [extra[p] for p in parts], backend, dtype,
                             ["grad x"] + [f"grad {p}" for p in parts])


# ---------------------------------------------------------------------------------------------
# Gaussian axial attention (from q, k, v and from scores)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", [("torch", F64), ("cpp", F64), ("cpp", F32), ("triton", F32)], ids=_ids)
@settings(**examples(4))
@given(data=st.data())
def test_gaussian_axial_matches_reference(backend, dtype, data):
    draw = data.draw
    entry = draw(st.sampled_from(["qkv", "scores"]))
    batch, h, w, d = draw(BATCH), draw(st.sampled_from([1, 2, 3, 5, 7])), draw(st.sampled_from([1, 2, 3, 5, 7])), \
        draw(st.sampled_from([1, 2, 3, 5, 8]))
    in_layout = draw(st.sampled_from(INPUT_LAYOUTS), label="input layout")
    shift = torch.tensor([draw(st.sampled_from([0.0, 0.3, 1.7]))])
    if entry == "qkv":
        shapes = [(batch, h, w, d)] * 3
    else:
        shapes = [(batch, h, w, w), (batch, w, h, h), (batch, h, w, d)]
    made = [_input(s, in_layout, scale=0.5) for s in shapes]

    def fn(a, b, v, shift, *, backend):
        a, b, v = (view(t) for (_, view), t in zip(made, (a, b, v)))
        op = MF.gaussian_axial_attention if entry == "qkv" else MF.gaussian_axial_from_scores
        return op(a, b, v, shift, backend=backend)
    assert_matches_reference(fn, [m[0] for m in made] + [shift], backend, dtype,
                             ["grad 0", "grad 1", "grad v", "grad shift"], entry)


# ---------------------------------------------------------------------------------------------
# window and external attention
# ---------------------------------------------------------------------------------------------

BIASES = ("query_bias", "key_bias", "value_bias", "proj_bias")


@pytest.mark.parametrize("backend,dtype", [("torch", F64), ("torch", F32), ("triton", F32)], ids=_ids)
@settings(**examples(4))
@given(data=st.data())
def test_window_attention_matches_reference(backend, dtype, data):
    draw = data.draw
    batch, h, w = draw(BATCH), draw(st.sampled_from([1, 2, 3, 5, 6])), draw(st.sampled_from([1, 2, 3, 5, 6]))
    ws, heads, head_dim = draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([1, 2])), draw(SMALL)
    channels, out_channels = draw(SMALL), draw(SMALL)
    pad_mode, layout = draw(st.sampled_from(["mtunet", "mask"])), draw(st.sampled_from(["grid", "padded", "windows"]))
    given_biases = sorted(draw(st.sets(st.sampled_from(BIASES))))
    in_layout = draw(st.sampled_from(INPUT_LAYOUTS), label="input layout")
    inner = heads * head_dim
    x, view = _input((batch, h, w, channels), in_layout)
    weights = [0.5 * torch.randn(inner, channels) for _ in range(3)] + [torch.randn(out_channels, inner)]
    sizes = dict(query_bias=inner, key_bias=inner, value_bias=inner, proj_bias=out_channels)

    def fn(x, w_q, w_k, w_v, w_o, *biases, backend):
        b = dict.fromkeys(BIASES)
        b.update(zip(given_biases, biases))
        return MF.window_attention(view(x), w_q, b["query_bias"], w_k, b["key_bias"], w_v, b["value_bias"], w_o,
                                   b["proj_bias"], window_size=ws, num_heads=heads, pad_mode=pad_mode,
                                   layout=layout, backend=backend)
    assert_matches_reference(fn, [x, *weights] + [torch.randn(sizes[n]) for n in given_biases], backend, dtype,
                             ["grad x", "grad W_q", "grad W_k", "grad W_v", "grad W_o", *given_biases])


@pytest.mark.parametrize("backend,dtype", [("torch", F64), ("torch", F32), ("triton", F32)], ids=_ids)
@settings(**examples(4))
@given(data=st.data())
def test_external_attention_matches_reference(backend, dtype, data):
    draw = data.draw
    batch, n, channels = draw(BATCH), draw(SIZES), draw(SMALL)
    heads, head_dim, slots, out_channels = draw(st.sampled_from([1, 2, 3])), draw(SMALL), draw(SMALL), draw(SMALL)
    given_biases = sorted(draw(st.sets(st.sampled_from(BIASES))))
    in_layout = draw(st.sampled_from(INPUT_LAYOUTS), label="input layout")
    inner = heads * head_dim
    x, view = _input((batch, n, channels), in_layout)
    weights = [0.5 * torch.randn(inner, channels), torch.randn(slots, head_dim), torch.randn(head_dim, slots),
               torch.randn(out_channels, inner)]
    sizes = dict(query_bias=inner, key_bias=slots, value_bias=head_dim, proj_bias=out_channels)

    def fn(x, w_q, m_k, m_v, w_o, *biases, backend):
        b = dict.fromkeys(BIASES)
        b.update(zip(given_biases, biases))
        return MF.external_attention(view(x), w_q, b["query_bias"], m_k, b["key_bias"], m_v, b["value_bias"], w_o,
                                     b["proj_bias"], num_heads=heads, backend=backend)
    assert_matches_reference(fn, [x, *weights] + [torch.randn(sizes[n]) for n in given_biases], backend, dtype,
                             ["grad x", "grad W_q", "grad M_k", "grad M_v", "grad W_o", *given_biases])


# ---------------------------------------------------------------------------------------------
# attention gate (additive, eval BatchNorm or none)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", [("torch", F64), ("cpp", F64), ("cpp", F32), ("triton", F32)], ids=_ids)
@settings(**examples(4))
@given(data=st.data())
def test_attention_gate_matches_reference(backend, dtype, data):
    draw = data.draw
    nd = draw(st.sampled_from([2, 3]), label="spatial dims")
    size = [draw(st.sampled_from([1, 2, 3, 5, 7])) for _ in range(nd)]
    coarse = [draw(st.integers(1, s)) for s in size]
    batch, cx, cg, ci = draw(st.sampled_from([1, 2])), draw(SMALL), draw(SMALL), draw(SMALL)
    given_biases = sorted(draw(st.sets(st.sampled_from(["wx_bias", "wg_bias", "psi_bias"]))))
    with_bn, double_sigmoid = draw(st.booleans(), label="BatchNorm"), draw(st.booleans(), label="double sigmoid")
    in_layout = draw(_layouts(2 + nd), label="input layout")
    x, view = _input((batch, cx, *size), in_layout)
    g = torch.randn(batch, cg, *coarse)
    weights = [torch.randn(ci, cx), torch.randn(ci, cg), torch.randn(1, ci)]
    sizes = dict(wx_bias=ci, wg_bias=ci, psi_bias=1)
    stats = {n: (torch.randn(c), torch.rand(c) + 0.5) for n, c in (("bn_x", ci), ("bn_g", ci), ("bn_psi", 1))}
    bn_leaves = [torch.randn(c) for c in (ci, ci, ci, ci, 1, 1)] if with_bn else []

    def fn(x, g, w_x, w_g, w_psi, *rest, backend):
        biases = dict.fromkeys(["wx_bias", "wg_bias", "psi_bias"])
        biases.update(zip(given_biases, rest[:len(given_biases)]))
        bn = {}
        if with_bn:
            affine = rest[len(given_biases):]
            for i, name in enumerate(("bn_x", "bn_g", "bn_psi")):
                mean, var = (s.to(x.dtype) for s in stats[name])
                bn[name] = BatchNormParams(affine[2 * i], affine[2 * i + 1], mean, var)
        return MF.attention_gate(view(x), g, w_x, biases["wx_bias"], w_g, biases["wg_bias"], w_psi,
                                 biases["psi_bias"], double_sigmoid=double_sigmoid, backend=backend, **bn)
    leaves = [x, g, *weights] + [torch.randn(sizes[n]) for n in given_biases] + bn_leaves
    names = ["grad x", "grad g", "grad W_x", "grad W_g", "grad w_psi", *given_biases] + \
        [f"grad bn {i}" for i in range(len(bn_leaves))]
    assert_matches_reference(fn, leaves, backend, dtype, names)


# ---------------------------------------------------------------------------------------------
# nn modules: output and the gradient of the input and every parameter
# ---------------------------------------------------------------------------------------------

def _module(draw):
    """(module, input shape, backends with dtypes) for a drawn nn module configuration."""
    kind = draw(st.sampled_from(["position", "channel", "gaussian", "window", "external", "gate", "self_attention"]),
                label="module")
    batch = draw(st.sampled_from([1, 2]))
    fused = [("torch", F64), ("cpp", F64), ("triton", F32)]
    if kind == "position":
        c = draw(st.sampled_from([1, 3, 8, 9]))
        return mnn.PositionAttention(c, reduction=draw(st.sampled_from([1, 8]))), [(batch, c, 3, 5)], fused
    if kind == "channel":
        return mnn.ChannelAttention(negate=draw(st.booleans())), [(batch, draw(SIZES), 3, 2, 2)], fused
    if kind == "gaussian":
        d = draw(SMALL)
        return mnn.GaussianAxialAttention(d), [(batch, draw(SMALL), draw(SMALL), d)], fused
    if kind == "window":
        heads = draw(st.sampled_from([1, 2]))
        dim = heads * draw(SMALL)
        module = mnn.WindowAttention(dim, heads, draw(st.sampled_from([2, 3])),
                                     pad_mode=draw(st.sampled_from(["mtunet", "mask"])))
        return module, [(batch, draw(SMALL), draw(SMALL), dim)], [("torch", F64), ("triton", F32)]
    if kind == "external":
        dim = draw(SMALL)
        module = mnn.ExternalAttention(dim, num_heads=draw(st.sampled_from([1, 2])), memory_size=draw(SMALL),
                                       expansion=2)
        return module, [(batch, draw(SMALL), draw(SMALL), dim)], [("torch", F64), ("triton", F32)]
    if kind == "gate":
        nd = draw(st.sampled_from([2, 3]))
        module = mnn.AttentionGate(3, 4, 2, spatial_dims=nd).eval()
        for bn in (module.x_norm, module.g_norm, module.psi_norm):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
        return module, [(batch, 3, *[5] * nd), (batch, 4, *[3] * nd)], fused
    heads = draw(st.sampled_from([1, 2]))
    dim = heads * draw(SMALL)
    return mnn.SelfAttentionLayer(dim, heads), [(batch, dim, draw(SMALL), draw(SMALL))], fused


@settings(**examples(12))
@given(data=st.data())
def test_nn_modules_match_reference(data):
    draw = data.draw
    module, shapes, backends = _module(draw)
    backend, dtype = draw(st.sampled_from(backends), label="backend, dtype")
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape))       # γ, shift, biases: all away from their init
    names = [n for n, _ in module.named_parameters()]
    copies = {}

    def fn(*leaves, backend):
        dt = leaves[0].dtype
        if dt not in copies:
            copies[dt] = copy.deepcopy(module).to(dt)
        inputs, params = leaves[:len(shapes)], dict(zip(names, leaves[len(shapes):]))
        with medattn_fast.use_backend(backend):
            out = torch.func.functional_call(copies[dt], params, tuple(inputs))
        return out[0] if isinstance(out, tuple) else out
    leaves = [torch.randn(s) for s in shapes] + [p.detach() for p in module.parameters()]
    assert_matches_reference(fn, leaves, backend, dtype,
                             [f"grad input {i}" for i in range(len(shapes))] + [f"grad {n}" for n in names],
                             type(module).__name__)


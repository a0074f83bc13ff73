"""Property tests (hypothesis) of the nn modules: for any drawn module configuration and input
shape (sizes 1 and primes, 2-D/3-D), backend and dtype, the output and the gradient of the input
and of every parameter match the float64 reference (tests/_compare.py, the library's tolerance
rule). The public ops themselves (every backend × dtype × layout × optional argument × ndim ×
size) are the conformance matrix's (tests/test_conformance.py).

Example counts per test follow the hypothesis profile (tests/_hypothesis_profiles.py): a few in CI,
``MEDATTN_HYPOTHESIS_PROFILE=thorough`` for many more.
"""
import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import medattn_fast
import medattn_fast.nn as mnn

from _compare import assert_matches_reference
from _hypothesis_profiles import examples

F64, F32 = torch.float64, torch.float32
SIZES = st.sampled_from([1, 2, 3, 5, 7, 13])
SMALL = st.sampled_from([1, 2, 3, 5])


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


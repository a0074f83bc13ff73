"""Ops that take several Linear biases, with every kind of partial set (some given, some None):
forward and the gradient of every input, weight and given bias against the float64 reference, on
every backend present (``torch`` in float64, ``triton`` in float32 under the interpreter).

A backend that fills a missing bias with zeros, drops the given ones when another is None, or
routes a gradient to the wrong bias fails here; the nn layers pass such partial sets (no key bias
in ``WindowAttention``, no query/memory-key bias in ``ExternalAttention``).
"""
import pytest
import torch

import medattn_fast.functional as MF

from _compare import assert_matches_reference

F64, F32 = torch.float64, torch.float32
BIAS_NAMES = ("query_bias", "key_bias", "value_bias", "proj_bias")
# which biases are given: a partial set of every kind (the nn layers' sets among them)
PARTIAL_SETS = {
    "q_v_proj": ("query_bias", "value_bias", "proj_bias"),      # WindowAttention: no key bias
    "v_proj": ("value_bias", "proj_bias"),                      # ExternalAttention
    "key_only": ("key_bias",),
    "query_only": ("query_bias",),
    "value_only": ("value_bias",),
    "proj_only": ("proj_bias",),
    "q_k_v": ("query_bias", "key_bias", "value_bias"),
}
# every set on the torch backend (float64, fast); two complementary sets on the Triton kernels,
# whose interpreter runs take seconds each
CASES = [("torch", F64, given) for given in PARTIAL_SETS] + [("triton", F32, given) for given in ("q_v_proj", "key_only")]
IDS = [f"{backend}-{given}" for backend, _, given in CASES]


def _with_biases(call, given):
    """fn(x, weights..., given biases..., backend=) for ``assert_matches_reference``."""
    def fn(x, w_q, w_k, w_v, w_p, *biases, backend):
        kw = dict.fromkeys(BIAS_NAMES)
        kw.update(zip(given, biases))
        return call(x, w_q, w_k, w_v, w_p, kw, backend)
    return fn


WINDOW_CASES = ([("torch", F64, given, pad) for given in PARTIAL_SETS for pad in ("mtunet", "mask")]
                + [("triton", F32, "q_v_proj", "mtunet"), ("triton", F32, "key_only", "mask")])


@pytest.mark.parametrize("backend,dtype,given,pad_mode", WINDOW_CASES, ids=["-".join((c[0], c[2], c[3])) for c in WINDOW_CASES])
def test_window_attention_partial_biases(given, pad_mode, backend, dtype):
    names = PARTIAL_SETS[given]
    channels, inner, out_channels = 6, 8, 5
    x = torch.randn(2, 5, 6, channels)                  # 5×6 grid, ws = 4: padded on both axes
    weights = [0.5 * torch.randn(inner, channels) for _ in range(3)] + [torch.randn(out_channels, inner)]
    sizes = dict(query_bias=inner, key_bias=inner, value_bias=inner, proj_bias=out_channels)
    biases = [torch.randn(sizes[n]) for n in names]

    def call(x, w_q, w_k, w_v, w_p, kw, backend):
        return MF.window_attention(x, w_q, kw["query_bias"], w_k, kw["key_bias"], w_v, kw["value_bias"], w_p,
                                   kw["proj_bias"], window_size=4, num_heads=2, pad_mode=pad_mode,
                                   backend=backend)
    assert_matches_reference(_with_biases(call, names), [x, *weights, *biases], backend, dtype,
                             ["grad x", "grad W_q", "grad W_k", "grad W_v", "grad W_o", *names], given)


@pytest.mark.parametrize("backend,dtype,given", CASES, ids=IDS)
def test_external_attention_partial_biases(given, backend, dtype):
    names = PARTIAL_SETS[given]
    channels, heads, head_dim, slots, out_channels = 6, 2, 4, 5, 7
    x = torch.randn(2, 13, channels)
    weights = [0.5 * torch.randn(heads * head_dim, channels), torch.randn(slots, head_dim),
               torch.randn(head_dim, slots), torch.randn(out_channels, heads * head_dim)]
    sizes = dict(query_bias=heads * head_dim, key_bias=slots, value_bias=head_dim, proj_bias=out_channels)
    biases = [torch.randn(sizes[n]) for n in names]

    def call(x, w_q, m_k, m_v, w_p, kw, backend):
        return MF.external_attention(x, w_q, kw["query_bias"], m_k, kw["key_bias"], m_v, kw["value_bias"], w_p,
                                     kw["proj_bias"], num_heads=heads, backend=backend)
    assert_matches_reference(_with_biases(call, names), [x, *weights, *biases], backend, dtype,
                             ["grad x", "grad W_q", "grad M_k", "grad M_v", "grad W_o", *names], given)

"""Every size at which a kernel changes path, reached with forward and every gradient checked
against the float64 reference.

The sizes are derived from the kernels' own constants (read from the C++ extensions and the Triton
modules), so a changed constant moves its test with it:

* C++ position backward: key blocks of ``DEFAULT_BLOCK_K`` split into ``KEY_GROUPS`` groups; past
  ``KEY_GROUPS`` blocks a group loops over several blocks (each must restart its dK/dV
  accumulators). Query blocks of ``DEFAULT_BLOCK_Q``. Contiguous float32/float64 channel-first
  inputs are read in place by BLAS over every tile; strided ones are packed once.
* Triton channel softmax: rows wider than ``SOFTMAX_BLOCK_MAX`` run the online max/sum over
  several column blocks (each lane's sum rescaled when its max moves); tested on the row-softmax
  launch function, as the whole op at that width takes minutes under the interpreter.
* C++ Gaussian axial: the D loop runs whole blocks of ``FEATURE_BLOCK_*`` (compile-time width,
  register accumulators) and then a run-time tail; the widest tail (block − 1) fills the stack
  accumulators exactly.
* torch position backend: chunked over query rows (``chunk_size``, or the default that keeps one
  score block within ``_CHUNK_ELEMENTS``) and unchunked.
* 16-bit precision: bfloat16 results within 1.1× (RMS) of the float64 result rounded once to
  bfloat16 (for position attention, the flash-attention result with its saved bf16 output), so an
  extra rounding (P in bf16 before P·V; the channel map accumulated in bf16) fails.
"""
import importlib

import pytest
import torch

import medattn_fast.functional as MF
from medattn_fast import _build
from medattn_fast.ops import _position_cpp
import medattn_fast.triton_kernels.channel as triton_channel

from _compare import assert_matches_reference, results
from _tolerance import assert_within_twice

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
position_module = importlib.import_module("medattn_fast.ops.position")


# ---------------------------------------------------------------------------------------------
# C++ position: key groups, query/key blocks, in-place and packed operands
# ---------------------------------------------------------------------------------------------

def _position_sizes():
    """(Nq, Nk): two query blocks (the second ragged) and 2·KEY_GROUPS + 2 key blocks (the last
    ragged), so every backward key group loops over two or three key blocks."""
    groups = _build.load("cpu", "position").KEY_GROUPS
    block_q, block_k = _position_cpp.DEFAULT_BLOCK_Q, _position_cpp.DEFAULT_BLOCK_K
    nq, nk = block_q + 3, (2 * groups + 1) * block_k + 7
    assert -(-nk // block_k) > groups and -(-nq // block_q) == 2
    return nq, nk


def _position_fn(transpose, layout, strided=False):
    def fn(q, k, v, gamma, residual, multiply, *, backend):
        if strided:   # every other feature: no unit stride, the kernels pack copies
            q, k, v = (t[..., ::2] if layout == "tokens" else t[:, ::2] for t in (q, k, v))
        return MF.position_attention(q, k, v, scale=0.6, transpose=transpose, layout=layout, gamma=gamma,
                                     residual=residual, multiply=multiply, backend=backend)
    return fn


def _position_leaves(batch, nq, nk, dk, dv, transpose, layout, strided=False, dtype=F64):
    widen = 2 if strided else 1
    n_v, n_out = (nq, nk) if transpose else (nk, nq)
    if layout == "tokens":
        shapes = [(batch, nq, dk * widen), (batch, nk, dk * widen), (batch, n_v, dv * widen), (batch, n_out, dv)]
    else:
        shapes = [(batch, dk * widen, nq), (batch, dk * widen, nk), (batch, dv * widen, n_v), (batch, dv, n_out)]
    q, k, v, out_like = (torch.randn(s, dtype=dtype) for s in shapes)
    return [q, k, v, torch.randn(1, dtype=dtype), out_like, torch.randn(shapes[3], dtype=dtype)]


NAMES = ["grad q", "grad k", "grad v", "grad gamma", "grad residual", "grad multiply"]


@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
@pytest.mark.parametrize("layout", ["tokens", "channels"])
def test_cpp_position_past_the_key_groups_fp64(layout, transpose):
    nq, nk = _position_sizes()
    leaves = _position_leaves(2, nq, nk, 3, 5, transpose, layout)
    assert_matches_reference(_position_fn(transpose, layout), leaves, "cpp", F64, NAMES, f"Nq={nq} Nk={nk}")


@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
def test_cpp_position_in_place_channel_first_fp32_over_every_tile(transpose):
    """Contiguous float32 conv outputs (B, d, N): BLAS reads them in place, tile after tile."""
    nq, nk = _position_sizes()
    leaves = _position_leaves(1, nq, nk, 4, 6, transpose, "channels", dtype=F32)
    assert all(t.is_contiguous() for t in leaves)
    assert_matches_reference(_position_fn(transpose, "channels"), leaves, "cpp", F32, NAMES, f"Nq={nq} Nk={nk}")


@pytest.mark.parametrize("layout", ["tokens", "channels"])
def test_cpp_position_strided_operands_over_several_tiles(layout):
    """Operands without a unit stride are packed into contiguous copies once; several key blocks."""
    block_q, block_k = _position_cpp.DEFAULT_BLOCK_Q, _position_cpp.DEFAULT_BLOCK_K
    nq, nk = 2 * block_q + 1, 2 * block_k + 3
    leaves = _position_leaves(1, nq, nk, 2, 3, False, layout, strided=True)
    assert_matches_reference(_position_fn(False, layout, strided=True), leaves, "cpp", F64, NAMES)


# ---------------------------------------------------------------------------------------------
# torch position backend: chunked and unchunked
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 7, 22, 23, None])
@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
def test_torch_position_chunked_and_unchunked(transpose, chunk_size):
    leaves = _position_leaves(2, 23, 19, 3, 5, transpose, "tokens")

    def fn(q, k, v, gamma, residual, multiply, *, backend):
        return MF.position_attention(q, k, v, scale=0.6, transpose=transpose, gamma=gamma, residual=residual,
                                     multiply=multiply, backend=backend,
                                     chunk_size=chunk_size if backend == "torch" else None)
    assert_matches_reference(fn, leaves, "torch", F64, NAMES, f"chunk_size={chunk_size}")


@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
def test_torch_position_default_chunking_kicks_in(transpose, monkeypatch):
    """The default chunk (one score block within the element budget) splits the rows."""
    batch, nq, nk = 2, 41, 19
    monkeypatch.setattr(position_module, "_CHUNK_ELEMENTS", 16 * batch * nk)
    chunk = position_module.default_chunk_size(batch, nq, nk)
    assert 1 < chunk < nq and nq % chunk
    leaves = _position_leaves(batch, nq, nk, 3, 5, transpose, "channels")
    assert_matches_reference(_position_fn(transpose, "channels"), leaves, "torch", F64, NAMES, f"chunk={chunk}")


# ---------------------------------------------------------------------------------------------
# Triton channel softmax past its widest column block
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("negate", [True, False], ids=["danet", "seed001"])
def test_triton_channel_row_softmax_wider_than_its_block(negate):
    """The row softmax of the channel map at C = one block + 6 and two blocks + 3 (the whole op at
    C > 1024 takes minutes under the interpreter; its other kernels have no C-dependent path)."""
    for channels in (triton_channel.SOFTMAX_BLOCK_MAX + 6, 2 * triton_channel.SOFTMAX_BLOCK_MAX + 3):
        # energies spread over several units: a lane's running max moves between column blocks
        energy = 3 * torch.randn(2, 5, channels)
        sign = -1.0 if negate else 1.0
        exact = torch.softmax(sign * energy.double(), dim=-1)
        got = triton_channel.row_softmax(energy, negate)
        yardstick = (torch.softmax(sign * energy, dim=-1).double() - exact).abs().max().item()
        assert_within_twice([got], [yardstick], [exact], F32, ["softmax"], f"C={channels}")


# ---------------------------------------------------------------------------------------------
# C++ Gaussian axial: whole D blocks, then the tail
# ---------------------------------------------------------------------------------------------

def _feature_block(dtype):
    ext = _build.load("cpu", "gaussian_axial")
    return ext.FEATURE_BLOCK_DOUBLE if dtype == F64 else ext.FEATURE_BLOCK_FLOAT


def _axial_widths(dtype):
    block = _feature_block(dtype)
    # one block plus the widest tail (block − 1); for float64 also exact blocks and a 1-wide tail
    return [2 * block - 1] if dtype == F32 else [2 * block - 1, 2 * block, block + 1]


def _axial_fn(entry, strided):
    def fn(a, b, v, shift, *, backend):
        if strided:
            a, b, v = (t[..., ::2] if t.shape[-1] != 1 else t for t in (a, b, v))
        if entry == "qkv":
            return MF.gaussian_axial_attention(a, b, v, shift, backend=backend)
        return MF.gaussian_axial_from_scores(a, b, v, shift, backend=backend)
    return fn


def _axial_leaves(entry, batch, h, w, d, dtype, strided=False):
    widen = 2 if strided else 1
    if entry == "qkv":
        q, k, v = (0.3 * torch.randn(batch, h, w, d * widen, dtype=dtype) for _ in range(3))
        return [q, k, v, torch.tensor([0.4], dtype=dtype)]
    return [torch.randn(batch, h, w, w * widen, dtype=dtype), torch.randn(batch, w, h, h * widen, dtype=dtype),
            torch.randn(batch, h, w, d * widen, dtype=dtype), torch.tensor([0.4], dtype=dtype)]


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("entry", ["qkv", "scores"])
def test_cpp_gaussian_axial_feature_blocks_and_tails(entry, dtype):
    for d in _axial_widths(dtype):
        leaves = _axial_leaves(entry, 2, 5, 3, d, dtype)
        assert_matches_reference(_axial_fn(entry, False), leaves, "cpp", dtype,
                                 ["grad 0", "grad 1", "grad v", "grad shift"], f"D={d}")


@pytest.mark.parametrize("entry", ["qkv", "scores"])
def test_cpp_gaussian_axial_strided_lines_past_a_block(entry):
    """Lines without a unit feature stride go through the per-thread conversion buffer."""
    d = 2 * _feature_block(F32) - 1
    leaves = _axial_leaves(entry, 1, 4, 3, d, F32, strided=True)
    assert_matches_reference(_axial_fn(entry, True), leaves, "cpp", F32, ["grad 0", "grad 1", "grad v", "grad shift"])


# ---------------------------------------------------------------------------------------------
# bfloat16: one rounding, not two
# ---------------------------------------------------------------------------------------------

def _flash_floor(q, k, v, g, scale):
    """Output and gradients of softmax attention in float64 from bf16 inputs, with the backward's
    row term D = g·o taken from the bf16-rounded output (as every memory-lean backend saves it),
    each rounded once to bfloat16: the error no bf16 implementation can beat."""
    q, k, v, g = (t.double() for t in (q, k, v, g))
    p = torch.softmax(scale * q @ k.transpose(1, 2), dim=-1)
    o = p @ v
    ds = scale * p * (g @ v.transpose(1, 2) - (g * o.to(BF16).double()).sum(-1, keepdim=True))
    return [o, ds @ k, ds.transpose(1, 2) @ q, p.transpose(1, 2) @ g]


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "triton TF32 P"])
def test_bf16_position_error_is_one_rounding(backend):
    """RMS error vs float64 within 1.1× (out) and 1.25× (dq, dk, dv) that of the float64 result
    rounded once to bfloat16. The torch and cpp backends measure 1.00; the Triton kernels with P and
    dS fed to their dots as TF32 (``KernelConfig(position_p16=False)``; emulated under the
    interpreter), 1.00 on out and up to 1.11 on dk. The Triton default for 16-bit inputs rounds P
    and dS to bf16 (flash attention's choice, twice the tensor-core rate; within the 2x-PyTorch's-error
    rule of every other test): it adds one more bf16 rounding inside the sums, measured 1.14–1.33
    on out and 1.3–2.3 on the gradients, so it is held to 1.5× and 2.5× here."""
    import medattn_fast

    torch.manual_seed(0)
    scale = 0.5
    q, k, v = (torch.randn(2, n, d).to(BF16) for n, d in ((67, 8), (97, 8), (97, 24)))
    leaves, cot = [q, k, v], torch.randn(2, 67, 24).to(BF16)
    factors, config = [1.1, 1.25, 1.25, 1.25], medattn_fast.KernelConfig()
    if backend == "triton TF32 P":
        backend, config = "triton", medattn_fast.KernelConfig(position_p16=False)
    elif backend == "triton":
        factors = [1.5, 2.5, 2.5, 2.5]

    def fn(*t, backend):
        return MF.position_attention(*t, scale=scale, backend=backend)
    exact = results(fn, leaves, cot.double(), "reference", F64)
    with medattn_fast.use_kernel_config(config):
        got = results(fn, leaves, cot, backend)
    floor = _flash_floor(q, k, v, cot, scale)
    for name, r, e, f, factor in zip(["out", "dq", "dk", "dv"], got, exact, floor, factors):
        assert r.dtype == BF16
        rms = (r.double() - e).pow(2).mean().sqrt().item()
        rms_floor = (f.to(BF16).double() - e).pow(2).mean().sqrt().item()
        assert rms <= factor * rms_floor, \
            f"{backend} bf16 {name}: RMS error {rms:.3g} > {factor} × one rounding {rms_floor:.3g}"


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_bf16_channel_error_is_one_rounding(backend):
    """E = X Xᵀ, the softmax and A·X accumulate in float32 for bfloat16 inputs: the output and the
    gradient of x within 1.1× (RMS) of the float64 result rounded once to bfloat16 (all three
    backends measure 1.00; the reference backend, bf16 arithmetic throughout, 7–13×)."""
    torch.manual_seed(0)
    x, gamma, residual = (0.5 * torch.randn(2, 24, 7, 9)).to(BF16), torch.randn(1).to(BF16), \
        torch.randn(2, 24, 7, 9).to(BF16)
    cot = torch.randn(2, 24, 7, 9).to(BF16)

    def fn(x, gamma, residual, *, backend):
        return MF.channel_attention(x, gamma=gamma, residual=residual, backend=backend)
    exact = results(fn, [x, gamma, residual], cot.double(), "reference", F64)
    got = results(fn, [x, gamma, residual], cot, backend)
    for name, r, e in (("out", got[0], exact[0]), ("grad x", got[1], exact[1])):
        assert r.dtype == BF16
        rms = (r.double() - e).pow(2).mean().sqrt().item()
        rms_floor = (e.to(BF16).double() - e).pow(2).mean().sqrt().item()
        assert rms <= 1.1 * rms_floor, f"{backend} bf16 {name}: RMS error {rms:.3g} > 1.1 × one rounding {rms_floor:.3g}"

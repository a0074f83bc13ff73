"""The switchable variants of the Triton position-attention kernels (triton_kernels/position.py),
forward and every gradient against the float64 reference, under the interpreter (or on CUDA):

* ``KernelConfig(position_backward="fused")`` (``MEDATTN_POSITION_BWD=fused``; the kernel's
  ``variant="fused"``): dS computed once per tile, dq added with relaxed atomics — same bound as the
  default backward;
* ``KernelConfig(position_p16=False)`` (``MEDATTN_POSITION_P16=0``): P and dS enter the P·V / dS·K /
  dSᵀ·Q products as TF32 instead of rounded to the 16-bit input dtype (the default since issue 24:
  flash attention's choice, within the same 2x-PyTorch's-error rule as everything else);
* ``KernelConfig(position_dv_split=...)``: the width of the dv slice per program (a ragged split here);
* ``KernelConfig(position_hoist=True)``: the dq/dk kernels' dv-wide invariant operand loaded once;
* the unmasked EVEN specialisation the launch picks when every size is a whole number of blocks
  (and ``PositionConfig(even=False)``, the masked kernels on the same even sizes);
* ``_grad_out_kernel``'s own tile.

float16 runs the launch functions directly (the dispatcher refuses float16 under the interpreter,
whose float16 arithmetic is nonetheless right). bench/gpu_check.sh times the variants side by side on a GPU.
"""
from dataclasses import replace

import pytest
import torch

import medattn_fast
from medattn_fast.ops.position import position_attention
import medattn_fast.triton_kernels.position as triton_position
from medattn_fast.testing.tolerance import rounded
from _tolerance import EPS, F64, assert_within_twice, default_device, max_errors, worse


def _leaves(dtype, transpose, device):
    batch, nq, nk, dk, dv = 2, 37, 37 if transpose else 29, 4, 24
    q = torch.randn(batch, dk, nq, device=device, dtype=dtype, requires_grad=True)     # channel-first
    k = torch.randn(batch, dk, nk, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, dv, nq if transpose else nk, device=device, dtype=dtype, requires_grad=True)
    n_out = nk if transpose else nq
    gamma = torch.randn(1, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(batch, dv, n_out, device=device, dtype=dtype, requires_grad=True)
    f = torch.randn(batch, dv, n_out, device=device, dtype=dtype, requires_grad=True)
    return [q, k, v, gamma, x, f]


def _run(leaves, backend, transpose, cot, dtype=None):
    if dtype is not None:
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
    q, k, v, gamma, x, f = leaves
    out = position_attention(q, k, v, scale=0.7, transpose=transpose, layout="channels", gamma=gamma,
                             residual=x, multiply=f, backend=backend)
    return [out, *torch.autograd.grad(out, leaves, cot.to(out.dtype))]


def _errors(dtype, transpose):
    leaves = _leaves(dtype, transpose, default_device())
    cot = torch.randn(leaves[4].shape, device=leaves[4].device, dtype=F64)
    reference = _run(leaves, "reference", transpose, cot, dtype=F64)
    yardstick = max_errors(_run(leaves, "torch", transpose, cot), reference)
    if dtype != torch.float32:
        yardstick = worse(yardstick, max_errors(_run(leaves, "reference", transpose, cot), reference))
    fused = max_errors(_run(leaves, "triton", transpose, cot), reference)
    slack = [EPS[dtype] * max(1.0, r.abs().max().item()) for r in reference]
    return fused, yardstick, slack


NAMES = ["output", "grad q", "grad k", "grad v", "grad gamma", "grad x", "grad f"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
def test_fused_backward_matches_reference(transpose, dtype):
    with medattn_fast.use_kernel_config(medattn_fast.KernelConfig(position_backward="fused")):
        fused, yardstick, slack = _errors(dtype, transpose)
    for name, err, base, eps in zip(NAMES, fused, yardstick, slack):
        assert err <= 2 * base + eps, f"fused backward {name}: {err:.3g} > 2 x {base:.3g} + {eps:.3g}"


@pytest.mark.parametrize("transpose", [False, True], ids=["AV", "VA"])
def test_tf32_probabilities_variant_within_twice_pytorch_error(transpose, monkeypatch):
    """The TF32 P·V variant stays selectable (the environment supplies it here) and within the rule."""
    torch.manual_seed(1)
    monkeypatch.setenv("MEDATTN_POSITION_P16", "0")
    assert not medattn_fast.kernel_config().position_p16
    fused, yardstick, slack = _errors(torch.bfloat16, transpose)
    for name, err, base, eps in zip(NAMES, fused, yardstick, slack):
        assert err <= 2 * base + eps, f"TF32 P {name}: {err:.3g} > 2 x {base:.3g} + {eps:.3g}"


def test_switches_reach_the_launch_and_bad_values_are_refused(monkeypatch):
    # 16-bit P·V is the default for 16-bit inputs (dtype-driven), float32 keeps float32 P
    assert not triton_position.default_config(64, 512, torch.bfloat16).fp32_probabilities
    assert not triton_position.default_config(64, 512, torch.float16).fp32_probabilities
    assert triton_position.default_config(64, 512, torch.float32).fp32_probabilities
    assert not triton_position._resolve(None, 64, 512, torch.bfloat16).fp32_probabilities
    assert medattn_fast.KernelConfig().position_p16
    assert not triton_position._resolve(None, 64, 512, torch.bfloat16, p16=True).fp32_probabilities
    assert triton_position._resolve(None, 64, 512, torch.float32, p16=True).fp32_probabilities  # float32: no 16-bit P
    assert triton_position._resolve(None, 64, 512, torch.bfloat16, p16=False).fp32_probabilities
    explicit = triton_position.PositionConfig()
    assert triton_position._resolve(explicit, 64, 512, torch.bfloat16, p16=True) is explicit   # a config wins
    # the dv split (DANet's dv = 512: two 256-wide programs by default, four with the 128 variant)
    assert triton_position._resolve(None, 64, 512, torch.bfloat16).block_dv == 256
    assert triton_position._resolve(None, 64, 512, torch.bfloat16, dv_split=128).block_dv == 128
    with pytest.raises(ValueError, match=r"dv_split must be 0 or a power of two >= 16, got 96"):
        triton_position._resolve(None, 64, 512, torch.bfloat16, dv_split=96)
    with pytest.raises(ValueError, match=r"position_dv_split must be 0 or a power of two >= 16, got 8"):
        medattn_fast.KernelConfig(position_dv_split=8)
    with pytest.raises(TypeError, match=r"position_hoist must be a bool or None, got 1"):
        medattn_fast.KernelConfig(position_hoist=1)
    hoisted = triton_position._resolve(None, 64, 512, torch.bfloat16, hoist=True)
    assert hoisted.hoist_invariant and (hoisted.block_m_dk, hoisted.block_m_dq, hoisted.num_stages) == (32, 32, 2)
    assert hoisted.block_m == triton_position.default_config(64, 512, torch.bfloat16).block_m   # forward, dV: as before
    # the TF32 P·V variant (V widened to float32) keeps 128-wide dv splits: 256 asked 238,080 B
    assert triton_position._resolve(None, 64, 512, torch.bfloat16, p16=False).block_dv == 128
    assert not triton_position._resolve(None, 64, 512, torch.float32, hoist=True).hoist_invariant   # 16-bit only
    # _grad_out_kernel's own tile
    cfg = triton_position.default_config(64, 512, torch.bfloat16)
    assert (cfg.block_m_grad_out, cfg.block_dv_grad_out) == (32, 256) != (cfg.block_m, cfg.block_dv)
    # the environment only supplies the defaults, read in one place (KernelConfig.from_environment)
    monkeypatch.setenv("MEDATTN_POSITION_P16", "1")
    monkeypatch.setenv("MEDATTN_POSITION_BWD", "fused")
    assert medattn_fast.kernel_config() == medattn_fast.KernelConfig(position_backward="fused", position_p16=True)
    monkeypatch.setenv("MEDATTN_POSITION_P16", "0")
    assert medattn_fast.kernel_config() == medattn_fast.KernelConfig(position_backward="fused", position_p16=False)
    with medattn_fast.use_kernel_config(medattn_fast.KernelConfig()):   # an explicit config wins over it
        assert medattn_fast.kernel_config() == medattn_fast.KernelConfig()
    monkeypatch.setenv("MEDATTN_POSITION_BWD", "atomic")
    with pytest.raises(ValueError,
                       match=r"MEDATTN_POSITION_BWD\) must be one of \('separate', 'fused'\), got 'atomic'"):
        medattn_fast.kernel_config()
    with pytest.raises(ValueError, match=r"position_backward must be one of \('separate', 'fused'\), got 'atomic'"):
        medattn_fast.KernelConfig(position_backward="atomic")
    with pytest.raises(ValueError, match=r"variant must be one of \('separate', 'fused'\), got 'atomic'"):
        triton_position._backward_variant("atomic")
    assert triton_position._backward_variant("fused") == "fused"


def test_the_kernel_config_reaches_the_launches(monkeypatch):
    """What the Triton backend passes to the kernels is the KernelConfig in force at the call (a
    context, the process-wide choice, or the environment's default), forward and backward alike."""
    seen = []
    forward, backward = triton_position.position_forward, triton_position.position_backward

    def spy_forward(*args, **kwargs):
        seen.append(("forward", kwargs["p16"], kwargs["fp32_precision"], kwargs["dv_split"]))
        return forward(*args, **kwargs)

    def spy_backward(*args, **kwargs):
        seen.append(("backward", kwargs["variant"], kwargs["p16"], kwargs["fp32_precision"], kwargs["dv_split"],
                     kwargs["hoist"]))
        return backward(*args, **kwargs)

    monkeypatch.setattr(triton_position, "position_forward", spy_forward)
    monkeypatch.setattr(triton_position, "position_backward", spy_backward)
    monkeypatch.delenv("MEDATTN_POSITION_BWD", raising=False)
    monkeypatch.delenv("MEDATTN_POSITION_P16", raising=False)
    q, k, v = (torch.randn(1, 9, 4, requires_grad=True) for _ in range(3))

    def step():
        seen.clear()
        position_attention(q, k, v, backend="triton").sum().backward()
        return list(seen)

    assert step() == [("forward", True, None, 0), ("backward", "separate", True, None, 0, None)]
    config = medattn_fast.KernelConfig(fp32_precision="ieee", position_backward="fused", position_p16=False,
                                       position_dv_split=64, position_hoist=True)
    with medattn_fast.use_kernel_config(config):
        assert step() == [("forward", False, "ieee", 64), ("backward", "fused", False, "ieee", 64, True)]
    medattn_fast.set_kernel_config(medattn_fast.KernelConfig(position_backward="fused"))
    try:
        assert step() == [("forward", True, None, 0), ("backward", "fused", True, None, 0, None)]
    finally:
        medattn_fast.set_kernel_config(None)
    monkeypatch.setenv("MEDATTN_POSITION_BWD", "fused")
    assert step()[1] == ("backward", "fused", True, None, 0, None)


# ---------------------------------------------------------------------------------------------
# the launch functions directly: float16 too, every variant, even and odd sizes
# ---------------------------------------------------------------------------------------------
def _position_f64(q, k, v, gamma, x, f, scale, transpose):
    """γ · (o ⊙ f) + x with o = softmax(s q kᵀ) v (transpose: softmax(s q kᵀ)ᵀ v), token-major."""
    p = torch.softmax(scale * q @ k.transpose(1, 2), dim=-1)
    o = (p.transpose(1, 2) if transpose else p) @ v
    return gamma * (o * f) + x


def _launch(leaves, cot, scale, transpose, *, variant, config, **variants):
    """Output and gradients (q, k, v, γ, x, f) from the launch functions (no autograd)."""
    q, k, v, gamma, x, f = (t.detach() for t in leaves)
    out, o, lse = triton_position.position_forward(q, k, v, scale=scale, transpose=transpose, gamma=gamma,
                                                   residual=x, multiply=f, config=config,
                                                   **{n: val for n, val in variants.items() if n != "hoist"})
    dq, dk, dv, d_gamma, d_f = triton_position.position_backward(
        cot, q, k, v, o, lse, scale=scale, transpose=transpose, gamma=gamma, multiply=f, variant=variant,
        config=config, **variants)
    return [out, dq, dk, dv, d_gamma, cot, d_f]


def _exact(leaves, cot, scale, transpose):
    """Float64 output and gradients of (q, k, v, γ, x, f) on the leaves' values."""
    leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    out = _position_f64(*leaves, scale, transpose)
    return [out.detach(), *torch.autograd.grad(out, leaves, cot.double())]


def _yardstick(leaves, cot, scale, transpose, dtype, exact):
    """PyTorch's own error in ``dtype`` (the reference backend, token-major) and the ideal
    implementation's (float64 on the rounded inputs, rounded once), the worse of the two."""
    ref_leaves = [t.detach().requires_grad_(True) for t in leaves]
    q, k, v, gamma, x, f = ref_leaves
    out = position_attention(q, k, v, scale=scale, transpose=transpose, gamma=gamma, residual=x, multiply=f,
                             backend="reference")
    own = [out, *torch.autograd.grad(out, ref_leaves, cot)]
    ideal = [rounded(r, dtype) for r in _exact([rounded(t, dtype) for t in leaves], rounded(cot, dtype), scale,
                                               transpose)]
    return worse(max_errors(own, exact), max_errors(ideal, exact))


EVEN_TILES = triton_position.PositionConfig(block_m=32, block_n=32, block_dv=32, num_warps=4, num_stages=1,
                                            block_dv_chunk=16, block_m_dq=16, block_m_grad_out=16,
                                            block_dv_grad_out=64)
# (dtype, transpose, sizes, backward variant, launch variants, tiles): a covering set, each variant in
# each dtype at least once, even sizes (N = 64, dk = 16, dv = 64: EVEN everywhere with EVEN_TILES) and
# odd ones (Nq = 37, Nk = 29 or 37, dk = 24, dv = 40; the default tiles, masked)
LAUNCH_CASES = [
    ("float16", False, "even", "separate", {}, "even"),
    ("bfloat16", True, "even", "fused", {"hoist": True}, "even"),
    ("float32", False, "even", "fused", {"hoist": True}, "even"),
    ("bfloat16", False, "even", "separate", {}, "masked"),
    ("float16", True, "odd", "separate", {"hoist": True}, "default"),
    ("float16", False, "odd", "fused", {"dv_split": 32}, "default"),
    ("bfloat16", False, "odd", "separate", {"p16": False, "dv_split": 16}, "default"),
    ("float32", True, "odd", "separate", {"dv_split": 16}, "default"),
]


@pytest.mark.parametrize("dtype, transpose, sizes, variant, variants, tiles", LAUNCH_CASES,
                         ids=[f"{c[0]}-{'VA' if c[1] else 'AV'}-{c[2]}-{c[3]}-{c[5]}-"
                              + "-".join(f"{k}{v}" for k, v in c[4].items()) for c in LAUNCH_CASES])
def test_launch_variants_within_twice_pytorch_error(dtype, transpose, sizes, variant, variants, tiles, monkeypatch):
    """Forward and the gradients of q, k, v, γ, x (the cotangent itself) and f from the launch
    functions, against float64 under the tolerance rule; the launch picks the unmasked EVEN kernels
    exactly when every size is a whole number of blocks (and never with ``even=False``)."""
    dtype = getattr(torch, dtype)
    torch.manual_seed(7)
    batch, scale = 2, 0.6
    if sizes == "even":
        nq = nk = 64
        dk, dv = 16, 64
    else:
        nq, nk, dk, dv = 37, 37 if transpose else 29, 24, 40
    n_out = nk if transpose else nq
    leaves = [torch.randn(batch, nq, dk), torch.randn(batch, nk, dk), torch.randn(batch, nq if transpose else nk, dv),
              torch.randn(1), torch.randn(batch, n_out, dv), torch.randn(batch, n_out, dv)]
    leaves = [t.to(dtype) for t in leaves]
    cot = torch.randn(batch, n_out, dv).to(dtype)
    config = None
    if tiles != "default":
        config = replace(EVEN_TILES, fp32_probabilities=dtype == torch.float32 or variants.get("p16") is False,
                         hoist_invariant=bool(variants.get("hoist")), even=tiles == "even")
        variants = {}
    picks = []
    even = triton_position._even
    monkeypatch.setattr(triton_position, "_even", lambda *a: picks.append(even(*a)) or picks[-1])
    got = _launch(leaves, cot, scale, transpose, variant=variant, config=config, **variants)
    assert picks and all(picks) == (tiles == "even") and any(picks) == (tiles == "even"), picks
    assert all(g.dtype == dtype for g in got)
    exact = _exact(leaves, cot, scale, transpose)
    yardstick = _yardstick(leaves, cot, scale, transpose, dtype, exact)
    assert_within_twice(got, yardstick, exact, dtype, ["output", "grad q", "grad k", "grad v", "grad gamma",
                                                       "grad x", "grad f"], f"{variant} {variants} {tiles}")


def test_shared_memory_check_passes_the_defaults_and_refuses_what_would_not_fit():
    """The capability check's shared-memory bound (``PositionSharedMemory``, from
    ``shared_memory_bound``) accepts the default tiles at every dk the kernels take, dv up to 1024,
    every dtype, orientation and backward variant, on an H100's 232,448 B (the bound is checked
    against the compiler's own figures in tests/test_triton_sm90_compile.py); float32 dk = 256 fits
    now, and with the dk = 64 tiles (237,568 B on sm_90 before it had its own) it is over. A variant
    that would not fit (a 1024-wide dv split) is refused with the kernel and the numbers."""
    from medattn_fast.ops._families import PositionSharedMemory

    check, h100 = PositionSharedMemory(), 232448
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for dk in (1, 64, 100, 128, 256):
            for dv in (1, 64, 512, 1024):
                q, v = torch.empty(1, 70, dk, dtype=dtype), torch.empty(1, 70, dv, dtype=dtype)
                for variant, hoist, p16 in (("separate", None, True), ("fused", None, True), ("separate", True, True),
                                            ("fused", True, True), ("separate", None, False), ("fused", True, False)):
                    config = medattn_fast.KernelConfig(position_backward=variant, position_hoist=hoist,
                                                       position_p16=p16)
                    for transpose in (False, True):
                        assert check.shared_memory_reasons(q, v, transpose=transpose, backward=True, limit=h100,
                                                           config=config) == [], (dtype, dk, dv, variant, hoist, p16)
    fp32_dk256_old_tiles = triton_position.default_config(64, 512, torch.float32)
    assert max(triton_position.shared_memory_bound(fp32_dk256_old_tiles, 256, 512, torch.float32, transpose=False,
                                                   backward=True).values()) > h100
    q, v = torch.empty(1, 70, 64, dtype=torch.bfloat16), torch.empty(1, 70, 1024, dtype=torch.bfloat16)
    reasons = check.shared_memory_reasons(q, v, transpose=False, backward=False, limit=h100,
                                          config=medattn_fast.KernelConfig(position_dv_split=1024))
    assert reasons and all("over this device's 232448 B" in r for r in reasons), reasons
    assert any(r.startswith("the Triton position kernel _forward_kernel needs up to ") and "dv block 1024" in r
               for r in reasons), reasons
    assert check.reasons(q, q, v) == []   # a CPU tensor: left to the device check (the interpreter has no limit)

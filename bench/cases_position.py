"""Benchmark cases of position attention: CPU rows, GPU rows and the GPU check's rows.

``cases(device)`` (``python -m bench.run --op position``, the pytest-benchmark suite):

* DANet's ``PAM_Module`` at the head of DANet on a 96×96 feature map (B=2, C=64, N=9216; the
  issue's acceptance row: fwd+bwd peak memory of the fast module under 25% of the original's).
* Multi-Scale Guided Attention's ``PositionAttentionModule`` (the ``V @ A`` variant, transpose=True) at 64×64.

Providers: ``reference`` (the original module), ``torch`` / ``auto`` (the compat module forced to
the torch backend / on the default choice), ``compile`` (``torch.compile`` of the reference),
``sdpa`` (the same convs + ``F.scaled_dot_product_attention``, a peer; DANet layout only), ``triton``
(the compat module forced to the fused kernels; CUDA), ``cpp`` (forced to the C++ CPU kernels). All share
the reference module's parameter objects.

* CUDA only, at DANet head sizes with the peers: B=8, C=512 (dk = C/8 = 64, dv = 512), feature maps
  32², 64², 128² and 32³ (N = 1024 … 32768); float32 and bfloat16. Every provider computes DANet's
  PAM from the same x and the same 1×1 projections (written as Conv1d over the flattened
  positions, so 2-D and 3-D maps share one code path): ``out = γ · softmax(q kᵀ) v + x`` with
  channel-first q, k, v. Providers: ``reference`` (the materialising op backend: the original's
  arithmetic; it runs out of memory at 128²/32³ in fwd+bwd, recorded as an error row),
  ``compile`` (``torch.compile`` of it), ``torch`` (chunked, recomputing backward), ``sdpa``
  (``F.scaled_dot_product_attention`` on contiguous q/k/v with MATH excluded: ``sdpa_without_math``),
  ``flex`` (``flex_attention`` compiled), ``triton`` (the fused kernels, epilogue included).

``gpu_check_cases(device, tiny)`` (``bench/gpu_check.sh``): DANet's PAM at B=8 C=512 64² and 128²,
bf16 and fp32, no-grad and fwd+bwd — the drop-in on ``triton`` with its kernel variants side by side
(``KernelConfig``: ``fp32_precision`` ieee / tf32 in float32; in bfloat16 ``position_p16=False`` (P and
dS as TF32), ``position_hoist`` alone and with the fused backward; ``position_dv_split=128`` and
``position_backward="fused"``), ``auto`` (the row's note names the backend it ran), SDPA (contiguous
q/k/v, MATH excluded: a refusal is an error row) on PAM's one head and head-split (``head_split``: v
as 8 heads of 64 or 4 of 128, q and k repeated: the shapes flash attention takes) and the original
module; FlexAttention, one head and head-split, as separate rows run last (``flex_check_cases``). ``tiny``: B=1 C=16 8×8, the CPU
dry run.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from bench.harness import Case, auto_provider, fast_twin, with_backend, with_kernel_config
from medattn_fast import KernelConfig
from medattn_fast.compat.danet import PAM_Module as FastPAM
from medattn_fast.compat.guided_attention import PositionAttentionModule as FastPosition
from medattn_fast.reference.danet import PAM_Module
from medattn_fast.reference.guided_attention import PositionAttentionModule


def _attention_flops(batch: int, channels: int, n: int) -> float:
    dk, dv = channels // 8, channels
    projections = 2.0 * n * channels * (2 * dk + dv)
    scores_and_mix = 2.0 * n * n * dk + 2.0 * n * n * dv + 5.0 * n * n   # QKᵀ, A·V, softmax
    return batch * (projections + scores_and_mix)


def sdpa_backends(device: torch.device) -> list:
    """The SDPA backends a peer row may run on ``device``: the fused ones (no MATH) on CUDA; on CPU
    (the dry run only) MATH too, see :func:`sdpa_without_math`."""
    from torch.nn.attention import SDPBackend

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    return fused if torch.device(device).type == "cuda" else fused + [SDPBackend.MATH]


def sdpa_without_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, scale)`` on contiguous (B, heads, N, d) copies, with
    SDPA's MATH backend excluded on CUDA: the peer row must time a fused kernel (flash,
    memory-efficient or cuDNN), so a call none of them accepts raises (the harness records an error
    row with SDPA's reason) instead of silently materialising the N×N scores. q, k, v arrive as
    channel-first views (last-dim stride N), which the memory-efficient kernel rejects, hence the
    copies (timed: SDPA needs them). On a CPU device (the GPU check's dry run) no fused CPU kernel
    takes dk ≠ dv, so the toy row runs on MATH there, and only there."""
    from torch.nn.attention import sdpa_kernel

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    with sdpa_kernel(sdpa_backends(q.device)):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _dtypes(device: torch.device):
    return (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16, torch.float16)


def _setup_pam(batch: int, channels: int, size):
    def setup(device: torch.device, dtype: torch.dtype):
        ref = PAM_Module(channels).to(device=device, dtype=dtype)
        with torch.no_grad():
            ref.gamma.fill_(0.5)   # gamma = 0 (its init) would hide the attention from the error column
        fast = FastPAM(channels)
        # one set of weights: the compat module holds the reference's parameter objects
        fast.query_conv, fast.key_conv, fast.value_conv, fast.gamma = (
            ref.query_conv, ref.key_conv, ref.value_conv, ref.gamma)
        fast = fast.to(device=device, dtype=dtype)

        def sdpa(x):
            q, k, v = _pam_projections(ref, x)
            o = sdpa_without_math(q, k, v, scale=1.0)
            return ref.gamma * o.squeeze(1).transpose(1, 2).reshape(x.shape) + x

        x = torch.randn(batch, channels, *size, device=device, dtype=dtype, requires_grad=True)
        providers: Dict[str, Callable] = {
            "reference": ref.forward,
            "torch": with_backend(fast.forward, "torch"),
            "compile": torch.compile(ref),
            "auto": fast.forward,
            "triton": with_backend(fast.forward, "triton"),
            "cpp": with_backend(fast.forward, "cpp"),
            "sdpa": sdpa,
        }
        return (x,), providers

    return setup


def _setup_functional(batch: int, channels: int, size):
    """PAM on the functional op from shared Conv1d projections (the CUDA-only peer rows)."""
    def setup(device: torch.device, dtype: torch.dtype):
        from medattn_fast.ops.position import position_attention

        n = math.prod(size)
        dk = channels // 8
        proj_q = torch.nn.Conv1d(channels, dk, 1).to(device=device, dtype=dtype)
        proj_k = torch.nn.Conv1d(channels, dk, 1).to(device=device, dtype=dtype)
        proj_v = torch.nn.Conv1d(channels, channels, 1).to(device=device, dtype=dtype)
        gamma = torch.full((1,), 0.5, device=device, dtype=dtype, requires_grad=True)
        x = torch.randn(batch, channels, n, device=device, dtype=dtype, requires_grad=True)

        def projections(x):
            return proj_q(x), proj_k(x), proj_v(x)           # (B, dk, N), (B, dk, N), (B, C, N)

        def on_backend(backend: str) -> Callable:
            def run(x):
                q, k, v = projections(x)
                return position_attention(q, k, v, layout="channels", gamma=gamma, residual=x, backend=backend)
            return run

        def sdpa(x):
            q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in projections(x))   # (B, 1, N, d)
            o = sdpa_without_math(q, k, v, scale=1.0)
            return gamma * o.squeeze(1).transpose(1, 2) + x

        from torch.nn.attention.flex_attention import flex_attention

        flex_compiled = torch.compile(flex_attention)

        def flex(x):
            q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in projections(x))
            o = flex_compiled(q, k, v, scale=1.0)
            return gamma * o.squeeze(1).transpose(1, 2) + x

        reference = on_backend("reference")
        providers: Dict[str, Callable] = {
            "reference": reference,
            "compile": torch.compile(reference),
            "torch": on_backend("torch"),
            "sdpa": sdpa,
            "flex": flex,
            "triton": on_backend("triton"),
        }
        return (x,), providers

    return setup


def _setup_seed001(batch: int, channels: int, size):
    def setup(device: torch.device, dtype: torch.dtype):
        ref = PositionAttentionModule(channels).to(device=device, dtype=dtype)
        fast = FastPosition(channels)
        fast.first_branch_conv, fast.second_branch_conv, fast.third_branch_conv, fast.output_conv = (
            ref.first_branch_conv, ref.second_branch_conv, ref.third_branch_conv, ref.output_conv)
        fast = fast.to(device=device, dtype=dtype)
        x = torch.randn(batch, channels, *size, device=device, dtype=dtype, requires_grad=True)
        providers: Dict[str, Callable] = {
            "reference": ref.forward,
            "torch": with_backend(fast.forward, "torch"),
            "compile": torch.compile(ref),
            "auto": fast.forward,
            "triton": with_backend(fast.forward, "triton"),
            "cpp": with_backend(fast.forward, "cpp"),
        }
        return (x,), providers

    return setup


def cases(device: torch.device) -> List[Case]:
    rows = [
        Case(op="position_attention", shape="PAM B=2 C=64 96x96", setup=_setup_pam(2, 64, (96, 96)),
             flops=_attention_flops(2, 64, 96 * 96), dtypes=_dtypes(device),
             note="acceptance: compat.danet.PAM_Module fwd+bwd peak memory < 25% of the original's"),
        Case(op="position_attention", shape="PAM B=2 C=64 48x48", setup=_setup_pam(2, 64, (48, 48)),
             flops=_attention_flops(2, 64, 48 * 48), dtypes=_dtypes(device),
             note="cpp target: fwd+bwd >= 1.5x the compiled reference with O(N) memory"),
        Case(op="position_attention", shape="seed001 B=2 C=64 64x64", setup=_setup_seed001(2, 64, (64, 64)),
             flops=_attention_flops(2, 64, 64 * 64), dtypes=_dtypes(device)),
    ]
    # more map sizes for the memory-vs-resolution figure (bench/plot.py): one training-step row each
    for side in (32, 64):
        rows.append(Case(op="position_attention", shape=f"PAM B=2 C=64 {side}x{side}",
                         setup=_setup_pam(2, 64, (side, side)), flops=_attention_flops(2, 64, side * side),
                         dtypes=(torch.float32,), modes=("fwd+bwd",)))
    if device.type == "cuda":
        rows.append(Case(op="position_attention", shape="PAM B=1 C=512 128x128",
                         setup=_setup_pam(1, 512, (128, 128)), flops=_attention_flops(1, 512, 128 * 128),
                         dtypes=_dtypes(device)))
        for size in ((32, 32), (64, 64), (128, 128), (32, 32, 32)):   # DANet head sizes, with the peers
            rows.append(Case(op="position_attention", shape="PAM B=8 C=512 " + "x".join(map(str, size)),
                             setup=_setup_functional(8, 512, size), flops=_attention_flops(8, 512, math.prod(size)),
                             dtypes=(torch.float32, torch.bfloat16), devices=("cuda",),
                             note="N x N reference/compile rows run out of memory at the large maps"))
    return rows


# ------------------------------------------------------------------------------------------------
# the GPU check (bench/gpu_check.sh)
# ------------------------------------------------------------------------------------------------

def _pam_projections(module, x):
    q = module.query_conv(x).flatten(2).transpose(1, 2).unsqueeze(1)   # (B, 1, N, dk)
    k = module.key_conv(x).flatten(2).transpose(1, 2).unsqueeze(1)
    v = module.value_conv(x).flatten(2).transpose(1, 2).unsqueeze(1)   # (B, 1, N, C)
    return q, k, v


def head_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int):
    """PAM's one head (q, k: (B, 1, N, dk); v: (B, 1, N, dv)) as ``heads`` heads of width dv/heads
    that a fused SDPA or FlexAttention kernel takes (their head dims are equal and at most 256): v's
    columns split over the heads, q and k repeated on every head and zero-padded to dv/heads when
    dk is narrower (a zero column adds nothing to q·kᵀ). Every head then has PAM's own softmax,
    so the heads' outputs side by side are PAM's ``softmax(q kᵀ) v`` exactly; the repeated q, k
    are contiguous copies, as the kernels need (timed: the peer needs them).

    Returns (q, k, v) of shape (B, heads, N, dv/heads)."""
    batch, _, n, dk = q.shape
    dv = v.shape[-1]
    if dv % heads or dk > dv // heads:
        raise ValueError(f"head_split: dv = {dv} must split into {heads} heads at least dk = {dk} wide")
    width = dv // heads
    if dk < width:
        q, k = (F.pad(t, (0, width - dk)) for t in (q, k))
    q, k = (t.expand(batch, heads, n, width).contiguous() for t in (q, k))
    v = v.reshape(batch, n, heads, width).transpose(1, 2).contiguous()
    return q, k, v


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, dv/heads) -> (B, 1, N, dv), the inverse of :func:`head_split` on v."""
    batch, heads, n, width = o.shape
    return o.transpose(1, 2).reshape(batch, 1, n, heads * width)


def _sdpa_pam(module, heads: int = 1):
    """γ · SDPA(q, k, v, scale=1) + x on a fused SDPA kernel, never MATH (:func:`sdpa_without_math`).
    ``heads`` = 1: PAM's one head (dk ≠ dv leaves the memory-efficient and cuDNN kernels);
    ``heads`` > 1: :func:`head_split` (8 × 64 and 4 × 128 take flash attention too)."""

    def run(x):
        q, k, v = _pam_projections(module, x)
        if heads == 1:
            o = sdpa_without_math(q, k, v, scale=1.0)
        else:
            o = _merge_heads(sdpa_without_math(*head_split(q, k, v, heads), scale=1.0))
        return module.gamma * o.squeeze(1).transpose(1, 2).reshape(x.shape) + x
    run.__self__ = module   # the harness frees the module's .grad between calls
    return run


def _flex_pam(module, heads: int = 1):
    """γ · FlexAttention(q, k, v, scale=1) + x, compiled; ``heads`` > 1: :func:`head_split`."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)

    def run(x):
        q, k, v = _pam_projections(module, x)
        if heads == 1:
            o = compiled(q, k, v, scale=1.0)
        else:
            o = _merge_heads(compiled(*head_split(q, k, v, heads), scale=1.0))
        return module.gamma * o.squeeze(1).transpose(1, 2).reshape(x.shape) + x
    run.__self__ = module
    return run


# DANet's v (512 wide) split over 8 heads of 64 (q, k's own width) and 4 heads of 128 (q, k padded)
_SPLIT_HEADS = (8, 4)


def _check_pam_setup(batch: int, channels: int, side: int, with_flex: bool):
    def setup(device: torch.device, dtype: torch.dtype):
        original = PAM_Module(channels).to(device=device, dtype=dtype)
        with torch.no_grad():
            original.gamma.fill_(0.5)
        fast = fast_twin(original)
        x = torch.randn(batch, channels, side, side, device=device, dtype=dtype, requires_grad=True)
        providers: Dict[str, Callable] = {}
        if with_flex:
            providers["flex"] = _flex_pam(original)
            for heads in _SPLIT_HEADS:
                providers[f"flex {heads} heads"] = _flex_pam(original, heads)
            return (x,), providers
        triton = with_backend(fast, "triton")
        providers["triton"] = triton
        if dtype == torch.float32:
            providers["triton ieee"] = with_kernel_config(triton, KernelConfig(fp32_precision="ieee"))
            providers["triton tf32"] = with_kernel_config(triton, KernelConfig(fp32_precision="tf32"))
        else:   # the default multiplies P and dS in 16 bits; the TF32 products and the hoisted operand
            providers["triton tf32-P"] = with_kernel_config(triton, KernelConfig(position_p16=False))
            providers["triton hoist"] = with_kernel_config(triton, KernelConfig(position_hoist=True))
            providers["triton fused+hoist"] = with_kernel_config(
                triton, KernelConfig(position_backward="fused", position_hoist=True))
        providers["triton dv128"] = with_kernel_config(triton, KernelConfig(position_dv_split=128))
        providers["triton dq+dk fused"] = with_kernel_config(triton, KernelConfig(position_backward="fused"))
        providers["auto"] = auto_provider(fast)
        providers["sdpa"] = _sdpa_pam(original)
        for heads in _SPLIT_HEADS:
            providers[f"sdpa {heads} heads"] = _sdpa_pam(original, heads)
        providers["original"] = original.forward
        return (x,), providers
    return setup


def _check_cases(tiny: bool, with_flex: bool) -> List[Case]:
    out = []
    for batch, channels, side in ([(1, 16, 8)] if tiny else [(8, 512, 64), (8, 512, 128)]):
        n, dk = side * side, channels // 8
        out.append(Case(op="position", shape=f"PAM B={batch} C={channels} {side}x{side}" + (" flex" if with_flex else ""),
                        setup=_check_pam_setup(batch, channels, side, with_flex),
                        flops=batch * (2.0 * n * channels * (2 * dk + channels) + 2.0 * n * n * (dk + channels)),
                        fwd_bwd_flops=3.5,   # backward: ~2.5x the forward's matmul work
                        dtypes=(torch.bfloat16, torch.float32), modes=("no-grad", "fwd+bwd"),
                        estimate_s=2 if tiny else (40 if side >= 128 else 20), warm=() if with_flex else ("triton",),
                        note="flops: 1x1 projections + QK^T + PV (fwd); 3.5x for fwd+bwd"))
    return out


def gpu_check_cases(device: torch.device, tiny: bool = False) -> List[Case]:
    """The GPU check's PAM rows (``tiny``: toy shapes for the CPU dry run)."""
    return _check_cases(tiny, with_flex=False)


def flex_check_cases(device: torch.device, tiny: bool = False) -> List[Case]:
    """FlexAttention on the GPU check's PAM shapes: timed last, only if time is left (not in the dry run)."""
    return [] if tiny else _check_cases(tiny, with_flex=True)

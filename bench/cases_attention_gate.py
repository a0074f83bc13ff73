"""Benchmark cases of the Attention U-Net gate.

Shapes are one decoder level of Attention U-Net: skip x (B, Cx, *S), gating signal g from the
level below (B, 2·Cx, *S/2), C_int = Cx/2. Eval and train mode are separate cases: eval is where
BN folds into the convolutions; train needs batch statistics and updates the running ones.

Providers: ``reference`` (the seeds' AttentionBlock module), ``torch`` / ``auto`` / ``cpp`` /
``triton`` / ``cuda`` (:class:`medattn_fast.nn.AttentionGate` forced to that backend / on the
default choice),
``compile`` (``torch.compile`` of the reference module), ``grid`` cases compare Oktay's
GridAttentionBlock (output ``W_y``; its α is not part of the timed output). All providers share
the reference module's parameter and buffer objects.

``gpu_check_cases(device, tiny)`` (``bench/gpu_check.sh``): 2-D B=8 C=64 224² eval (no-grad; GB/s
against the measured copy ceiling) and 3-D B=2 C=32 64³ train (fwd+bwd), bf16 and fp32, the
drop-in on ``triton`` (and ``cuda`` on a GPU) vs the original ``AttentionBlock`` with a
trained-looking BatchNorm state (``tiny``: toy shapes, the CPU dry run).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import torch

from bench.harness import Case, auto_provider, fast_twin, with_backend, with_kernel_config
from medattn_fast import KernelConfig
from medattn_fast.nn.attention_gate import AttentionGate
from medattn_fast.reference.attention_gate import AttentionBlock, GridAttentionBlock


def _additive_flops(batch: int, cx: int, cg: int, cint: int, size: Tuple[int, ...]) -> float:
    n = batch * math.prod(size)
    ng = batch * math.prod(s // 2 for s in size)
    # W_x·x, W_g·g (coarse), interpolation (~2^d mults+adds per value), w_ψ·relu(a), α ⊙ x
    return 2.0 * n * cx * cint + 2.0 * ng * cg * cint + 2.0 * (2 ** len(size)) * n * cint + 2.0 * n * cint + n * cx


def _shape(batch: int, cx: int, size: Tuple[int, ...], training: bool, mode: str = "additive") -> str:
    dims = "x".join(str(s) for s in size)
    return f"{mode} B={batch} C={cx} {dims} {'train' if training else 'eval'}"


def _compile(module: torch.nn.Module) -> Callable:
    """torch.compile of the reference; on a torch without a working compiler the provider is
    reported unavailable by the harness (it raises at the first call)."""
    return torch.compile(module)


def _setup_additive(batch: int, cx: int, size: Tuple[int, ...], training: bool):
    cg, cint, nd = 2 * cx, cx // 2, len(size)

    def setup(device: torch.device, dtype: torch.dtype):
        ref = AttentionBlock(cx, cg, cint, spatial_dims=nd).to(device=device, dtype=dtype).train(training)
        with torch.no_grad():  # a trained-looking BN state, so that eval folding does real work
            for bn in (ref.Wx[1], ref.Wg[1], ref.psi[1]):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.1)
                bn.running_mean.normal_(0.0, 0.1)
                bn.running_var.uniform_(0.5, 1.5)

        def gate(backend):
            m = AttentionGate(cx, cg, cint, spatial_dims=nd, backend=backend).to(device=device, dtype=dtype)
            # share the reference's parameters and buffers (one set of weights for all providers)
            m.x_conv, m.x_norm, m.g_conv, m.g_norm, m.psi_conv, m.psi_norm = (
                ref.Wx[0], ref.Wx[1], ref.Wg[0], ref.Wg[1], ref.psi[0], ref.psi[1])
            return m.train(training)

        x = torch.randn(batch, cx, *size, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(batch, cg, *(s // 2 for s in size), device=device, dtype=dtype, requires_grad=True)
        providers: Dict[str, Callable] = {
            "reference": ref.forward,
            "torch": gate("torch").forward,
            "compile": _compile(ref),
            "auto": gate(None).forward,
        }
        for fused in ("cpp", "triton", "cuda"):  # each raises BackendUnavailable where it cannot run
            providers[fused] = gate(fused).forward
        return (x, g), providers

    return setup


def _eval_bytes(batch: int, cx: int, size: Tuple[int, ...], dtype_bytes: int) -> float:
    """The fused eval pass's compulsory traffic: x read once and out written once (α, G and the
    weights are < 2% more at these shapes)."""
    return 2.0 * batch * cx * math.prod(size) * dtype_bytes


def _bytes_moved(batch: int, cx: int, size: Tuple[int, ...]) -> Callable[[torch.dtype], float]:
    """The eval gate's bytes-moved limit in a dtype (the harness turns it into GB/s and a fraction
    of the measured copy bandwidth: the issue's "within 1.5× of the bytes-moved limit" is
    ``of copy >= 67%``)."""
    return lambda dtype: _eval_bytes(batch, cx, size, torch.empty((), dtype=dtype).element_size())


def _setup_grid(batch: int, cx: int, size: Tuple[int, ...], training: bool):
    cg, cint, nd = 2 * cx, cx // 2, len(size)

    def setup(device: torch.device, dtype: torch.dtype):
        ref = GridAttentionBlock(cx, cg, cint, spatial_dims=nd, sub_sample_factor=2)
        ref = ref.to(device=device, dtype=dtype).train(training)
        with torch.no_grad():  # a trained-looking BN state for W's BN (folded in eval)
            bn = ref.W[1]
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.running_mean.normal_(0.0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)

        def gate(backend):
            m = AttentionGate(cx, cg, cint, spatial_dims=nd, mode="grid", sub_sample_factor=2, backend=backend)
            m = m.to(device=device, dtype=dtype)
            m.x_conv, m.g_conv, m.psi_conv, m.out_conv, m.out_norm = ref.theta, ref.phi, ref.psi, ref.W[0], ref.W[1]
            return m.train(training)

        x = torch.randn(batch, cx, *size, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(batch, cg, *(s // 2 for s in size), device=device, dtype=dtype, requires_grad=True)
        compiled = _compile(ref)
        torch_gate, auto_gate = gate("torch"), gate(None)
        providers: Dict[str, Callable] = {
            "reference": lambda x, g: ref(x, g)[0],
            "torch": torch_gate.forward,
            "compile": lambda x, g: compiled(x, g)[0],
            "auto": auto_gate.forward,
        }
        for fused in ("cpp", "triton", "cuda"):  # each raises BackendUnavailable where it cannot run
            providers[fused] = gate(fused).forward
        return (x, g), providers

    return setup


def cases(device: torch.device) -> List[Case]:
    if device.type == "cuda":  # the real networks' sizes (2-D 224²/512², 3-D 64³/128³)
        additive = [(2, 64, (224, 224)), (2, 64, (512, 512)), (1, 32, (64, 64, 64)), (1, 32, (128, 128, 128))]
        grid = [(2, 64, (224, 224)), (1, 32, (64, 64, 64))]
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
    else:
        additive = [(2, 64, (128, 128)), (1, 32, (32, 32, 32))]
        grid = [(2, 64, (128, 128))]
        dtypes = (torch.float32,)
    out: List[Case] = []
    for batch, cx, size in additive:
        for training in (False, True):
            out.append(Case(op="attention_gate", shape=_shape(batch, cx, size, training),
                            setup=_setup_additive(batch, cx, size, training),
                            flops=_additive_flops(batch, cx, 2 * cx, cx // 2, size), dtypes=dtypes,
                            bytes_moved=None if training else _bytes_moved(batch, cx, size)))
    if device.type == "cuda":  # the fused kernels' acceptance shapes (issue "Fused attention gate")
        for batch, cx, size in [(8, 64, (224, 224)), (8, 64, (512, 512)), (2, 32, (64, 64, 64)),
                                (2, 32, (128, 128, 128))]:
            for training in (False, True):
                note = ""
                if not training:
                    note = (f"fused eval pass moves {_eval_bytes(batch, cx, size, 4) / 2**20:.0f} MiB in float32, "
                            f"{_eval_bytes(batch, cx, size, 2) / 2**20:.0f} MiB in bfloat16 (x read once + out "
                            f"written once); GB/s = that / median time")
                out.append(Case(op="attention_gate", shape="fused " + _shape(batch, cx, size, training),
                                setup=_setup_additive(batch, cx, size, training),
                                flops=_additive_flops(batch, cx, 2 * cx, cx // 2, size),
                                dtypes=(torch.float32, torch.bfloat16), devices=("cuda",), note=note,
                                bytes_moved=None if training else _bytes_moved(batch, cx, size)))
    for batch, cx, size in grid:
        for training in (False, True):
            out.append(Case(op="attention_gate", shape=_shape(batch, cx, size, training, "grid"),
                            setup=_setup_grid(batch, cx, size, training), dtypes=dtypes))
    return out


def _check_setup(batch: int, cx: int, size: Tuple[int, ...], training: bool):
    def setup(device: torch.device, dtype: torch.dtype):
        nd, cg, cint = len(size), 2 * cx, cx // 2
        original = AttentionBlock(cx, cg, cint, spatial_dims=nd).to(device=device, dtype=dtype)
        with torch.no_grad():   # a trained-looking BatchNorm state, so that eval folding does real work
            for m in original.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        original.train(training)
        fast = fast_twin(original).train(training)
        x = torch.randn(batch, cx, *size, device=device, dtype=dtype, requires_grad=training)
        g = torch.randn(batch, cg, *(s // 2 for s in size), device=device, dtype=dtype, requires_grad=training)
        providers: Dict[str, Callable] = {"triton": with_backend(fast, "triton")}
        # the Triton gate's per-channel kernels beside the default (the tensor-core dot kernels where they apply)
        providers["triton loop"] = with_kernel_config(providers["triton"], KernelConfig(gate_kernel="loop"))
        if device.type == "cuda":
            providers["cuda"] = with_backend(fast, "cuda")
        providers["auto"] = auto_provider(fast)
        providers["original"] = original.forward
        return (x, g), providers
    return setup


def gpu_check_cases(device: torch.device, tiny: bool = False) -> List[Case]:
    """The GPU check's gate rows (``tiny``: toy shapes for the CPU dry run)."""
    gate2d = (1, 8, (16, 16)) if tiny else (8, 64, (224, 224))            # (B, Cx, spatial)
    gate3d = (1, 4, (8, 8, 8)) if tiny else (2, 32, (64, 64, 64))
    out = []
    for (batch, cx, size), training in ((gate2d, False), (gate3d, True)):
        voxels = batch * math.prod(size)

        def moved(dtype, cx=cx, voxels=voxels):   # eval: x read once + out written once
            return 2.0 * voxels * cx * torch.finfo(dtype).bits / 8

        out.append(Case(op="attention_gate", shape=f"gate {len(size)}-D B={batch} C={cx} {'x'.join(map(str, size))} "
                        f"{'train' if training else 'eval'}", setup=_check_setup(batch, cx, size, training),
                        dtypes=(torch.bfloat16, torch.float32), modes=("fwd+bwd",) if training else ("no-grad",),
                        bytes_moved=None if training else moved, estimate_s=2 if tiny else 10,
                        warm=("triton",),   # the cuda build runs beside the warm-up, under its own lock
                        note="" if training else "GB/s: x read + out written once; % of the copy ceiling"))
    return out

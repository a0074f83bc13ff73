"""The table of op families: one row each, read by dispatch and printed by ``medattn-fast info``.

A row names the family (the name of every file it has: ``ops/<family>.py``,
``ops/_<family>_<backend>.py``, ``csrc/<kind>/<family>.*``, ``triton_kernels/<family>.py``), the
dispatchers it defines (``backend.registered_ops()`` keys), its fused backends (each
``ops/_<family>_<backend>.py`` with a ``register(*dispatchers)`` that ``medattn_fast.ops`` calls),
``auto``'s static order per device (the candidates of the measured choice, ``medattn_fast.autotune``,
and the whole choice with ``MEDATTN_AUTOTUNE=0``), the backend every call runs while exporting, an
optional hook that may reorder the static order for one call (``auto_order``; no family uses one
now), the family's part of the autotune key (``tune_key``: the gate's train/eval) and kernel variants
the autotune times as candidates of their own (``tune_variants``), and the sizes past which a backend's kernels cannot run a call, as data
(:class:`medattn_fast.backend.Limit`), so no predicate repeats a kernel's constant by hand
(``tests/test_families.py`` checks every number against the kernel's own).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from .. import backend as B

__all__ = ["FAMILIES", "Family", "PositionSharedMemory", "dispatcher", "family_of"]


@dataclass(frozen=True)
class Family:
    name: str
    dispatchers: Tuple[str, ...]
    backends: Tuple[str, ...]
    auto_cpu: Tuple[str, ...] = ("cpp", "torch")
    auto_cuda: Tuple[str, ...] = ("triton", "torch")
    export_backend: str = "torch"
    auto_order: Optional[Callable[..., Optional[Sequence[str]]]] = None
    limits: Tuple = ()
    tune_key: Optional[Callable[..., Optional[str]]] = None
    tune_variants: Optional[Callable[..., Sequence]] = None


# ---------------------------------------------------------------------------------------------
# per-family pieces the rows name
# ---------------------------------------------------------------------------------------------

def _gate_tune_key(x, g, params, **_options) -> Optional[str]:
    """train/eval: whether any BatchNorm normalises with batch statistics (not tuned with a SyncBatchNorm group).

    The gate's part of the autotune key (``medattn_fast.autotune``): a training-mode BatchNorm costs a
    statistics pass and its backward, which moved the CPU choice (on the project's 2-core CPU the
    torch composite won a training step at B=2, C=64, 128², the cpp kernels everything else; the
    measurement now decides per machine). None — never timed, the static order — when a BatchNorm
    synchronises its statistics over a process group: a timing run would issue collectives that the
    other ranks do not.
    """
    bns = [bn for bn in (params.bn_x, params.bn_g, params.bn_psi, params.bn_out) if bn is not None]
    if any(bn.process_group is not None for bn in bns):
        return None
    return "train" if any(bn.uses_batch_stats for bn in bns) else "eval"


def _position_backward_variants(backend, q, k, v, *, gamma, residual, multiply, **_options):
    """Triton: the separate and the fused backward (when the call has a backward, the user did not
    choose one, and deterministic algorithms are not required: the fused one adds dq with atomics)."""
    from ..kernel_config import explicitly_set

    if backend != "triton" or not torch.is_grad_enabled() or explicitly_set("position_backward") \
            or torch.are_deterministic_algorithms_enabled():
        return ()
    if not any(t is not None and t.requires_grad for t in (q, k, v, gamma, residual, multiply)):
        return ()
    return ((("position_backward", "separate"),), (("position_backward", "fused"),))


@dataclass(frozen=True)
class PositionSharedMemory:
    """The Triton position kernels' shared memory per program at the tiles a call would run: the
    default tiles for its dk, dv and dtype with the :class:`medattn_fast.KernelConfig` variants in
    force (16-bit P, dv split, hoisting, backward), bounded from above kernel by kernel
    (``triton_kernels.position.shared_memory_bound``, checked against the sm_90 compile table). Past
    the device's opt-in shared memory per block (232,448 B on an H100) the kernel would fail to
    launch (``OutOfResources``): ``auto`` takes another backend and a forced ``triton`` call says
    which kernel needs how much, before any launch. (The defaults fit at every dk <= 256 and dv; a
    variant such as ``position_dv_split=1024`` does not.)"""

    backend: str = "triton"

    def shared_memory_reasons(self, q: torch.Tensor, v: torch.Tensor, *, transpose: bool, backward: bool,
                              limit: Optional[int] = None, config=None) -> List[str]:
        """Why this call's kernels do not fit ([] when they do). ``limit``: opt-in shared memory per
        block in bytes (default: q's CUDA device's; a CPU tensor is left to the device check);
        ``config``: the KernelConfig (default: the one in force)."""
        if limit is None:
            if q.device.type != "cuda":
                return []
            props = torch.cuda.get_device_properties(q.device)
            limit = int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)
        from ..kernel_config import kernel_config
        from ._custom_op import triton_module

        kernels = triton_module("position")()
        from ..triton_kernels._util import dot_precision

        config = config or kernel_config()
        dk, dv = q.shape[-1], v.shape[-1]
        cfg = kernels._resolve(None, dk, dv, q.dtype, config.position_p16, config.position_dv_split,
                               config.position_hoist)
        needs = kernels.shared_memory_bound(cfg, dk, dv, q.dtype, transpose=transpose, backward=backward,
                                            variant=config.position_backward,
                                            precision=dot_precision(q.dtype, forced=config.fp32_precision))
        return [f"the Triton position kernel {name} needs up to {need} B of shared memory per program "
                f"(dk = {dk}, dv = {dv}, {q.dtype}, tiles {cfg.block_m}x{cfg.block_n}, dv block {cfg.block_dv}, "
                f"{cfg.num_stages} stages{', backward' if backward else ''}), over this device's {limit} B"
                for name, need in needs.items() if need > limit]

    def reasons(self, q, k, v, *, transpose=False, gamma=None, residual=None, multiply=None, **_options) -> List[str]:
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.dim() != 3 or v.dim() != 3:
            return []   # the backend's own checks name bad arguments
        tensors = [t for t in (q, k, v, gamma, residual, multiply) if isinstance(t, torch.Tensor)]
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if q.dtype == torch.float64 or q.shape[-1] > 256:
            return []   # refused by the dtype check and the dk Limit, with their own reasons
        return self.shared_memory_reasons(q, v, transpose=bool(transpose), backward=backward)

    def describe(self) -> str:
        return ("shared memory per program <= the device's opt-in (the position kernels' tiles with the "
                "KernelConfig variants in force, bounded from above)")


def _on_cuda(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cuda"


def _channel_gemm_variants(backend, x, *args, **_options):
    """torch on 16-bit CUDA inputs: float32 GEMMs on widened X and the cuBLAS path (16-bit GEMMs
    with float32 output), where the user did not choose (``channel_gemm``)."""
    from ..kernel_config import explicitly_set

    if backend != "torch" or not _on_cuda(x) or x.dtype not in (torch.float16, torch.bfloat16) \
            or explicitly_set("channel_gemm"):
        return ()
    return ((("channel_gemm", "float32"),), (("channel_gemm", "16bit"),))


def _gate_kernel_variants(backend, x, g, params, *, mode, **_options):
    """Triton: the tensor-core dot kernels and the per-channel loop kernels, where the dot kernels
    would run by default (C_int >= 16 and Cx <= 64) and the user did not choose (``gate_kernel``)."""
    from ..kernel_config import explicitly_set
    from ._custom_op import triton_module

    if backend != "triton" or explicitly_set("gate_kernel"):
        return ()
    if not triton_module("attention_gate")().uses_dot("auto", params.wx_weight.shape[0], _gate_pass_channels(
            x, g, params, mode=mode)):
        return ()
    return ((("gate_kernel", "dot"),), (("gate_kernel", "loop"),))


def _gate_pass_channels(x, g, params, *, mode, **_options) -> int:
    return params.wx_weight.shape[0] if mode == "grid" else x.shape[1]


def _axial_line(*args, **_kwargs) -> int:
    v = args[2]   # (q, k, v, shift) and (atten_x, atten_y, v, shift): v (B, H, W, D)
    return max(v.shape[1], v.shape[2])


_IN_REGISTERS = "the Triton {} kernels hold {} in registers"

FAMILIES: Tuple[Family, ...] = (
    Family("position", ("position_attention",), ("cpp", "triton"),
           # exporting runs the reference: one (B, Nq, Nk) softmax, no chunk loop whose count depends on N
           export_backend="reference", tune_variants=_position_backward_variants,
           limits=(B.Limit("triton", "dk", 256, "the Triton kernels hold dk in registers",
                           lambda q, k, v, **_: q.shape[2]), PositionSharedMemory())),
    Family("channel", ("channel_attention",), ("cpp", "triton"), tune_variants=_channel_gemm_variants),
    Family("gaussian_axial", ("gaussian_axial", "gaussian_axial_from_scores"), ("cpp", "triton"),
           limits=(B.Limit("triton", "H and W", 128, "the Triton kernels hold a whole row/column in one program",
                           _axial_line),)),
    Family("window", ("window_attention",), ("triton",), auto_cpu=("torch",),
           limits=(B.Limit("triton", "head dim", 128, _IN_REGISTERS.format("window", "a head"),
                           lambda x, query_weight, *a, num_heads, **_: query_weight.shape[0] // num_heads),
                   B.Limit("triton", "window_size", 8, _IN_REGISTERS.format("window", "a window"),
                           lambda *a, window_size, **_: window_size),
                   B.Limit("triton", "batch", 65535, "the Triton window kernels put the batch on a grid axis",
                           lambda x, *a, **_: x.shape[0]))),
    Family("external", ("external_attention",), ("triton",), auto_cpu=("torch",),
           limits=(B.Limit("triton", "head dim", 128, _IN_REGISTERS.format("external", "a head's memories"),
                           lambda x, qw, qb, key_memory, *a, **_: key_memory.shape[1]),
                   B.Limit("triton", "memory slots", 128, _IN_REGISTERS.format("external", "a head's memories"),
                           lambda x, qw, qb, key_memory, *a, **_: key_memory.shape[0]),
                   B.Limit("triton", "B·heads", 65535, "the Triton external kernels put batch·heads on a grid axis",
                           lambda x, *a, num_heads, **_: x.shape[0] * num_heads))),
    Family("attention_gate", ("attention_gate",), ("cpp", "cuda", "triton"),
           auto_cuda=("triton", "cuda", "torch"), tune_key=_gate_tune_key, tune_variants=_gate_kernel_variants,
           limits=(B.Limit("triton", "channels of the gate pass (Cx; C_int in grid mode)", 1024,
                           "the Triton gate holds a tile of every channel in registers", _gate_pass_channels),)),
           # the cuda gate has no width limit: csrc/cuda/attention_gate.cu streams W through a few KB
           # of shared memory per block whatever Cx, C_int and Co (tests/test_attention_gate_cuda.py)
)


def family_of(name: str) -> Family:
    """The row of the family that defines dispatcher ``name``."""
    for family in FAMILIES:
        if name in family.dispatchers:
            return family
    raise KeyError(f"no op family defines the dispatcher {name!r}")


def dispatcher(name: str) -> B.Op:
    """The dispatcher ``name``, configured by its family's row (created on first use)."""
    family = family_of(name)
    return B.op(name, family=family.name, auto_cpu=family.auto_cpu, auto_cuda=family.auto_cuda,
                export_backend=family.export_backend, auto_order=family.auto_order, limits=family.limits,
                tune_key=family.tune_key, tune_variants=family.tune_variants)

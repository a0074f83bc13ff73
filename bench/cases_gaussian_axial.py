"""Benchmark cases of Gaussian-weighted axial attention (MT-UNet GaussianTrans).

* The issue's acceptance row: ``GaussianTrans`` at B=2 on a 14×14 grid with D=512, fwd+bwd,
  through ``medattn_fast.compat.mtunet.GaussianTrans`` (auto backend). Target: auto/cpp fwd+bwd
  ≥ 75× faster than the original's per-pixel loop and faster than ``torch.compile`` of the
  vectorised PyTorch version.
* MT-UNet's own grid at a 224² input: after WinAttention (window 4) and DlightConv the 28×28 tokens
  of the first transformer stage become a 7×7 grid with D=256 (B=1: also the cheap smoke row).
* The fused from-q,k,v entry point (scores never stored) at 14×14, D=512 and at 28×28, D=256.

* MT-UNet's real shapes at 224² and B=12 (CUDA only): the window-token grids 28², 14², 7² with
  C = 256, 512, 1024 reach GaussianTrans as 7×7 (D=256), 4×4 (D=512) and 2×2 (D=1024) grids
  (WinAttention pads to a multiple of 4, DlightConv pools each 4×4 window to one token); the last
  decoder stage gives 7×7 with D=512. Each as GaussianTrans (from scores) and from q, k, v.

Providers: ``reference`` (the seed loop: ``reference.gaussian_trans.GaussianTrans`` /
``gaussian_axial_from_qkv_reference``), ``torch`` (the vectorised backend), ``compile``
(``torch.compile`` of the vectorised backend), ``cpp`` (the fused C++ kernels), ``triton`` (the
fused Triton kernels, forced: an "unavailable" row on CPU unless ``TRITON_INTERPRET=1``), ``auto``
(the compat module / the functional on the default backend). All share one ``shift``/``bias`` pair.
From q, k, v also ``flex``: ``torch.compile(flex_attention)`` as a user would write the op with it —
row attention over the B·H rows (sequences of W pixels) plus column attention over the B·W
columns (sequences of H pixels), each with ``scale=1.0`` and a ``score_mod`` subtracting
θ(kv_idx − q_idx)², summed (on CPU flex has no backward: only its ``no-grad`` rows run there, the
others are unavailable rows saying so). (flex cannot take GaussianTrans's precomputed score maps except by
indexing them inside ``score_mod``, which is not how anyone would call it, so the from-scores
cases have no ``flex`` row.)

``gpu_check_cases(device, tiny)`` (``bench/gpu_check.sh``): GaussianTrans at MT-UNet's real grids
(B=12: 7×7 D=256, 4×4 D=512, 2×2 D=1024), float32, the drop-in on ``triton`` vs the original
per-pixel loop and vs the vectorised ``torch`` backend (``tiny``: B=2 2×2 D=16, the CPU dry run).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

import medattn_fast.functional as MF
from medattn_fast import BackendUnavailable
from bench.harness import Case, auto_provider, fast_twin, owned_by, with_backend
from medattn_fast.compat.mtunet import GaussianTrans as FastGaussianTrans
from medattn_fast.reference.gaussian_trans import GaussianTrans, gaussian_axial_from_qkv_reference


def _flops(batch: int, h: int, w: int, d: int, from_qkv: bool) -> float:
    """Forward FLOPs: P·V along rows and columns (+ the q·k scores), plus ~5 per softmax entry."""
    pairs = batch * h * w * (h + w)  # (pixel, key) pairs over both axes
    return pairs * (2.0 * d + 5.0) + (pairs * 2.0 * d if from_qkv else 0.0)


def _setup_scores(batch: int, h: int, w: int, d: int):
    def setup(device: torch.device, dtype: torch.dtype):
        ref = GaussianTrans().to(device=device, dtype=dtype)
        fast = FastGaussianTrans().to(device=device, dtype=dtype)
        fast.shift, fast.bias = ref.shift, ref.bias  # one set of parameters

        grid = torch.randn(batch, h, w, 1, device=device, dtype=dtype)  # x: only its shape is used
        atten_x = torch.randn(batch, h, w, w, device=device, dtype=dtype, requires_grad=True)
        atten_y = torch.randn(batch, w, h, h, device=device, dtype=dtype, requires_grad=True)
        value = torch.randn(batch, h, w, d, device=device, dtype=dtype, requires_grad=True)

        def vectorised(ax, ay, v):
            return MF.gaussian_axial_from_scores(ax, ay, v, ref.shift, bias=ref.bias, backend="torch")

        compiled = torch.compile(vectorised)
        providers: Dict[str, Callable] = {
            "reference": lambda ax, ay, v: ref((grid, ax, ay, v)),
            "torch": vectorised,
            "compile": compiled,
            "cpp": lambda ax, ay, v: MF.gaussian_axial_from_scores(ax, ay, v, ref.shift, bias=ref.bias,
                                                                   backend="cpp"),
            "triton": lambda ax, ay, v: MF.gaussian_axial_from_scores(ax, ay, v, ref.shift, bias=ref.bias,
                                                                      backend="triton"),
            "auto": lambda ax, ay, v: fast((grid, ax, ay, v)),
        }
        return (atten_x, atten_y, value), providers

    return setup


def _flex_provider(shift: torch.Tensor) -> Callable:
    """The op with ``torch.compile(flex_attention)``: rows and columns as two batches of sequences."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)

    def gaussian_penalty(score, b, h, q_idx, kv_idx):
        dist = (kv_idx - q_idx).to(score.dtype)
        return score - shift.reshape(()).to(score.dtype) * dist * dist

    def run(q, k, v):
        if torch.is_grad_enabled() and q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
            raise BackendUnavailable("flex: FlexAttention has no backward on CPU (torch "
                                     f"{torch.__version__}); only its no-grad rows run here")
        if not torch.is_grad_enabled():
            # flex refuses inputs that require grad on CPU (no CPU backward), even under no_grad
            q, k, v = q.detach(), k.detach(), v.detach()
        batch, h, w, d = q.shape
        rows = [t.reshape(batch * h, 1, w, d) for t in (q, k, v)]                      # (B·H, 1, W, D)
        cols = [t.transpose(1, 2).reshape(batch * w, 1, h, d) for t in (q, k, v)]      # (B·W, 1, H, D)
        along_rows = flex(*rows, score_mod=gaussian_penalty, scale=1.0).reshape(batch, h, w, d)
        along_cols = flex(*cols, score_mod=gaussian_penalty, scale=1.0).reshape(batch, w, h, d)
        return along_rows + along_cols.transpose(1, 2)

    return run


def _setup_qkv(batch: int, h: int, w: int, d: int):
    def setup(device: torch.device, dtype: torch.dtype):
        shift = torch.nn.Parameter(torch.randn(1, device=device, dtype=dtype).abs())
        # Scores of unit-variance q, k grow like √D; scale them as a trained block would.
        q = (torch.randn(batch, h, w, d, device=device, dtype=dtype) / d ** 0.5).requires_grad_()
        k = torch.randn(batch, h, w, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(batch, h, w, d, device=device, dtype=dtype, requires_grad=True)

        def vectorised(q, k, v):
            return MF.gaussian_axial_attention(q, k, v, shift, backend="torch")

        providers: Dict[str, Callable] = {
            "reference": lambda q, k, v: gaussian_axial_from_qkv_reference(q, k, v, shift),
            "torch": vectorised,
            "compile": torch.compile(vectorised),
            "cpp": lambda q, k, v: MF.gaussian_axial_attention(q, k, v, shift, backend="cpp"),
            "triton": lambda q, k, v: MF.gaussian_axial_attention(q, k, v, shift, backend="triton"),
            "flex": _flex_provider(shift),
            "auto": lambda q, k, v: MF.gaussian_axial_attention(q, k, v, shift),
        }
        return (q, k, v), providers

    return setup


def cases(device: torch.device) -> List[Case]:
    dtypes = (torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16)
    return [
        Case(op="gaussian_axial", shape="GaussianTrans B=2 14x14 D=512", setup=_setup_scores(2, 14, 14, 512),
             flops=_flops(2, 14, 14, 512, from_qkv=False), dtypes=dtypes,
             note="acceptance: compat.mtunet.GaussianTrans (auto) fwd+bwd >= 75x the original loop, "
                  "and faster than torch.compile of the vectorised version"),
        Case(op="gaussian_axial", shape="GaussianTrans B=1 7x7 D=256", setup=_setup_scores(1, 7, 7, 256),
             flops=_flops(1, 7, 7, 256, from_qkv=False), dtypes=dtypes,
             note="MT-UNet at 224x224, first transformer stage"),
        Case(op="gaussian_axial", shape="qkv B=2 14x14 D=512", setup=_setup_qkv(2, 14, 14, 512),
             flops=_flops(2, 14, 14, 512, from_qkv=True), dtypes=dtypes),
        Case(op="gaussian_axial", shape="qkv B=2 28x28 D=256", setup=_setup_qkv(2, 28, 28, 256),
             flops=_flops(2, 28, 28, 256, from_qkv=True), dtypes=dtypes),
        *_mtunet_cases(),
    ]


# MT-UNet at 224², B=12: (window-token grid, channels) -> the grid GaussianTrans sees, D = channels.
MTUNET_BATCH = 12
MTUNET_LEVELS = [
    ("encoder 28² C=256", 7, 256),
    ("encoder 14² C=512", 4, 512),
    ("bottleneck 7² C=1024", 2, 1024),
    ("decoder 28² C=512", 7, 512),
]


def _mtunet_cases() -> List[Case]:
    rows = []
    for level, grid, d in MTUNET_LEVELS:
        for name, setup, from_qkv in (("GaussianTrans", _setup_scores, False), ("qkv", _setup_qkv, True)):
            rows.append(Case(op="gaussian_axial", shape=f"{name} B={MTUNET_BATCH} {grid}x{grid} D={d}",
                             setup=setup(MTUNET_BATCH, grid, grid, d),
                             flops=_flops(MTUNET_BATCH, grid, grid, d, from_qkv=from_qkv),
                             dtypes=(torch.float32, torch.bfloat16), devices=("cuda",),
                             note=f"MT-UNet 224² B={MTUNET_BATCH}, {level}"))
    return rows


def _noting(fn: Callable, auto: Callable) -> Callable:
    """``fn`` with ``auto``'s row note (which backend auto ran), for a wrapper around an auto provider."""
    fn.row_note = auto.row_note
    return fn


def _check_setup(batch: int, grid: int, d: int):
    def setup(device: torch.device, dtype: torch.dtype):
        original = GaussianTrans().to(device=device, dtype=dtype)
        twin = fast_twin(original)
        fast = with_backend(twin, "triton")
        auto = auto_provider(twin)
        x = torch.randn(batch, grid, grid, 1, device=device, dtype=dtype)   # only its shape is read
        ax = torch.randn(batch, grid, grid, grid, device=device, dtype=dtype, requires_grad=True)
        ay = torch.randn(batch, grid, grid, grid, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(batch, grid, grid, d, device=device, dtype=dtype, requires_grad=True)

        def vectorised(ax, ay, v):
            return MF.gaussian_axial_from_scores(ax, ay, v, original.shift, bias=original.bias, backend="torch")

        providers: Dict[str, Callable] = {
            "triton": owned_by(lambda ax, ay, v: fast((x, ax, ay, v)), fast.__self__),
            "auto": _noting(owned_by(lambda ax, ay, v: auto((x, ax, ay, v)), twin), auto),
            "torch vectorised": owned_by(vectorised, original),
            "original loop": owned_by(lambda ax, ay, v: original((x, ax, ay, v)), original),
        }
        return (ax, ay, v), providers
    return setup


def gpu_check_cases(device: torch.device, tiny: bool = False) -> List[Case]:
    """The GPU check's GaussianTrans rows (``tiny``: toy shapes for the CPU dry run)."""
    shapes = [(2, 2, 16)] if tiny else [(12, 7, 256), (12, 4, 512), (12, 2, 1024)]   # (B, grid, D)
    return [Case(op="gaussian_axial", shape=f"GaussianTrans B={batch} {grid}x{grid} D={d}",
                 setup=_check_setup(batch, grid, d), flops=batch * grid * grid * 2 * grid * (2.0 * d + 5),
                 dtypes=(torch.float32,), modes=("no-grad", "fwd+bwd"), estimate_s=3 if tiny else 15,
                 warm=("triton",))
            for batch, grid, d in shapes]

r"""The headline GPU timings of medattn-fast, one row at a time, for ``bench/gpu_check.sh``.

Self-contained (torch, triton and the package only), so that one device call can run it on a bare
GPU machine. Every row is appended to a CSV and flushed the moment it is measured: a kill loses
nothing already measured. Rows run in priority order against a wall-clock deadline; a case that no
longer fits is written as a ``skipped`` row saying so.

What is timed (B, C, grids: the real networks'):

* ceilings, measured in the same call: a 1 GiB device-to-device copy (GB/s, bytes read + written)
  and 8192³ matrix products in bf16, fp32 (``highest``: no TF32) and TF32;
* DANet PAM, B=8 C=512 at 64² and 128², bf16 and fp32, fwd and fwd+bwd: the fused ``triton``
  backend (with its precision/variant switches side by side), SDPA (memory-efficient backend:
  dk ≠ dv), the original module (``reference.danet.PAM_Module``), peak memory of each;
  FlexAttention last, only if time is left;
* DANet CAM, B=8 C=512 64², vs the original ``CAM_Module``;
* the Attention U-Net gate, 2-D B=8 C=64 224² eval (GB/s against the copy ceiling) and 3-D
  B=2 C=32 64³ train, fused backends vs the original ``AttentionBlock``;
* MT-UNet's GaussianTrans at its real grids (B=12: 7×7 D=256, 4×4 D=512, 2×2 D=1024), the drop-in vs
  the original per-pixel loop and vs the vectorised ``torch`` backend;
* MT-UNet window and external attention at its B=12 levels, vs the originals;
* one MT-UNet training step, B=12 224², the drop-in (``compat.mtunet.MTUNet``) vs the original.

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed between reps, median) after one
untimed call that compiles; a case slower than 50 ms per call is timed with CUDA events over a few
reps instead (do_bench would spend seconds estimating it). Inputs are ``torch.randn``, never zeros.
``--tiny`` (the CPU dry run of the test suite): the same code at toy shapes on the CPU, Triton
interpreted, host-clock medians of two reps; its figures mean nothing.

Usage: ``python -m bench.gpu_headline --out rows.csv [--deadline EPOCH] [--tiny] [--warm]``;
``--warm`` only runs each fused provider once (fills Triton's cache in the background) and writes
no rows.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

FIELDS = ["section", "case", "provider", "dtype", "mode", "ms", "tflops", "gbps", "pct_ceiling", "peak_mib",
          "status", "note"]
SLOW_MS = 50.0


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, tiny: bool) -> float:
    """Median milliseconds of ``fn()`` after one untimed (compiling) call."""
    if device.type != "cuda":
        fn()
        samples = []
        for _ in range(1 if tiny else 3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    fn()
    _sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    _sync(device)
    first = start.elapsed_time(end)
    if first < SLOW_MS:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    samples = []
    for _ in range(3 if first < 1000 else 1):
        start.record()
        fn()
        end.record()
        _sync(device)
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def peak_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak device memory of one call above what was allocated before it (MiB); CPU: None."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def forward_only(fn: Callable, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn(*inputs)
    return run


def forward_backward(fn: Callable, inputs: Sequence[torch.Tensor], modules: Sequence[torch.nn.Module] = ()
                     ) -> Callable[[], object]:
    """fwd + bwd against a fixed random cotangent; gradients freed after each call (no accumulation)."""
    state: Dict[str, torch.Tensor] = {}
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        out = fn(*inputs)
        if "cot" not in state:
            state["cot"] = torch.randn_like(out)
        out.backward(state["cot"])
        for t in leaves:
            t.grad = None
        for m in modules:
            m.zero_grad(set_to_none=True)
    return run


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
class Recorder:
    """Appends rows to the CSV, flushed and fsynced one by one, and echoes them to stdout."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.rows: List[Dict[str, object]] = []
        if path:
            new = not os.path.exists(path) or os.path.getsize(path) == 0
            self._file = open(path, "a", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=FIELDS)
            if new:
                self._writer.writeheader()
                self._file.flush()
        else:
            self._file = self._writer = None

    def row(self, **values) -> None:
        row = {k: values.get(k, "") for k in FIELDS}
        for k in ("ms", "tflops", "gbps", "pct_ceiling", "peak_mib"):
            if isinstance(row[k], float):
                row[k] = f"{row[k]:.4g}"
        self.rows.append(row)
        if self._writer is not None:
            self._writer.writerow(row)
            self._file.flush()
            os.fsync(self._file.fileno())
        print(" | ".join(str(row[k]) for k in FIELDS if row[k] != ""), flush=True)


@dataclass
class Ceilings:
    copy_gbps: float = float("nan")
    matmul_tflops: Dict[str, float] = field(default_factory=dict)   # "bfloat16", "float32", "tf32"

    def matmul_for(self, dtype: torch.dtype) -> float:
        if dtype in (torch.bfloat16, torch.float16):
            return self.matmul_tflops.get("bfloat16", float("nan"))
        return self.matmul_tflops.get("tf32", float("nan"))


@dataclass
class Case:
    """One shape of one op: ``build(dtype)`` returns (inputs, {provider: fn}, modules) or raises."""

    section: str
    case: str
    build: Callable[[torch.dtype], Tuple[Sequence[torch.Tensor], Dict[str, Callable], Sequence[torch.nn.Module]]]
    dtypes: Sequence[torch.dtype]
    modes: Sequence[str]
    flops: Optional[Callable[[str], float]] = None          # mode -> FLOPs
    bytes_moved: Optional[Callable[[torch.dtype], float]] = None
    estimate_s: float = 5.0                                   # wall time the case needs, to decide if it fits
    fused: Sequence[str] = ("triton",)                        # providers warmed by --warm
    note: str = ""
    timed_in_dry_run: bool = True                             # False: the dry run only builds it


class Runner:
    def __init__(self, device: torch.device, recorder: Recorder, deadline: float, tiny: bool):
        self.device, self.rec, self.deadline, self.tiny = device, recorder, deadline, tiny
        self.ceilings = Ceilings()

    def left(self) -> float:
        return self.deadline - time.time()

    # -- ceilings ---------------------------------------------------------------------------------
    def measure_ceilings(self) -> None:
        dev = self.device
        n_copy = 2 ** 12 if self.tiny else 2 ** 28              # 1 GiB of float32, far over L2
        src = torch.randn(n_copy, device=dev)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), dev, self.tiny)
        self.ceilings.copy_gbps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
        self.rec.row(section="ceiling", case=f"copy {n_copy * 4 / 2**20:.0f} MiB", provider="torch",
                     dtype="float32", mode="copy", ms=ms, gbps=self.ceilings.copy_gbps, status="ok",
                     note="bytes read + written")
        del src, dst
        m = 64 if self.tiny else 8192
        for name, dtype, tf32 in (("bfloat16", torch.bfloat16, False), ("float32", torch.float32, False),
                                  ("tf32", torch.float32, True)):
            a = torch.randn(m, m, device=dev, dtype=dtype)
            b = torch.randn(m, m, device=dev, dtype=dtype)
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                ms = time_ms(lambda: a @ b, dev, self.tiny)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
            self.ceilings.matmul_tflops[name] = 2 * m ** 3 / (ms * 1e-3) / 1e12
            self.rec.row(section="ceiling", case=f"matmul {m}^3", provider="torch", dtype=name, mode="mm", ms=ms,
                         tflops=self.ceilings.matmul_tflops[name], status="ok")
            del a, b

    # -- one case ---------------------------------------------------------------------------------
    def run_case(self, case: Case, warm: bool = False) -> None:
        """Time every provider of ``case`` in each dtype and mode; ``warm``: only call the fused
        providers (names starting with one of ``case.fused``) once, to compile them."""
        dtypes, modes = case.dtypes, case.modes
        if self.tiny:   # the dry run exercises every path once: one dtype (PAM: both), the last mode
            dtypes = dtypes if case.section == "position" else dtypes[-1:]
            modes = modes[-1:]
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            if self.left() < case.estimate_s:
                if not warm:
                    self.rec.row(section=case.section, case=case.case, dtype=dname, status="skipped",
                                 note=f"did not fit: {self.left():.0f} s left, needs ~{case.estimate_s:.0f} s")
                continue
            try:
                inputs, providers, modules = case.build(dtype)
            except Exception as exc:  # noqa: BLE001 - a row per failure, the run goes on
                if not warm:
                    self.rec.row(section=case.section, case=case.case, dtype=dname, status="error",
                                 note=_describe(exc))
                continue
            if self.tiny and not case.timed_in_dry_run:
                if not warm:
                    self.rec.row(section=case.section, case=case.case, dtype=dname, status="skipped",
                                 note="dry run: built, not timed (too slow on the CPU)")
                continue
            for name, fn in providers.items():
                if warm and not any(name.startswith(prefix) for prefix in case.fused):
                    continue
                for mode in modes:
                    if self.left() < 1.0 and not warm:
                        self.rec.row(section=case.section, case=case.case, provider=name, dtype=dname, mode=mode,
                                     status="skipped", note="did not fit: deadline reached")
                        continue
                    call = forward_only(fn, inputs) if mode == "fwd" else forward_backward(fn, inputs, modules)
                    try:
                        if warm:
                            call()
                            _sync(self.device)
                            continue
                        ms = time_ms(call, self.device, self.tiny)
                        peak = peak_mib(call, self.device)
                    except Exception as exc:  # noqa: BLE001 - OOM, unavailable backend, compile error
                        if not warm:
                            self.rec.row(section=case.section, case=case.case, provider=name, dtype=dname,
                                         mode=mode, status="error", note=_describe(exc))
                        _free(self.device)
                        continue
                    flops = case.flops(mode) if case.flops else None
                    tflops = flops / (ms * 1e-3) / 1e12 if flops else None
                    moved = case.bytes_moved(dtype) if (case.bytes_moved and mode == "fwd") else None
                    gbps = moved / (ms * 1e-3) / 1e9 if moved else None
                    pct = None
                    if gbps is not None:
                        pct = 100 * gbps / self.ceilings.copy_gbps
                    elif tflops is not None:
                        pct = 100 * tflops / self.ceilings.matmul_for(dtype)
                    self.rec.row(section=case.section, case=case.case, provider=name, dtype=dname, mode=mode,
                                 ms=ms, tflops=tflops if tflops is not None else "",
                                 gbps=gbps if gbps is not None else "",
                                 pct_ceiling=pct if pct is not None and math.isfinite(pct) else "",
                                 peak_mib=peak if peak is not None else "", status="ok", note=case.note)
            del inputs, providers, modules
            _free(self.device)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _env(**values: str):
    """Environment switches of the fused kernels (read at launch), restored afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _with_env(fn: Callable, **values: str) -> Callable:
    def run(*args):
        with _env(**values):
            return fn(*args)
    return run


def _fast_twin(original: torch.nn.Module) -> torch.nn.Module:
    """The package's drop-in for an original block, with the same parameters (``convert``)."""
    from medattn_fast.convert import convert

    holder = torch.nn.Sequential(copy.deepcopy(original))
    report = convert(holder)
    if not report.swapped:
        raise RuntimeError(f"convert() swapped nothing in {type(original).__name__}: {report.skipped}")
    return holder[0]


def _on(module: torch.nn.Module, backend: Optional[str]) -> Callable:
    import medattn_fast

    def run(*args):
        with medattn_fast.use_backend(backend):
            return module(*args)
    return run


class Shapes:
    """The real networks' shapes, or toy ones for the CPU dry run."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.pam = [(1, 16, 8)] if tiny else [(8, 512, 64), (8, 512, 128)]        # (B, C, side)
        self.cam = (1, 16, 8) if tiny else (8, 512, 64)
        self.gate2d = (1, 8, (16, 16)) if tiny else (8, 64, (224, 224))            # (B, Cx, spatial)
        self.gate3d = (1, 4, (8, 8, 8)) if tiny else (2, 32, (64, 64, 64))
        self.gaussian = [(2, 2, 16)] if tiny else [(12, 7, 256), (12, 4, 512), (12, 2, 1024)]  # (B, grid, D)
        self.window = [(1, 4, 16)] if tiny else [(12, 28, 256), (12, 14, 512), (12, 7, 1024)]  # (B, side, C)
        self.external = [(1, 4, 16)] if tiny else [(12, 784, 256), (12, 196, 512), (12, 49, 1024)]  # (B, N, C)
        self.mtunet = (1, 224) if tiny else (12, 224)


def _fused_backend(tiny: bool) -> Optional[str]:
    """``triton`` forced (also in the dry run, interpreted); None would be ``auto``."""
    return "triton"


def pam_cases(device: torch.device, shapes: Shapes, with_flex: bool) -> List[Case]:
    from medattn_fast.reference.danet import PAM_Module

    out = []
    for batch, channels, side in shapes.pam:
        n = side * side
        dk = channels // 8

        def flops(mode, n=n, batch=batch, channels=channels, dk=dk):
            fwd = batch * (2.0 * n * channels * (2 * dk + channels) + 2.0 * n * n * (dk + channels))
            return fwd if mode == "fwd" else 3.5 * fwd   # backward: ~2.5x the forward's matmul work

        def build(dtype, batch=batch, channels=channels, side=side):
            torch.manual_seed(0)
            original = PAM_Module(channels).to(device=device, dtype=dtype)
            with torch.no_grad():
                original.gamma.fill_(0.5)
            fast = _fast_twin(original)
            x = torch.randn(batch, channels, side, side, device=device, dtype=dtype, requires_grad=True)
            providers: Dict[str, Callable] = {}
            if not with_flex:
                providers["triton"] = _on(fast, "triton")
                if dtype == torch.float32:
                    providers["triton ieee"] = _with_env(_on(fast, "triton"), MEDATTN_FP32_PRECISION="ieee")
                    providers["triton tf32"] = _with_env(_on(fast, "triton"), MEDATTN_FP32_PRECISION="tf32")
                else:
                    providers["triton p16"] = _with_env(_on(fast, "triton"), MEDATTN_POSITION_P16="1")
                providers["triton dq+dk fused"] = _with_env(_on(fast, "triton"), MEDATTN_POSITION_BWD="fused")
                providers["sdpa"] = _sdpa_pam(original)
                providers["original"] = original
            else:
                providers["flex"] = _flex_pam(original)
            return (x,), providers, (original, fast)

        out.append(Case("position", f"PAM B={batch} C={channels} {side}x{side}" + (" flex" if with_flex else ""),
                        build, dtypes=(torch.bfloat16, torch.float32), modes=("fwd", "fwd+bwd"), flops=flops,
                        estimate_s=2 if shapes.tiny else (40 if side >= 128 else 20),
                        fused=("triton",) if not with_flex else (),
                        note="flops: 1x1 projections + QK^T + PV (fwd); 3.5x for fwd+bwd"))
    return out


def _pam_projections(module, x):
    b, c, h, w = x.shape
    q = module.query_conv(x).flatten(2).transpose(1, 2).unsqueeze(1)   # (B, 1, N, dk)
    k = module.key_conv(x).flatten(2).transpose(1, 2).unsqueeze(1)
    v = module.value_conv(x).flatten(2).transpose(1, 2).unsqueeze(1)   # (B, 1, N, C)
    return q, k, v


def _sdpa_pam(module):
    """γ · SDPA(q, k, v, scale=1) + x through the memory-efficient backend (dk ≠ dv)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(x):
        q, k, v = _pam_projections(module, x)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            o = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return module.gamma * o.squeeze(1).transpose(1, 2).reshape(x.shape) + x
    return run


def _flex_pam(module):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)

    def run(x):
        q, k, v = _pam_projections(module, x)
        o = compiled(q, k, v, scale=1.0)
        return module.gamma * o.squeeze(1).transpose(1, 2).reshape(x.shape) + x
    return run


def cam_cases(device: torch.device, shapes: Shapes) -> List[Case]:
    from medattn_fast.reference.danet import CAM_Module

    batch, channels, side = shapes.cam
    n = side * side

    def build(dtype):
        original = CAM_Module(channels).to(device=device, dtype=dtype)
        with torch.no_grad():
            original.gamma.fill_(0.5)
        fast = _fast_twin(original)
        # scaled so that softmax(-E) is not one-hot in float32
        x = (0.1 * torch.randn(batch, channels, side, side, device=device, dtype=dtype)).requires_grad_(True)
        return (x,), {"triton": _on(fast, "triton"), "original": original}, (original, fast)

    return [Case("channel", f"CAM B={batch} C={channels} {side}x{side}", build,
                 dtypes=(torch.bfloat16, torch.float32), modes=("fwd", "fwd+bwd"),
                 flops=lambda mode: batch * 4.0 * channels * channels * n * (1 if mode == "fwd" else 3),
                 estimate_s=2 if shapes.tiny else 10)]


def gate_cases(device: torch.device, shapes: Shapes) -> List[Case]:
    from medattn_fast.reference.attention_gate import AttentionBlock

    out = []
    for (batch, cx, size), training in ((shapes.gate2d, False), (shapes.gate3d, True)):
        nd = len(size)
        cg, cint = 2 * cx, cx // 2
        voxels = batch * math.prod(size)

        def build(dtype, batch=batch, cx=cx, size=size, training=training, nd=nd, cg=cg, cint=cint):
            original = AttentionBlock(cx, cg, cint, spatial_dims=nd).to(device=device, dtype=dtype)
            with torch.no_grad():   # a trained-looking BatchNorm state, so that eval folding does real work
                for m in original.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.normal_(0.0, 0.1)
                        m.running_mean.normal_(0.0, 0.1)
                        m.running_var.uniform_(0.5, 1.5)
            original.train(training)
            fast = _fast_twin(original).train(training)
            x = torch.randn(batch, cx, *size, device=device, dtype=dtype, requires_grad=training)
            g = torch.randn(batch, cg, *(s // 2 for s in size), device=device, dtype=dtype, requires_grad=training)
            providers = {"triton": _on(fast, "triton")}
            if device.type == "cuda":
                providers["cuda"] = _on(fast, "cuda")
            providers["original"] = original
            return (x, g), providers, (original, fast)

        def moved(dtype, cx=cx, voxels=voxels):   # eval: x read once + out written once
            return 2.0 * voxels * cx * torch.finfo(dtype).bits / 8

        out.append(Case("attention_gate", f"gate {nd}-D B={batch} C={cx} {'x'.join(map(str, size))} "
                        f"{'train' if training else 'eval'}", build,
                        dtypes=(torch.bfloat16, torch.float32), modes=("fwd+bwd",) if training else ("fwd",),
                        bytes_moved=None if training else moved, estimate_s=2 if shapes.tiny else 10,
                        fused=("triton",),   # the cuda build runs beside the warm-up, under its own lock
                        note="" if training else "GB/s: x read + out written once; % of the copy ceiling"))
    return out


def gaussian_cases(device: torch.device, shapes: Shapes) -> List[Case]:
    from medattn_fast.reference.gaussian_trans import GaussianTrans

    out = []
    for batch, grid, d in shapes.gaussian:
        def build(dtype, batch=batch, grid=grid, d=d):
            import medattn_fast.functional as MF

            original = GaussianTrans().to(device=device, dtype=dtype)
            fast = _fast_twin(original)
            x = torch.randn(batch, grid, grid, 1, device=device, dtype=dtype)   # only its shape is read
            ax = torch.randn(batch, grid, grid, grid, device=device, dtype=dtype, requires_grad=True)
            ay = torch.randn(batch, grid, grid, grid, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(batch, grid, grid, d, device=device, dtype=dtype, requires_grad=True)

            def vectorised(ax, ay, v):
                return MF.gaussian_axial_from_scores(ax, ay, v, original.shift, bias=original.bias, backend="torch")

            providers = {
                "triton": lambda ax, ay, v: _on(fast, "triton")((x, ax, ay, v)),
                "torch vectorised": vectorised,
                "original loop": lambda ax, ay, v: original((x, ax, ay, v)),
            }
            return (ax, ay, v), providers, (original, fast)

        out.append(Case("gaussian_axial", f"GaussianTrans B={batch} {grid}x{grid} D={d}", build,
                        dtypes=(torch.float32,), modes=("fwd", "fwd+bwd"),
                        flops=lambda mode, b=batch, g=grid, d=d:
                            b * g * g * 2 * g * (2.0 * d + 5) * (1 if mode == "fwd" else 3),
                        estimate_s=3 if shapes.tiny else 15))
    return out


def _token_block_case(device: torch.device, section: str, label: str, make_original: Callable[[int], torch.nn.Module],
                      batch: int, tokens: int, channels: int, tiny: bool, forward_flops: float) -> Case:
    """An MT-UNet token block ((B, N, C) -> (B, N, C)): its drop-in on ``triton`` vs the original."""
    def build(dtype):
        original = make_original(channels).to(device=device, dtype=dtype)
        fast = _fast_twin(original)
        x = torch.randn(batch, tokens, channels, device=device, dtype=dtype, requires_grad=True)
        return (x,), {"triton": _on(fast, "triton"), "original": original}, (original, fast)

    return Case(section, label, build, dtypes=(torch.bfloat16, torch.float32), modes=("fwd", "fwd+bwd"),
                flops=lambda mode: forward_flops * (1 if mode == "fwd" else 3), estimate_s=2 if tiny else 8,
                note="flops: projections + attention products (fwd); 3x for fwd+bwd")


def window_cases(device: torch.device, shapes: Shapes) -> List[Case]:
    from medattn_fast.reference.mtunet import WinAttention

    def flops(b, side, c, window=4):   # q/k/v and output projections, q·kᵀ and p·v in each 16-token window
        tokens = b * (-(-side // window) * window) ** 2
        return tokens * (8.0 * c * c + 4.0 * window * window * c)

    return [_token_block_case(device, "window", f"window B={b} {side}x{side} C={c} ws=4 h=8",
                              lambda c: WinAttention({"win_size": 4, "head": 8}, c), b, side * side, c, shapes.tiny,
                              flops(b, side, c))
            for b, side, c in shapes.window]


def external_cases(device: torch.device, shapes: Shapes) -> List[Case]:
    from medattn_fast.reference.mtunet import MTUNET_CONFIGS, MEAttention

    def flops(b, n, c, slots=64, inner_per_channel=4):   # MEAttention: in/out Linear, x·M_kᵀ, a·M_vᵀ
        inner = inner_per_channel * c
        return 2.0 * b * n * (c * inner + 2 * inner * slots + inner * c)

    return [_token_block_case(device, "external", f"external B={b} N={n} C={c}",
                              lambda c: MEAttention(c, MTUNET_CONFIGS), b, n, c, shapes.tiny, flops(b, n, c))
            for b, n, c in shapes.external]


def mtunet_cases(device: torch.device, shapes: Shapes) -> List[Case]:
    from medattn_fast.compat.mtunet import MTUNet as CompatMTUNet
    from medattn_fast.reference.mtunet import MTUNet

    batch, side = shapes.mtunet

    def build(dtype):
        torch.manual_seed(0)
        original = MTUNet(9).to(device=device, dtype=dtype).train()
        with torch.no_grad():   # the original initialises it to zeros: give it content
            original.stem.position_embedding.normal_(0.0, 0.02)
        fast = CompatMTUNet.from_original(original).train()
        x = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
        # auto: the fastest fused backend of each op
        return (x,), {"auto": fast, "original": original}, (original, fast)

    return [Case("mtunet", f"MT-UNet train step B={batch} {side}x{side}", build, dtypes=(torch.float32,),
                 modes=("fwd+bwd",), estimate_s=3 if shapes.tiny else 45, fused=("auto",),
                 flops=lambda mode: 80.75e9 * batch * (1 if mode == "fwd" else 3),   # MTUNet(9) forward, 224²
                 note="train-mode BN, logits fwd+bwd", timed_in_dry_run=False)]


def all_cases(device: torch.device, tiny: bool) -> List[Case]:
    shapes = Shapes(tiny)
    return [*pam_cases(device, shapes, with_flex=False), *cam_cases(device, shapes), *gate_cases(device, shapes),
            *gaussian_cases(device, shapes), *window_cases(device, shapes), *external_cases(device, shapes),
            *mtunet_cases(device, shapes), *([] if tiny else pam_cases(device, shapes, with_flex=True))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="CSV the rows are appended to (flushed row by row)")
    parser.add_argument("--deadline", type=float, default=None, help="epoch seconds; default: now + 300")
    parser.add_argument("--tiny", action="store_true", help="toy shapes (the CPU dry run)")
    parser.add_argument("--warm", action="store_true", help="run the fused providers once, no rows")
    parser.add_argument("--summary", metavar="CSV", help="print the ratio lines of a rows CSV and exit")
    args = parser.parse_args(argv)
    if args.summary:
        from bench.gpu_report import ratios

        with open(args.summary, newline="") as f:
            for line in ratios(list(csv.DictReader(f))):
                print(line)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    deadline = args.deadline if args.deadline is not None else time.time() + 300
    rec = Recorder(None if args.warm else args.out)
    runner = Runner(device, rec, deadline, args.tiny)
    if not args.warm:
        runner.measure_ceilings()
    for case in all_cases(device, args.tiny):
        if args.warm and not case.fused:
            continue
        runner.run_case(case, warm=args.warm)
    if args.warm:
        print(f"warm: done, {runner.left():.0f} s before the deadline", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

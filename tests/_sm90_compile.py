r"""Compile every Triton kernel of the package for an H100 (sm_90) on a machine without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``, the CPU test suite) runs the kernels' Python, not
their compilation: it accepts what the GPU compiler rejects (``tl.dot`` operand dtypes or shapes,
constexpr misuse, shared memory beyond the card's 227 KiB, ...). This script drives the real
compiler instead. It installs an offline driver that reports an sm_90 target and lets Triton
lower every kernel through TTIR → TTGIR → LLVM → PTX → cubin (``ptxas`` ships with the triton
wheel); loading and launching are no-ops, so the CPU tensors are only used for their shapes,
strides and alignment, and the results are garbage that nothing checks. What it establishes:
every kernel specialisation the sweep below reaches compiles for sm_90 and fits its shared
memory. It also reads each cubin's resource usage (``cuobjdump -res-usage``, from the wheel too)
and lists the specialisations that use local memory — register spills, a performance problem to
look at, not a failure. What it cannot: that the kernels run correctly or fast on the GPU
(``pytest -m gpu`` and the benchmarks do that).

The sweep calls each op's public function forced to the ``triton`` backend, forward and backward,
in float32, bfloat16 and float16, over the variants the kernels specialise on (epilogues,
transpose, layouts, pad modes, 2-D/3-D, splits). Run as ``python -m tests._sm90_compile``
(``-v`` lists every compiled kernel, ``--dtypes float32,bfloat16`` narrows the sweep);
tests/test_triton_sm90_compile.py runs it in a subprocess, because the interpreter must be off when
the kernels are defined. Compiled kernels land in Triton's cache (``TRITON_CACHE_DIR``), so a
second run only re-checks what changed.

``--table CSV [--headline]`` writes the compile table (bench/results/sm90_compile_table.csv):
registers, local memory (spills + stack) and shared memory per kernel specialisation, for the
position defaults over dk 64/128/256 × dv 64/512/1024 × n 70/4096 (masked / unmasked EVEN kernels)
× transpose, every op of the sweep, and with
``--headline`` every family's GPU-check shapes (bench/cases_<family>.py ``gpu_check_cases``), in
each dtype of ``--dtypes``. Its first line names the triton that compiled it: the committed table
is triton 3.9's (this machine's), not the GPU machine's triton 3.6, whose register allocation differs.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, List, Tuple

os.environ.pop("TRITON_INTERPRET", None)   # must happen before triton_kernels is imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402

H100_SHARED_MEMORY = 232448   # bytes a block may opt into on sm_90 (227 KiB)
COMPILED: List[Tuple[str, int, bytes]] = []   # (kernel name, shared memory bytes, cubin)


def resource_usage(cubin: bytes) -> Tuple[int, int]:
    """(registers per thread, local-memory bytes per thread: spills and stack) of one cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", report)
    local = sum(int(v) for v in re.findall(r"(?:STACK|LOCAL):(\d+)", report))
    return (int(regs.group(1)) if regs else -1), local


class _OfflineUtils:
    def get_device_properties(self, device):
        return {"max_shared_mem": H100_SHARED_MEMORY, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        COMPILED.append((name, shared, bytes(kernel)))
        return None, None, 0, 0, 1024

    def unload_module(self, module):
        pass


class _NoLaunch:
    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        pass


class OfflineSm90Driver:
    """Just enough of a Triton driver to compile for sm_90 and skip loading and launching."""

    def __init__(self):
        self.utils = _OfflineUtils()
        self.launcher_cls = _NoLaunch

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)


def _install() -> None:
    triton_driver.set_active(OfflineSm90Driver())
    import medattn_fast.backend as B

    # CPU tensors stand in for CUDA ones: the backends' predicates must let them through.
    def cpu_stands_for_cuda(*tensors):
        return ["float64 is not a Triton dtype" for t in B._tensors(tensors) if t.dtype == torch.float64][:1]

    B.triton_reasons = cpu_stands_for_cuda


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _leaf(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _backward(out) -> None:
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward([o for o in outs if o.requires_grad], [torch.ones_like(o) for o in outs if o.requires_grad])


def _position(dtype) -> None:
    import medattn_fast.functional as MF

    for transpose in (False, True):
        for dk, dv, nq, nk in ((8, 64, 70, 70), (1, 5, 33, 33), (64, 160, 40, 57)):
            if transpose and nq != nk:
                continue
            q, k = _leaf(2, nq, dk, dtype=dtype), _leaf(2, nk, dk, dtype=dtype)
            v = _leaf(2, nq if transpose else nk, dv, dtype=dtype)
            _backward(MF.position_attention(q, k, v, scale=0.5, transpose=transpose, backend="triton"))
    # channel-first storage with both epilogues (DANet's γ·o + x, the guided attention's o ⊙ f)
    q, k, v = _leaf(2, 8, 50, dtype=dtype), _leaf(2, 8, 50, dtype=dtype), _leaf(2, 64, 50, dtype=dtype)
    gamma, res, mul = _leaf(1, dtype=dtype), _leaf(2, 64, 50, dtype=dtype), _leaf(2, 64, 50, dtype=dtype)
    _backward(MF.position_attention(q, k, v, layout="channels", gamma=gamma, residual=res, backend="triton"))
    _backward(MF.position_attention(q, k, v, layout="channels", multiply=mul, transpose=True, backend="triton"))
    # the variants bench/gpu_check.sh times beside the default: dq by (relaxed) atomics; TF32 P and dS
    # (16-bit P is the default); the hoisted invariant operand of dq/dk, alone and with the fused
    # backward (16-bit only); the 128-wide dv split
    import medattn_fast

    variants = [medattn_fast.KernelConfig(position_backward="fused"), medattn_fast.KernelConfig(position_dv_split=128)]
    if dtype != torch.float32:
        variants += [medattn_fast.KernelConfig(position_p16=False), medattn_fast.KernelConfig(position_hoist=True),
                     medattn_fast.KernelConfig(position_backward="fused", position_hoist=True)]
    for variant in variants:
        with medattn_fast.use_kernel_config(variant):
            _backward(MF.position_attention(q, k, v, layout="channels", gamma=gamma, residual=res, backend="triton"))


def _channel(dtype) -> None:
    import medattn_fast.functional as MF

    for negate in (True, False):
        for shape in ((2, 7, 5, 9), (1, 64, 48, 48)):
            x = _leaf(*shape, dtype=dtype)
            gamma = _leaf(1, dtype=dtype)
            _backward(MF.channel_attention(x, negate=negate, gamma=gamma, residual=x, backend="triton"))
    x, f = _leaf(2, 16, 6, 6, 6, dtype=dtype), _leaf(2, 16, 6, 6, 6, dtype=dtype)
    _backward(MF.channel_attention(x, negate=False, multiply=f, backend="triton"))


def _gaussian(dtype) -> None:
    import medattn_fast.functional as MF

    for b, h, w, d in ((2, 7, 7, 256), (1, 5, 9, 70), (12, 2, 2, 1024)):
        q, k, v = (_leaf(b, h, w, d, dtype=dtype) for _ in range(3))
        shift = torch.tensor(0.3, dtype=dtype, requires_grad=True)
        _backward(MF.gaussian_axial_attention(q, k, v, shift, backend="triton"))
        ax, ay = _leaf(b, h, w, w, dtype=dtype), _leaf(b, w, h, h, dtype=dtype)
        _backward(MF.gaussian_axial_from_scores(ax, ay, v, shift, backend="triton"))


def _window(dtype) -> None:
    import medattn_fast.functional as MF

    for (h, w, c, heads, ws), pad_mode, layout in (((14, 14, 64, 8, 4), "mtunet", "windows"),
                                                   ((9, 6, 24, 3, 4), "mask", "grid"),
                                                   ((5, 7, 32, 2, 3), "mtunet", "padded"),
                                                   ((16, 16, 256, 2, 8), "mask", "windows")):
        x = _leaf(2, h, w, c, dtype=dtype)
        weights = [_leaf(c, c, dtype=dtype) if i % 2 == 0 else _leaf(c, dtype=dtype) for i in range(8)]
        _backward(MF.window_attention(x, *weights, window_size=ws, num_heads=heads, pad_mode=pad_mode, layout=layout,
                                      backend="triton"))


def _external(dtype) -> None:
    import medattn_fast.functional as MF

    for b, n, c, heads, slots in ((2, 196, 64, 8, 64), (1, 37, 30, 3, 16), (2, 3136, 256, 8, 64), (2, 49, 1024, 8, 64)):
        x = _leaf(b, n, c, dtype=dtype)
        wq, bq = _leaf(c, c, dtype=dtype), _leaf(c, dtype=dtype)
        mk, bk = _leaf(slots, c // heads, dtype=dtype), _leaf(slots, dtype=dtype)
        mv, bv = _leaf(c // heads, slots, dtype=dtype), _leaf(c // heads, dtype=dtype)
        wo, bo = _leaf(c, c, dtype=dtype), _leaf(c, dtype=dtype)
        _backward(MF.external_attention(x, wq, bq, mk, bk, mv, bv, wo, bo, num_heads=heads, backend="triton"))


def _gate(dtype) -> None:
    import medattn_fast
    from medattn_fast.nn import AttentionGate

    # the per-channel loop kernels at the widths where ``auto`` takes the dot kernels (which the
    # default pass below compiles): both variants stay compiled, to be timed side by side
    with medattn_fast.use_kernel_config(medattn_fast.KernelConfig(gate_kernel="loop")):
        for training in (False, True):
            gate = AttentionGate(64, 128, 32, backend="triton").to(dtype).train(training)
            _backward(gate(_leaf(2, 64, 20, 24, dtype=dtype), _leaf(2, 128, 10, 12, dtype=dtype)))

    # the benchmarks' widths (Cx = 64 in 2-D, 32 in 3-D: 64- and 32-channel x tiles) and a narrow one
    for cx, spatial, size, coarse in ((64, 2, (20, 24), (10, 12)), (32, 3, (8, 10, 6), (4, 5, 3)),
                                      (8, 2, (9, 9), (9, 9))):
        for training in (False, True):
            gate = AttentionGate(cx, 2 * cx, cx // 2, spatial_dims=spatial, backend="triton").to(dtype).train(training)
            x, g = _leaf(2, cx, *size, dtype=dtype), _leaf(2, 2 * cx, *coarse, dtype=dtype)
            _backward(gate(x, g))
    # grid mode: the logits pass on θ·x and the output pass (70 channels: two 64-channel blocks)
    for spatial, size, coarse in ((2, (20, 24), (10, 12)), (3, (8, 10, 6), (4, 5, 3))):
        for training in (False, True):
            gate = AttentionGate(70, 12, 35, spatial_dims=spatial, mode="grid", backend="triton")
            gate = gate.to(dtype).train(training)
            x, g = _leaf(2, 70, *size, dtype=dtype), _leaf(2, 12, *coarse, dtype=dtype)
            _backward(gate(x, g))


def position_defaults(dk: int, dv: int, dtype, transpose: bool, n: int = 70, variant: str = "separate",
                      **variants) -> List[Tuple[str, int, int, int]]:
    """Compile the position kernels at their default config (``default_config(dk, dv, dtype)``),
    forward and backward (``variant``: the backward's), at n tokens (odd by default: the masked
    kernels; a multiple of the tiles compiles the unmasked EVEN ones); return (kernel, registers,
    local bytes, shared bytes) each. ``variants``: the launch functions' ``p16``, ``dv_split``,
    ``hoist``. Calls the kernels' launch functions directly (no dispatch: the capability check is
    not asked)."""
    from medattn_fast.ops._custom_op import triton_module

    kernels = triton_module("position")()
    q, k = torch.randn(1, n, dk, dtype=dtype), torch.randn(1, n, dk, dtype=dtype)
    v = torch.randn(1, n, dv, dtype=dtype)
    before = len(COMPILED)
    forward_variants = {name: value for name, value in variants.items() if name != "hoist"}
    out, o, lse = kernels.position_forward(q, k, v, scale=0.5, transpose=transpose, **forward_variants)
    kernels.position_backward(torch.randn_like(out), q, k, v, out, lse, scale=0.5, transpose=transpose,
                              variant=variant, **variants)
    return [(name, *resource_usage(cubin), shared) for name, shared, cubin in COMPILED[before:]]


def position_dq_atomics(dtype=torch.bfloat16, dk: int = 64, dv: int = 512, n: int = 70) -> List[str]:
    """The atomic instructions (``atom``/``red`` lines) of the PTX of the fused backward's dk kernel
    (``_dk_kernel`` with ``DQ_ATOMIC``: dq added by atomics) at the default tiles: relaxed adds whose
    result is unused compile to ``red.global.add.f32`` (or ``red.relaxed``), not an ``atom...acq_rel``
    that returns the old value and orders memory around every add."""
    from medattn_fast.ops._custom_op import triton_module

    kernels = triton_module("position")()
    position_defaults(dk, dv, dtype, False, n, variant="fused")
    lines = []
    for compiled in kernels._dk_kernel.device_caches[0][0].values():   # (the separate dk kernel has none)
        ptx = compiled.asm.get("ptx", "")
        lines += [line.strip() for line in ptx.splitlines() if re.match(r"\s*(@%p\d+\s+)?(atom|red)\.", line)]
    return lines


POSITION_TABLE_DK = (64, 128, 256)
POSITION_TABLE_DV = (64, 512, 1024)
POSITION_TABLE_N = (70, 4096)
TABLE_HEADER = ("family", "case", "dtype", "kernel", "registers", "local_bytes", "shared_bytes", "status")


def position_table(dks=POSITION_TABLE_DK, dvs=POSITION_TABLE_DV, dtypes=DTYPES, ns=POSITION_TABLE_N) -> List[Tuple]:
    """Rows of :data:`TABLE_HEADER` for the position kernels' defaults over dk × dv × dtype × transpose
    × n (70: the masked kernels; 4096, DANet's 64²: the unmasked EVEN specialisations where dk is a
    power of two and the tiles divide); a specialisation that does not compile (e.g. shared memory
    past the limit) is a row with its reason."""
    rows = []
    for dk in dks:
        for dv in dvs:
            for dtype in dtypes:
                for n in ns:
                    for transpose in (False, True):
                        case = f"dk={dk} dv={dv} n={n}{' transpose' if transpose else ''}"
                        dname = str(dtype).replace("torch.", "")
                        try:
                            for kernel, regs, local, shared in position_defaults(dk, dv, dtype, transpose, n):
                                rows.append(("position", case, dname, kernel, regs, local, shared, "ok"))
                        except Exception as exc:   # the failing specialisation, as a row
                            first = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                            rows.append(("position", case, dname, "", -1, -1, -1, f"error: {first}"))
    return rows


def _position_headline(batch_channels_side, dtype, grad: bool) -> None:
    """DANet's PAM call at a headline shape (channel-first q/k/v, γ·o + x), batch 1: the position
    kernels' config depends on dk, dv and dtype only, and a CPU convolution at B=8 C=512 128² is minutes."""
    import medattn_fast.functional as MF

    _, channels, side = batch_channels_side
    n = side * side
    with torch.set_grad_enabled(grad):
        q, k = _leaf(1, channels // 8, n, dtype=dtype), _leaf(1, channels // 8, n, dtype=dtype)
        v, x, gamma = _leaf(1, channels, n, dtype=dtype), _leaf(1, channels, n, dtype=dtype), _leaf(1, dtype=dtype)
        out = MF.position_attention(q, k, v, layout="channels", gamma=gamma, residual=x, backend="triton")
        if grad:
            _backward(out)


HEADLINE_FAMILIES = ("position", "channel", "gaussian_axial", "window", "external", "attention_gate")


def headline_table(dtypes=DTYPES, families=HEADLINE_FAMILIES) -> List[Tuple]:
    """Rows of :data:`TABLE_HEADER` for every family's GPU-check rows (bench/cases_<family>.py
    ``gpu_check_cases``, their real shapes; position at batch 1, see :func:`_position_headline`): the
    ``triton`` provider's kernels at their default configs, in each of the case's modes."""
    import importlib
    import re as _re

    rows = []
    for family in families:
        cases = importlib.import_module(f"bench.cases_{family}").gpu_check_cases(torch.device("cpu"), tiny=False)
        for case in cases:
            for dtype in dtypes:
                for mode in case.modes:
                    grad = mode != "no-grad"
                    dname = str(dtype).replace("torch.", "")
                    before = len(COMPILED)
                    try:
                        if family == "position":
                            batch, channels, side = map(int, _re.search(r"B=(\d+) C=(\d+) (\d+)x", case.shape).groups())
                            _position_headline((batch, channels, side), dtype, grad)
                        else:
                            inputs, providers = case.setup(torch.device("cpu"), dtype)
                            with torch.set_grad_enabled(grad):
                                out = providers["triton"](*inputs)
                                if grad:
                                    _backward(out)
                        status = "ok"
                    except Exception as exc:   # the failing specialisation, as a row
                        status = "error: " + f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    for name, shared, cubin in COMPILED[before:]:
                        rows.append((family, f"{case.shape} {mode}", dname, name, *resource_usage(cubin), shared,
                                     "ok"))
                    if status != "ok":
                        rows.append((family, f"{case.shape} {mode}", dname, "", -1, -1, -1, status))
                    print(f"headline {family} {case.shape} {dname} {mode}: {status}, "
                          f"{len(COMPILED) - before} new kernel specialisations", flush=True)
    return rows


SWEEP: Tuple[Tuple[str, Callable], ...] = (("position_attention", _position), ("channel_attention", _channel),
                                           ("gaussian_axial", _gaussian), ("window_attention", _window),
                                           ("external_attention", _external), ("attention_gate", _gate))


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests._sm90_compile", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="list every compiled kernel")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated torch dtypes")
    parser.add_argument("--op", action="append", choices=[name for name, _ in SWEEP],
                        help="only these ops (repeatable); default: all")
    parser.add_argument("--table", metavar="CSV",
                        help="write the compile table (registers, local memory, shared memory per kernel "
                             "specialisation): the position defaults over dk 64/128/256 × dv 64/512/1024 × "
                             "transpose, and every op of the sweep below at its default configs")
    parser.add_argument("--table-dk", default=",".join(map(str, POSITION_TABLE_DK)),
                        help="the table's position dk values (comma-separated)")
    parser.add_argument("--table-dv", default=",".join(map(str, POSITION_TABLE_DV)),
                        help="the table's position dv values (comma-separated)")
    parser.add_argument("--table-n", default=",".join(map(str, POSITION_TABLE_N)),
                        help="the table's position token counts (comma-separated; odd: masked kernels, a "
                             "multiple of the tiles: the unmasked EVEN ones)")
    parser.add_argument("--no-sweep", action="store_true", help="the position table only, not the sweep")
    parser.add_argument("--dq-atomics", action="store_true",
                        help="print the atomic instructions of the fused position backward's dk kernel's PTX "
                             "(bfloat16, dk 64, dv 512) as 'atomic <instruction>' lines")
    parser.add_argument("--headline", action="store_true",
                        help="with --table: also every family's GPU-check shapes (bench/cases_*.py gpu_check_cases)")
    parser.add_argument("--headline-family", action="append", choices=HEADLINE_FAMILIES,
                        help="with --headline: only these families' GPU-check shapes (repeatable); default: all")
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    _install()
    if args.dq_atomics:
        for line in position_dq_atomics():
            print(f"atomic {line}")
    table = []
    if args.table and (not args.op or "position_attention" in args.op):
        table = position_table([int(d) for d in args.table_dk.split(",")],
                               [int(d) for d in args.table_dv.split(",")], dtypes,
                               [int(n) for n in args.table_n.split(",")])
        for row in table:
            print("table " + " ".join(map(str, row)), flush=True)
    if args.table and args.headline:
        table += headline_table(dtypes, tuple(args.headline_family or HEADLINE_FAMILIES))
    failures = [f"{r[0]} {r[1]} {r[2]}: {r[7]}" for r in table if r[7] != "ok"]
    spills = [f"{r[0]} {r[1]} {r[2]} {r[3]}: {r[5]} B local memory per thread, {r[4]} registers"
              for r in table if r[7] == "ok" and r[5]]
    shared_most = max([r[6] for r in table], default=0)
    for name, run in SWEEP:
        if args.no_sweep or (args.op and name not in args.op):
            continue
        for dtype in dtypes:
            before = len(COMPILED)
            try:
                run(dtype)
            except Exception as exc:   # report every op, not only the first failure
                first = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
                failures.append(f"{name} {dtype}: {first}")
                print(f"FAIL {name:20s} {str(dtype):15s} {first}", flush=True)
                continue
            new = COMPILED[before:]
            for kernel, shared, cubin in new:
                regs, local = resource_usage(cubin)
                table.append((name, "sweep", str(dtype).replace("torch.", ""), kernel, regs, local, shared, "ok"))
                shared_most = max(shared_most, shared)
                if local:
                    spills.append(f"{name} {dtype} {kernel}: {local} B local memory per thread, {regs} registers")
                if args.verbose:
                    print(f"     {kernel:32s} {regs:4d} registers, {local:6d} B local, {shared:6d} B shared")
            print(f"ok   {name:20s} {str(dtype):15s} {len(new)} new kernel specialisations", flush=True)
    for line in spills:
        print(f"spill {line}")
    if args.table:
        import csv
        import triton

        with open(args.table, "w", newline="") as f:
            f.write(f"# sm_90 offline compile (python -m tests._sm90_compile --table), triton {triton.__version__}, "
                    f"shared memory limit {H100_SHARED_MEMORY} B; local_bytes: spills + stack per thread\n")
            writer = csv.writer(f)
            writer.writerow(TABLE_HEADER)
            writer.writerows(table)
        print(f"wrote {len(table)} rows to {args.table}")
    print(f"compiled for sm_90: {len(COMPILED)} kernel specialisations, largest shared memory {shared_most} B "
          f"(limit {H100_SHARED_MEMORY}), {len(spills)} with register spills; {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

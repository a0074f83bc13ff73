"""The mutation round: plant realistic bugs, one at a time, and see whether the test suite fails.

Each mutant below is a one-place edit (an exact, unique string replaced) of the kind a reviewer
could miss: a boundary, a layout path, an optional argument, a low-precision accumulation, a rarely
used gradient, DDP with uneven batches, ``convert()``, the export dispatch, a training resume. For
each mutant this script

1. copies the tracked files of the checkout into a fixed folder per job slot (``$TMPDIR/mutation-
   tree-<slot>``: the C++ extensions' build hash includes their include paths, so a mutant outside
   ``csrc/`` reuses its slot's build, and a ``csrc/`` mutant builds into a fresh folder),
2. applies the edit (refusing one whose text no longer occurs as often as the table says),
3. runs the test files named for it one at a time, most likely first, each with ``pytest -x``
   (``--suite`` runs the whole suite instead), until one fails,
4. records caught (a test failed: it compared a result with the reference and the result moved,
   or the mutant made the code raise) or survived.

    python tools/mutation_round.py                  # every mutant, its named tests
    python tools/mutation_round.py --only T3 C2     # some of them
    python tools/mutation_round.py --suite --only S1  # a survivor against the whole suite
    python tools/mutation_round.py --list           # the table, nothing run

The results go to ``mutation-results.json`` (``--out``). The list and the last score are in
CONTRIBUTING.md. The edits live here, never in the tests: a test must not know which bug it is for.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    id: str
    area: str            # triton, cpp, cuda, dispatch, compat, ddp, convert, export, training, precision
    path: str            # file edited, relative to the repository root
    old: str             # exact text, occurring once
    new: str
    why: str             # the bug, as a reviewer would describe it
    tests: Tuple[str, ...]   # test files (globs) that should catch it
    occurrences: int = 1     # how often ``old`` occurs in the file (a shared line)
    nth: int = 0             # which occurrence is edited (0: the first)



MUTANTS: Tuple[Mutant, ...] = (
    # ---- Triton kernels ----------------------------------------------------------------------
    Mutant("T1", "triton", "triton_kernels/channel.py",
           "sign = -1.0 if NEGATE else 1.0", "sign = -1.0",
           "channel softmax always negated: negate=False (softmax(E), the guided-attention form) wrong",
           ("tests/test_conformance*.py", "tests/test_*channel*.py", "tests/test_properties.py")),
    Mutant("T2", "triton", "triton_kernels/channel.py",
           "mask = (ci[:, None] < n_ch) & (cj[None, :] < n_ch)",
           "mask = (ci[:, None] < n_ch) & (cj[None, :] <= n_ch)",
           "gram tile store one column past C: overwrites the next row's first entry when C is not a tile multiple",
           ("tests/test_conformance*.py", "tests/test_*channel*.py")),
    Mutant("T3", "triton", "triton_kernels/channel.py",
           "acc = acc * _load_2d(mul_ptr + b * smb, rows, pos, smc, smn, n_ch, n_pos)",
           "acc = acc * _load_2d(mul_ptr + b * sxb, rows, pos, smc, smn, n_ch, n_pos)",
           "channel epilogue reads `multiply` with the output's batch stride: wrong for an expanded or sliced multiply",
           ("tests/test_conformance*.py", "tests/test_*channel*.py", "tests/test_properties.py")),
    Mutant("T4", "triton", "triton_kernels/attention_gate.py",
           "hi = lo + (lo < size_in - 1).to(tl.int32)", "hi = lo + (lo < size_in - 2).to(tl.int32)",
           "gate's bilinear upsampling of g clamps one pixel early (the second-last source pixel)",
           ("tests/test_conformance*.py", "tests/test_attention_gate*.py")),
    Mutant("T5", "triton", "triton_kernels/attention_gate.py",
           "dq = d_alpha * first * (1.0 - first)", "dq = d_alpha * alpha * (1.0 - alpha)",
           "gate backward differentiates the wrong sigmoid when double_sigmoid=True",
           ("tests/test_conformance*.py", "tests/test_attention_gate*.py", "tests/test_compat_attention_unet.py")),
    Mutant("T6", "triton", "triton_kernels/position.py",
           "row_max + tl.log2(row_sum)", "row_max + tl.log(row_sum)",
           "position forward saves the row statistic with the natural log where the kernels work in base 2",
           ("tests/test_conformance*.py", "tests/test_*position*.py"), occurrences=2),
    Mutant("T7", "triton", "triton_kernels/position.py",
           "alpha = tl.exp2(row_max - new_max)", "alpha = tl.exp(row_max - new_max)",
           "online softmax rescales the running sum with the wrong base when the row max moves (N > one key block)",
           ("tests/test_conformance*.py", "tests/test_*position*.py")),
    Mutant("T8", "triton", "triton_kernels/window.py",
           "dq = _dot_f32(ds, k, PRECISION, UPCAST) * scale",
           "dq = _dot_f32(ds, k, PRECISION, UPCAST) * qk_scale",
           "window backward scales dq by the base-2 score scale (s·log2 e) instead of s",
           ("tests/test_conformance*.py", "tests/test_*window*.py")),
    Mutant("T9", "triton", "triton_kernels/window.py",
           'MASK_KEYS=pad_mode == "mask", STORE_PADDED=layout != "grid"',
           'MASK_KEYS=pad_mode == "mtunet", STORE_PADDED=layout != "grid"',
           "window forward masks padded keys in the wrong pad mode (only when H or W is not a window multiple)",
           ("tests/test_conformance*.py", "tests/test_*window*.py", "tests/test_mtunet*.py")),
    Mutant("T10", "triton", "triton_kernels/external.py",
           "dp = (da_hat - tl.sum(da_hat * a_hat, 1)[:, None]) * inv[:, None]",
           "dp = (da_hat - tl.sum(da_hat * a_hat, 1)[:, None])",
           "external attention backward forgets the slot normalisation's 1/(ε + r)",
           ("tests/test_conformance*.py", "tests/test_*external*.py")),
    Mutant("T11", "triton", "triton_kernels/gaussian_axial.py",
           "lse = (row_max + tl.log2(row_sum)) * 0.6931471805599453", "lse = row_max + tl.log2(row_sum)",
           "gaussian axial forward saves its log-sum-exp in base 2 where the backward reads natural log",
           ("tests/test_conformance*.py", "tests/test_*gaussian*.py")),
    Mutant("T12", "triton", "triton_kernels/gaussian_axial.py",
           "tl.store(dshift_ptr + pid, -tl.sum(tl.sum(ds * dist * dist, 1), 0))",
           "tl.store(dshift_ptr + pid, tl.sum(tl.sum(ds * dist * dist, 1), 0))",
           "the Gaussian width θ's gradient (a rarely used parameter) with the wrong sign",
           ("tests/test_conformance*.py", "tests/test_*gaussian*.py", "tests/test_mtunet*.py")),
    # ---- C++ CPU kernels -----------------------------------------------------------------------
    Mutant("C1", "cpp", "csrc/cpu/attention_gate.cpp",
           "hi[j] = i0 + (i0 < in - 1 ? 1 : 0);", "hi[j] = i0 + (i0 < in - 2 ? 1 : 0);",
           "C++ gate's interpolation table clamps one source pixel early",
           ("tests/test_conformance*.py", "tests/test_attention_gate*.py")),
    Mutant("C2", "cpp", "csrc/cpu/attention_gate.cpp",
           "  } else if (consecutive(off, n)) {\n    for (int64_t c = 0; c < C; ++c) {\n      const scalar_t* src = base",
           "  } else if (true) {\n    for (int64_t c = 0; c < C; ++c) {\n      const scalar_t* src = base",
           "C++ gate gathers every channels-first tile as if its positions were consecutive (sliced/strided x)",
           ("tests/test_conformance*.py", "tests/test_attention_gate*.py", "tests/test_properties.py")),
    Mutant("C3", "cpp", "csrc/cpu/channel.cpp",
           "at::ScalarType acc_dtype_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }",
           "at::ScalarType acc_dtype_of(at::ScalarType t) { return t; }",
           "C++ channel attention accumulates bfloat16 inputs in bfloat16",
           ("tests/test_conformance*.py", "tests/test_*channel*.py", "tests/test_autocast*.py")),
    Mutant("C4", "cpp", "csrc/cpu/channel.cpp",
           "at::baddbmm(g, A.transpose(1, 2), G, 1.0, gamma_value)",
           "at::baddbmm(g, A.transpose(1, 2), G, 1.0, 1.0)",
           "C++ channel backward drops γ from dx when the residual is x (DANet's CAM)",
           ("tests/test_conformance*.py", "tests/test_*channel*.py", "tests/test_compat_danet.py")),
    Mutant("C5", "cpp", "csrc/cpu/position.cpp",
           "      const int64_t n = std::min(bk, p.Nk - j0);\n",
           "      const int64_t n = std::min(bk, p.Nk - j0 + 1);\n",
           "C++ position forward reads one key past N in the last key block",
           ("tests/test_conformance*.py", "tests/test_*position*.py"), occurrences=2),
    Mutant("C6", "cpp", "csrc/cpu/gaussian_axial.cpp",
           "s[n] = exp_fast(s[n] - shift * dist * dist - row_lse);",
           "s[n] = exp_fast(s[n] - shift * dist - row_lse);",
           "C++ gaussian backward recomputes probabilities with abs(n−m) instead of (n−m)²",
           ("tests/test_conformance*.py", "tests/test_*gaussian*.py")),
    Mutant("C7", "cpp", "csrc/cpu/gaussian_axial.cpp",
           "row -= static_cast<double>(dp[n]) * dist * dist;", "row -= static_cast<double>(dp[n]) * dist;",
           "C++ gradient of θ (rarely used) with abs(n−m) instead of (n−m)²",
           ("tests/test_conformance*.py", "tests/test_*gaussian*.py", "tests/test_mtunet*.py")),
    # ---- CUDA kernels, run on the CPU by tests/_cuda_emulation.py ------------------------------
    Mutant("U1", "cuda", "csrc/cuda/attention_gate.cu",
           "  __syncthreads();  // the previous tile is no longer read\n", "\n",
           "CUDA gate restages the shared W tile while slower threads still read the previous one (a race)",
           ("tests/test_attention_gate_cuda_emulated.py",)),
    Mutant("U2", "cuda", "csrc/cuda/attention_gate.cu",
           "    __syncthreads();\n    if (t < kRows && i0 + t < n.Ci) {", "    if (t < kRows && i0 + t < n.Ci) {",
           "CUDA gate backward sums the shared per-row products before every thread has written its own",
           ("tests/test_attention_gate_cuda_emulated.py",)),
    Mutant("U3", "cuda", "csrc/cuda/attention_gate.cu",
           "for (int k = threadIdx.x; k < kRows * K; k += blockDim.x)",
           "for (int k = threadIdx.x; k < kRows * K - 1; k += blockDim.x)",
           "CUDA gate stages its W tile one element short: the last entry keeps what shared memory held",
           ("tests/test_attention_gate_cuda_emulated.py",)),
    Mutant("U4", "cuda", "csrc/cuda/attention_gate.cu",
           "(b * gridDim.x + blockIdx.x)", "(b + blockIdx.x)",
           "CUDA gate backward indexes its per-block partial sums without the batch stride (blocks collide)",
           ("tests/test_attention_gate_cuda_emulated.py",)),
    # ---- low-precision accumulation ------------------------------------------------------------
    Mutant("P1", "precision", "csrc/cpu/position.cpp",
           "        T total = 0;  // fixed order: deterministic for any thread count",
           "        scalar_t total = 0;  // fixed order: deterministic for any thread count",
           "C++ position backward sums γ's per-row gradient terms in the 16-bit input dtype",
           ("tests/test_scalar_gradients_low_precision.py", "tests/test_conformance*.py", "tests/test_*position*.py")),
    # ---- dispatch and autocast ----------------------------------------------------------------
    Mutant("D1", "dispatch", "medattn_fast/backend.py",
           "value.is_floating_point() and value.dtype != torch.float64 \\",
           "value.is_floating_point() \\",
           "autocast casts float64 inputs down too (the docstring promises float64 is left alone)",
           ("tests/test_conformance*.py", "tests/test_autocast*.py")),
    Mutant("D2", "dispatch", "medattn_fast/ops/_batch_norm.py",
           "return self if self.training is not None else self._replace(training=bool(training))",
           "return self._replace(training=bool(training))",
           "gate op: every BN takes the call's training flag, not its own (frozen BatchNorm fine-tuning)",
           ("tests/test_frozen_batchnorm.py", "tests/test_attention_gate*.py")),
    Mutant("D3", "dispatch", "medattn_fast/ops/attention_gate.py",
           "    if in_dtype is not None and x.dtype != in_dtype:\n",
           "    if False:\n",
           "gate with 16-bit features and float32 parameters (AMP) returns float32, not the features' dtype",
           ("tests/test_autocast.py", "tests/test_autocast_ops.py", "tests/test_attention_gate.py",
            "tests/test_conformance.py")),
    # ---- export -------------------------------------------------------------------------------
    Mutant("E1", "export", "medattn_fast/backend.py",
           "return _ctx_portable.get() or torch.onnx.is_in_onnx_export()", "return _ctx_portable.get()",
           "torch.onnx.export no longer switches the ops to their portable path",
           ("tests/test_export.py",)),
    Mutant("E2", "export", "medattn_fast/ops/_families.py",
           'export_backend="reference",', 'export_backend="cpp",',
           "position attention exports through the C++ custom op (no ONNX translation)",
           ("tests/test_export.py",)),
    # ---- compat -------------------------------------------------------------------------------
    Mutant("M1", "compat", "medattn_fast/compat/attention_unet.py",
           'double_sigmoid = bool(getattr(module, "double_sigmoid", False))', "double_sigmoid = False",
           "from_original drops the original's double_sigmoid flag",
           ("tests/test_compat_attention_unet.py", "tests/test_convert.py")),
    Mutant("M2", "compat", "medattn_fast/compat/attention_unet.py",
           "if bn.uses_batch_stats:", "if self.training:",
           "compat ConvBatchNorm folds by the block's flag, not its BatchNorm's (frozen BN)",
           ("tests/test_frozen_batchnorm.py", "tests/test_compat_attention_unet.py")),
    Mutant("M3", "compat", "medattn_fast/compat/_adopt.py",
           "m.training = flags.get(name, original.training)", "m.training = original.training",
           "adopt copies only the root's training flag to every submodule",
           ("tests/test_frozen_batchnorm.py", "tests/test_convert.py", "tests/test_compat_*.py")),
    # ---- convert ------------------------------------------------------------------------------
    Mutant("V1", "convert", "medattn_fast/convert.py",
           "                if hooked:\n", "                if False:\n",
           "convert swaps blocks whose submodules carry hooks (the hooks silently stop running)",
           ("tests/test_convert_hooks.py", "tests/test_convert.py")),
    Mutant("V2", "convert", "medattn_fast/compat/_adopt.py",
           "        object.__setattr__(new, table, hooks)\n",
           "        pass\n",
           "graft drops the block's own hook tables",
           ("tests/test_convert_hooks.py", "tests/test_convert.py")),
    Mutant("V3", "convert", "medattn_fast/compat/_adopt.py",
           "                n_tab[name] = o\n", "                n_tab[name] = o.detach().clone()\n",
           "graft copies parameters: an optimizer built before convert() trains tensors no longer used",
           ("tests/test_convert_hooks.py", "tests/test_convert.py")),
    # ---- DDP / SyncBatchNorm ------------------------------------------------------------------
    Mutant("S1", "ddp", "medattn_fast/ops/_batch_norm.py",
           "    mean = total / count\n",
           "    mean = total / (float(t.numel() // channels) * torch.distributed.get_world_size(bn.process_group))\n",
           "SyncBN gate assumes every rank holds the same batch (uneven last batches)",
           ("tests/test_syncbn_gate.py",)),
    Mutant("S2", "ddp", "medattn_fast/ops/_batch_norm.py",
           "        grad = grad.contiguous().clone()\n        dist.all_reduce(grad, group=ctx.group)\n",
           "        grad = grad.contiguous().clone()\n",
           "SyncBN gate backward does not all-reduce the statistics' gradients",
           ("tests/test_syncbn_gate.py",)),
    Mutant("S3", "ddp", "medattn_fast/ops/_batch_norm.py",
           "unbiased = var.detach() * (count / max(count - 1, 1))", "unbiased = var.detach()",
           "running_var updated with the biased variance",
           ("tests/test_attention_gate*.py", "tests/test_syncbn_gate.py", "tests/test_frozen_batchnorm.py")),
    Mutant("S4", "ddp", "medattn_fast/ops/_batch_norm.py",
           "factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum",
           "factor = 0.1 if bn.momentum is None else bn.momentum",
           "momentum=None (cumulative average, rarely used) treated as 0.1",
           ("tests/test_conformance*.py", "tests/test_attention_gate*.py", "tests/test_syncbn_gate.py"),
           occurrences=2),
    # ---- training resume ----------------------------------------------------------------------
    Mutant("R1", "training", "medattn_fast/train.py",
           "return iter(indices[self.skip:])", "return iter(indices)",
           "a run resumed mid-epoch sees the epoch's already-seen items again",
           ("tests/test_train.py",)),
    Mutant("R2", "training", "medattn_fast/train.py",
           '        optimizer.load_state_dict(checkpoint["optimizer"])\n', "",
           "resume restarts the optimizer (Adam moments lost)",
           ("tests/test_train.py",)),
)


def _tests(m: Mutant, tree: Path) -> List[str]:
    if isinstance(m.tests, str):   # ("a.py") is a string, not a one-file tuple
        raise SystemExit(f"{m.id}: tests must be a tuple of globs, got the string {m.tests!r}")
    found: List[str] = []
    for pattern in m.tests:
        for p in sorted(glob.glob(str(tree / pattern))):
            rel = os.path.relpath(p, tree)
            if rel not in found:
                found.append(rel)
    return found


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for rel in files.decode().split("\0"):
        if not rel:
            continue
        src, dst = ROOT / rel, dest / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def _apply(m: Mutant, tree: Path) -> None:
    path = tree / m.path
    text = path.read_text()
    n = text.count(m.old)
    if n != m.occurrences:
        raise SystemExit(f"{m.id}: the text to replace occurs {n} times in {m.path} (expected {m.occurrences}); "
                         f"update the table")
    at = -1
    for _ in range(m.nth + 1):
        at = text.index(m.old, at + 1)
    path.write_text(text[:at] + m.new + text[at + len(m.old):])


def _run_one(m: Mutant, slot: int, *, suite: bool, python: str, workers: int) -> dict:
    # A fixed tree path per slot: the C++ extensions' build hash includes their include paths, so a
    # mutant outside csrc/ reuses the slot's build; a csrc/ mutant builds into a fresh directory.
    tree = Path(tempfile.gettempdir()) / f"mutation-tree-{slot}"
    shutil.rmtree(tree, ignore_errors=True)
    _copy_tree(tree)
    _apply(m, tree)
    selection = [] if suite else _tests(m, tree)
    fresh = m.path.startswith("csrc/")
    build = Path(tempfile.mkdtemp(prefix=f"mutation-build-{m.id}-")) if fresh else \
        Path(tempfile.gettempdir()) / f"mutation-build-{slot}"
    env = {**os.environ, "PYTHONPATH": str(tree), "MEDATTN_BUILD_DIR": str(build)}
    start = time.time()
    caught, chunk, tail, rc = False, [], [], 0
    # the named files one at a time, most likely first: the first failing file decides
    for chunk in ([selection] if suite else [[f] for f in selection]):
        cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *chunk]
        if workers > 1:
            cmd += ["-n", str(workers)]
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        tail, rc = (proc.stdout + proc.stderr).strip().splitlines()[-12:], proc.returncode
        caught = rc not in (0, 5)   # 5: nothing collected, not a catch
        if caught:
            break
    if fresh:
        shutil.rmtree(build, ignore_errors=True)
    result = dict(id=m.id, area=m.area, path=m.path, why=m.why, caught=caught, returncode=rc,
                  seconds=round(time.time() - start, 1), tests="(whole suite)" if suite else " ".join(selection),
                  caught_by=" ".join(chunk) if caught else None, tail=tail)
    print(f"{m.id:4} {m.area:9} {'CAUGHT  ' if caught else 'SURVIVED'} {result['seconds']:6.0f} s  {m.why}"
          + ("" if caught else "\n      " + "\n      ".join(tail[-3:])), flush=True)
    return result


def run(mutants: Sequence[Mutant], *, suite: bool, python: str, workers: int, jobs: int, out: Path,
        first_slot: int = 0) -> List[dict]:
    """Each mutant in its own copy of the tree, ``jobs`` at a time; results written as they come."""
    results: List[dict] = []
    slots: "queue.Queue[int]" = queue.Queue()
    for slot in range(first_slot, first_slot + jobs):
        slots.put(slot)

    def task(m: Mutant) -> dict:
        slot = slots.get()
        try:
            return _run_one(m, slot, suite=suite, python=python, workers=workers)
        finally:
            slots.put(slot)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for result in pool.map(task, mutants):
            results.append(result)
            out.write_text(json.dumps(results, indent=1))
    return results


def main(argv: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these mutants only")
    ap.add_argument("--suite", action="store_true", help="run the whole test suite on each mutant")
    ap.add_argument("--list", action="store_true", help="print the table and stop")
    ap.add_argument("--workers", type=int, default=1, help="pytest-xdist workers per run (default 1)")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run side by side (default 2)")
    ap.add_argument("--first-slot", type=int, default=0, help="the first job slot's number (two runs at once: "
                    "give the second one slots of its own)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--out", type=Path, default=Path("mutation-results.json"))
    args = ap.parse_args(list(argv) or None)
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.id:4} {m.area:9} {m.path}: {m.why}")
        return 0
    results = run(chosen, suite=args.suite, python=args.python, workers=args.workers, jobs=args.jobs, out=args.out,
                  first_slot=args.first_slot)
    caught = sum(r["caught"] for r in results)
    print(f"caught {caught} of {len(results)} ({100.0 * caught / max(1, len(results)):.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

r"""Run a ``csrc/cuda/*.cu`` source's kernels on the CPU: a test helper, no part of the package.

The ``.cu`` file is read unchanged from disk and turned into a host C++ translation unit by a few
explicit textual rules (:data:`RULES`, applied to a generated copy in the build cache) around one
shim header, ``tests/cuda_emulation/cuda_emulation.h``:

* the ``c10/cuda`` includes are dropped and the shim is included after ``torch/extension.h``; it
  defines ``__global__``/``__device__``/``__host__``/``__forceinline__``/``__launch_bounds__(n)``
  away, ``threadIdx`` (thread_local), ``blockIdx``/``blockDim``/``gridDim`` (globals: blocks run one
  at a time) and ``dim3``, ``exp`` for float, ``c10::cuda::CUDAGuard`` (no-op),
  ``getCurrentCUDAStream()`` (a dummy), ``C10_CUDA_KERNEL_LAUNCH_CHECK()`` (no-op: a failed emulated
  launch has thrown already) and ``__syncthreads()`` as a real barrier across the block's threads;
* every ``__shared__ T name[N];`` (each must sit in a ``__global__`` function's body) becomes a
  function-local ``static`` array — one per kernel instantiation, shared by the block's threads, as
  shared memory is — poisoned with NaN bytes at every block's start (CUDA shared memory starts
  undefined; a C++ static would start at zero and hide a read before any write);
* ``x.is_cuda()`` becomes ``x.is_cpu()`` (the emulated launchers take CPU tensors; they still refuse
  any other device, with the source's own message);
* every ``kernel<...><<<grid, block, 0, stream>>>(args...)`` becomes
  ``cuda_emulation::launch(kernel<...>, grid, block, args...)``: every block in turn, each block's
  threads real ``std::thread``\ s, so ``__syncthreads()`` and the shared tiles are real (a data race
  or a missing barrier shows up as wrong or NaN numbers);
* ``#line`` directives keep the original file's line numbers (compiler errors, barrier checks).

Each rule must match exactly as often as its construct occurs in the source's code (comments
excluded), and the code may use no ``__identifier`` or CUDA runtime/intrinsic name the shim does not
provide: when the ``.cu`` changes in a way the rules do not cover, :func:`emulated_source` raises
``EmulationError`` naming what, rather than building something else. The source registers its
functions with ``PYBIND11_MODULE(TORCH_EXTENSION_NAME, ...)`` only (checked: no ``TORCH_LIBRARY``),
so the module name given to the build (``medattn_cudaemu_<family>``) keeps it apart from the real
extensions; :func:`emulated_gate_kernels` declares its custom ops as
``medattn::attention_gate_cudaemu_*`` (the real ones are ``medattn::attention_gate_cuda_*``).

What running it establishes: the kernels' arithmetic, indexing (strides, padding threads, ragged
chunks), barriers and shared-memory tiles, and the host launchers' checks and bookkeeping, executed
by CPU threads with the block's real concurrency. What it cannot: warp-level behaviour and timing
(there are no warps here: a missing ``__syncwarp`` or a warp-synchronous assumption is invisible),
the GPU memory model beyond what the barriers order, nvcc's code generation (``--use_fast_math``'s
approximate ``exp``, FMA contraction, register spills), launch limits (registers, shared memory per
block) and any performance figure.
"""
from __future__ import annotations

import fcntl
import re
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
SHIM_DIR = Path(__file__).resolve().parent / "cuda_emulation"

# the __identifiers the shim or the host compiler provides (anything else in the code is refused)
KNOWN_DUNDER = {"__global__", "__device__", "__host__", "__forceinline__", "__launch_bounds__", "__restrict__",
                "__shared__", "__syncthreads", "__LINE__"}
# CUDA names the shim does not emulate; their presence fails loudly
UNSUPPORTED = re.compile(r"\b(atomic[A-Z]\w*|warpSize|cuda[A-Z]\w*|__shfl\w*|__ballot\w*|__syncwarp|__ldg|"
                         r"__expf|__logf|__fdividef|extern\s+__shared__|cooperative_groups|__constant__)\b")


class EmulationError(RuntimeError):
    """A rewrite rule no longer matches the CUDA source (or the source uses what the shim lacks)."""


def _code_only(text: str) -> str:
    """``text`` without its ``//`` comments and ``/* */`` blocks (the sources' string literals hold
    neither), newlines kept."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _split_top_level(s: str) -> List[str]:
    """``s`` split at the commas outside parentheses, brackets and angle brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([<{":
            depth += 1
        elif ch in ")]>}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i].strip())
            start = i + 1
    parts.append(s[start:].strip())
    return parts


def _expect(rule: str, found: int, wanted: int) -> None:
    if found != wanted or found == 0:
        raise EmulationError(f"cuda emulation rule {rule!r}: rewrote {found} of {wanted} occurrences in the source "
                             "(0, or a mismatch: the .cu changed in a way the rule does not cover; update "
                             "tests/_cuda_emulation.py)")


def _rule_includes(code: str, text: str, path: str) -> Tuple[str, int, int]:
    """The c10/cuda includes go; the shim follows torch/extension.h; #line keeps the numbering."""
    cuda_includes = re.compile(r"^#include <c10/cuda/[\w/]+\.h>[ \t]*$", re.M)
    wanted = len(re.findall(r"#include\s*<c10/cuda/", code))
    text, found = cuda_includes.subn(lambda m: "// (cuda emulation) " + m.group(0)[1:], text)
    _expect("c10/cuda includes", found, wanted)
    extension = re.compile(r"^#include <torch/extension\.h>[ \t]*$", re.M)
    match = extension.search(text)
    if match is None or len(extension.findall(text)) != 1:
        raise EmulationError("cuda emulation rule 'shim after torch/extension.h': expected one "
                             "'#include <torch/extension.h>' line")
    next_line = text.count("\n", 0, match.end()) + 2
    text = (text[:match.end()] + f'\n#include "cuda_emulation.h"\n#line {next_line} "{path}"' + text[match.end():])
    return text, found, wanted


def _rule_shared(code: str, text: str) -> Tuple[str, int, int]:
    """``__shared__ T name[N];`` inside a kernel -> a static array, poisoned at each block's start."""
    wanted = len(re.findall(r"\b__shared__\b", code))
    declaration = re.compile(r"^([ \t]*)__shared__\s+([\w:]+)\s+(\w+)\[([^\]\n]+)\];", re.M)
    for m in declaration.finditer(text):
        before = _code_only(text[:m.start()])
        kernel = before.rfind("__global__")
        body = before[kernel:] if kernel >= 0 else ""
        if kernel < 0 or body.count("{") - body.count("}") < 1:
            raise EmulationError(f"cuda emulation rule '__shared__': {m.group(0).strip()!r} is not inside a "
                                 "__global__ function's body (only function-local shared arrays are emulated)")
    text, found = declaration.subn(
        lambda m: (f"{m.group(1)}static {m.group(2)} {m.group(3)}[{m.group(4)}]; "
                   f"::cuda_emulation::shared_prologue({m.group(3)}, sizeof({m.group(3)}), __LINE__);"), text)
    return text, found, wanted


def _rule_is_cuda(code: str, text: str) -> Tuple[str, int, int]:
    """``t.is_cuda()`` -> ``t.is_cpu()``: the emulated launchers run on CPU tensors."""
    wanted = len(re.findall(r"\bis_cuda\b", code))
    found, lines = 0, text.split("\n")
    for i, line in enumerate(lines):
        line, n = re.subn(r"\b(\w+)\.is_cuda\(\)", r"\1.is_cpu()", line)
        if n:
            found += n
            lines[i] = line + "  // (cuda emulation) was .is_cuda(): the emulated launchers take CPU tensors"
    return "\n".join(lines), found, wanted


def _rule_launches(code: str, text: str) -> Tuple[str, int, int]:
    """``kernel<...><<<grid, block, 0, stream>>>(`` -> ``::cuda_emulation::launch(kernel<...>, grid, block, ``."""
    wanted = code.count("<<<")
    pattern = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.S)

    def launch(m: re.Match) -> str:
        config = _split_top_level(m.group(2))
        if len(config) not in (2, 3, 4):
            raise EmulationError(f"cuda emulation rule 'launch': cannot read the launch configuration "
                                 f"<<<{m.group(2)}>>>")
        if len(config) >= 3 and config[2] != "0":
            raise EmulationError(f"cuda emulation rule 'launch': dynamic shared memory ({config[2]}) is not "
                                 "emulated")
        return f"::cuda_emulation::launch({m.group(1)}, {config[0]}, {config[1]}, "

    text, found = pattern.subn(launch, text)
    return text, found, wanted


def emulated_source(cu_text: str, path: str = "attention_gate.cu") -> Tuple[str, Dict[str, int]]:
    """The host C++ translation unit of the CUDA source ``cu_text`` (see the module docstring), and
    how many occurrences each rule rewrote. Raises :class:`EmulationError` when a rule does not match
    every occurrence of its construct, or the code uses what the shim does not provide."""
    code = _code_only(cu_text)
    unsupported = sorted(set(m.group(0) for m in UNSUPPORTED.finditer(code)))
    unknown = sorted(set(re.findall(r"\b__\w+", code)) - KNOWN_DUNDER)
    if unsupported or unknown:
        raise EmulationError(f"cuda emulation: the source uses {unsupported + unknown}, which the shim "
                             "(tests/cuda_emulation/cuda_emulation.h) does not emulate")
    if "TORCH_LIBRARY" in code or code.count("PYBIND11_MODULE(TORCH_EXTENSION_NAME") != 1:
        raise EmulationError("cuda emulation: expected the source to register its functions with one "
                             "PYBIND11_MODULE(TORCH_EXTENSION_NAME, ...) and no TORCH_LIBRARY (whose op names "
                             "would collide with the real extension's)")
    text = cu_text
    counts = {}
    for name, rule in (("shared", _rule_shared), ("is_cuda", _rule_is_cuda), ("launches", _rule_launches)):
        text, found, wanted = rule(code, text)
        _expect(name, found, wanted)
        counts[name] = found
    text, counts["c10/cuda includes"], _ = _rule_includes(code, text, path)
    header = (f"// GENERATED by tests/_cuda_emulation.py from {path} for the CPU emulation of its kernels;\n"
              "// not a source: edit the .cu (or the rules), never this file. Rules applied (occurrences): "
              + ", ".join(f"{k} {v}" for k, v in counts.items()) + "\n")
    return header + f'#line 1 "{path}"\n' + text, counts


def module_name(family: str) -> str:
    return f"medattn_cudaemu_{family}"


_loaded: Dict[str, ModuleType] = {}


def load_emulated_extension(family: str = "attention_gate", *, verbose: bool = False) -> ModuleType:
    """The CPU build of ``csrc/cuda/<family>.cu`` through the emulation (cached under
    ``$MEDATTN_BUILD_DIR``, as the package's extensions, in ``medattn_cudaemu_<family>``)."""
    if family in _loaded:
        return _loaded[family]
    from torch.utils.cpp_extension import load

    from medattn_fast import _build

    cu = ROOT / "csrc" / "cuda" / f"{family}.cu"
    text, _ = emulated_source(cu.read_text(), str(cu.relative_to(ROOT)))
    name = module_name(family)
    directory = _build.build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    with open(_build.build_dir() / f"{name}.flock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # one build at a time (xdist workers); released if killed
        try:
            generated = directory / f"{family}_emulated.cpp"
            if not generated.exists() or generated.read_text() != text:  # unchanged: ninja keeps the build
                generated.write_text(text)
            baton = directory / "lock"
            if baton.exists():  # we hold the flock: a dead build's
                baton.unlink()
            module = load(name=name, sources=[str(generated)], build_directory=str(directory),
                          extra_include_paths=[str(SHIM_DIR), str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda")],
                          extra_cflags=["-O2", "-pthread"], extra_ldflags=["-pthread"], verbose=verbose)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    _loaded[family] = module
    return module


_gate_kernels = None


def emulated_gate_kernels():
    """The attention gate's five custom ops (``_attention_gate_fused.FusedKernels``) on the emulated
    CUDA extension, declared once per process as ``medattn::attention_gate_cudaemu_*`` with the same
    fake kernels and autograd formulas as the ``cuda`` backend's (``define_custom_ops``)."""
    global _gate_kernels
    if _gate_kernels is None:
        from medattn_fast.ops._attention_gate_fused import define_custom_ops

        _gate_kernels = define_custom_ops("cudaemu", lambda: load_emulated_extension("attention_gate"))
    return _gate_kernels

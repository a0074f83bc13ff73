"""Lazy JIT build of the csrc extensions (never at import time).

One extension per op family and kind: ``csrc/cpu/<family>.cpp`` -> module
``medattn_cpu_<family>``, ``csrc/cuda/<family>.cu`` -> ``medattn_cuda_<family>`` (only where torch
has CUDA and nvcc exists). Each source holds its own ``PYBIND11_MODULE``; headers shared between
families (``csrc/<kind>/*.h``) are on the include path. Separate modules keep a compiler error in
one family from disabling the others, and rebuild only what changed. They are compiled with ninja
through ``torch.utils.cpp_extension.load`` on first use, into ``$MEDATTN_BUILD_DIR`` (default
``~/.cache/medattn_fast``; any writable folder) under a directory keyed by the torch, CUDA and
Python versions, so one cache serves several environments. The sources are found in an installed
wheel (``medattn_fast/_csrc``), an editable install and a plain checkout alike.

Locking: torch's own build lock is a plain file ("baton") that a killed build leaves behind, after
which every later build waits on it forever. We take an ``fcntl`` lock first — the kernel releases
it when its holder dies — and, holding it, delete any baton left by a dead build.

A problem of the installation (sources or ninja or nvcc missing, a failed build: compiler
output included) warns once, naming the backend and the fix; the backend predicates then report
it and ``auto`` falls back to the ``torch`` backend. Facts that are not problems (no kernel of a
kind for a family, a torch without CUDA, ``MEDATTN_NO_BUILD=1``) stay silent.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import torch



def _find_csrc() -> Path:
    """The C++/CUDA sources: ``medattn_fast/_csrc`` in an installed wheel (the build maps the
    repository's top-level ``csrc/`` there), else ``csrc/`` beside the package (a checkout, or an
    editable install, whose ``medattn_fast`` is the checkout's folder)."""
    package = Path(__file__).resolve().parent
    installed = package / "_csrc"
    return installed if installed.is_dir() else package.parent / "csrc"


CSRC = _find_csrc()
KINDS = ("cpu", "cuda")
_SUFFIX = {"cpu": ".cpp", "cuda": ".cu"}

Key = Tuple[str, str]  # (kind, family)
_modules: Dict[Key, ModuleType] = {}
_failures: Dict[Key, str] = {}
_mutex = threading.Lock()


def build_dir() -> Path:
    root = Path(os.environ.get("MEDATTN_BUILD_DIR") or Path.home() / ".cache" / "medattn_fast")
    tag = "torch{}_cu{}_py{}{}".format(
        torch.__version__.replace("+", "_"),
        (torch.version.cuda or "none").replace(".", ""),
        sys.version_info.major,
        sys.version_info.minor,
    )
    return root / tag


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")


def families(kind: str) -> List[str]:
    """The op families with a source of this kind (``csrc/cpu/<family>.cpp``, ``csrc/cuda/<family>.cu``)."""
    _check_kind(kind)
    return sorted(p.stem for p in (CSRC / kind).glob("*" + _SUFFIX[kind]))


def source(kind: str, family: str) -> Path:
    _check_kind(kind)
    return CSRC / kind / f"{family}{_SUFFIX[kind]}"


def module_name(kind: str, family: str) -> str:
    return f"medattn_{kind}_{family}"


_BACKEND_NAME = {"cpu": "cpp", "cuda": "cuda"}


def _blocker(kind: str, family: Optional[str] = None) -> Optional[Tuple[str, Optional[str]]]:
    """Why ``kind`` (``family``) cannot even be attempted here, and the fix when it is a problem of
    this installation (a missing file or tool) rather than a fact (no kernel of that kind exists, a
    torch without CUDA). None: it can be attempted."""
    _check_kind(kind)
    if not CSRC.is_dir():
        return (f"csrc sources not found at {CSRC}",
                "reinstall medattn-fast from a wheel or sdist of this version (they ship medattn_fast/_csrc), "
                "or run it from a source checkout")
    if kind == "cuda":
        if torch.version.cuda is None:
            return "this torch has no CUDA support, CUDA sources skipped", None
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            return ("CUDA toolkit (nvcc) not found, CUDA sources skipped",
                    f"install the CUDA toolkit {torch.version.cuda} (torch's) and set CUDA_HOME")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
            # cpp_extension takes the GPU architectures from the visible devices (and fails with an
            # IndexError when there is none): there is nothing to build for unless they are named
            return ("no CUDA device to build the CUDA kernels for (TORCH_CUDA_ARCH_LIST=9.0, say, builds them "
                    "without one), CUDA sources skipped", None)
    if family is not None and not source(kind, family).is_file():
        return f"no {kind} kernel for {family} ({source(kind, family).relative_to(CSRC.parent)} does not exist)", None
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is not installed", "pip install ninja"
    return None


def _precondition(kind: str, family: Optional[str] = None) -> Optional[str]:
    """Why ``kind`` (``family``) cannot even be attempted here (None: it can)."""
    blocker = _blocker(kind, family)
    return blocker[0] if blocker else None


_warned = set()


def _warn_once(kind: str, what: str, fix: str, details: str = "") -> None:
    """One RuntimeWarning per (kind, problem): the first ``auto`` call that falls back says so."""
    if (kind, what) in _warned:
        return
    _warned.add((kind, what))
    backend = _BACKEND_NAME[kind]
    warnings.warn(f"medattn_fast: {what}; the {backend!r} backend is unavailable and 'auto' falls back to "
                  f"the next backend ('torch' on CPU). Fix: {fix}{details}", RuntimeWarning, stacklevel=3)


def torch_cxx_standard() -> str:
    """The ``-std=c++NN`` flag that the installed torch's own extension build passes: its headers
    require that standard (torch 2.14's stop with "C++20 or later compatible compiler is
    required" under C++17). Our flags never name a standard themselves, so they cannot override
    it; this is for the tools that compile our sources outside ``cpp_extension`` (the nvcc test)."""
    import inspect
    import re

    from torch.utils import cpp_extension

    found = re.findall(r"-std=c\+\+(\d+)", inspect.getsource(cpp_extension))
    return f"-std=c++{max(int(v) for v in found)}" if found else "-std=c++17"


def _flags(kind: str) -> Dict[str, list]:
    # No -std: torch's cpp_extension passes the standard its headers need, and a later flag of
    # ours would win over it (an older one breaks the build on a newer torch).
    cflags = ["-O3"]
    if sys.platform != "win32":
        cflags += ["-fopenmp"] if kind == "cpu" else []
    out = {"extra_cflags": cflags}
    if kind == "cpu" and sys.platform != "win32":
        out["extra_ldflags"] = ["-fopenmp"]
    if kind == "cuda":
        out["extra_cuda_cflags"] = ["-O3", "--use_fast_math", "-lineinfo"]
    return out


def _build(kind: str, family: str) -> ModuleType:
    import fcntl

    from torch.utils.cpp_extension import load

    name = module_name(kind, family)
    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    with open(build_dir() / f"{name}.flock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released by the kernel if we are killed
        try:
            baton = directory / "lock"
            if baton.exists():  # we hold the flock, so no live build of ours owns it
                baton.unlink()
            verbose = os.environ.get("MEDATTN_BUILD_VERBOSE", "0") not in ("", "0")
            return load(
                name=name,
                sources=[str(source(kind, family))],
                build_directory=str(directory),
                extra_include_paths=[str(CSRC), str(CSRC / kind)],
                verbose=verbose,
                **_flags(kind),
            )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def load(kind: str, family: str) -> ModuleType:
    """The extension module of ``family`` for ``kind`` ('cpu' or 'cuda'), built on first use.

    Raises ``RuntimeError`` with the reason when it is unavailable.
    """
    reason = unavailable_reason(kind, family)
    if reason:
        raise RuntimeError(reason)
    return _modules[(kind, family)]


@torch.compiler.assume_constant_result   # asked by dispatch inside traced code, like unavailable_reason
def known_reason(kind: str, family: str) -> Optional[str]:
    """Why the extension of ``family`` cannot be used, as far as is known without building or
    warning: an earlier attempt's failure, a fact of this machine (no kernel of that kind, a torch
    without CUDA) or ``MEDATTN_NO_BUILD=1``. None: loaded, or not tried yet (a problem of the
    installation, such as missing sources or ninja, is found and warned about by the first attempt,
    :func:`unavailable_reason`)."""
    key = (kind, family)
    if key in _modules:
        return None
    if key in _failures:
        return _failures[key]
    blocker = _blocker(kind, family)
    if blocker and blocker[1] is None:
        return blocker[0]
    if os.environ.get("MEDATTN_NO_BUILD", "0") not in ("", "0"):
        return "building csrc is disabled (MEDATTN_NO_BUILD=1)"
    return None


# Dispatch asks this inside code that torch.compile traces: evaluated once at trace time (it builds
# the extension on a first call, under locks dynamo cannot trace) and kept in the graph as a constant.
@torch.compiler.assume_constant_result
def unavailable_reason(kind: str, family: str) -> Optional[str]:
    """None when the extension is loaded (building it now if needed), else why it is not."""
    key = (kind, family)
    if key in _modules:
        return None
    if key in _failures:
        return _failures[key]
    with _mutex:
        if key in _modules:
            return None
        if key in _failures:
            return _failures[key]
        blocker = _blocker(kind, family)
        if blocker:
            _failures[key], fix = blocker
            if fix:
                _warn_once(kind, blocker[0], fix)
            return _failures[key]
        if os.environ.get("MEDATTN_NO_BUILD", "0") not in ("", "0"):
            _failures[key] = "building csrc is disabled (MEDATTN_NO_BUILD=1)"
            return _failures[key]
        try:
            _modules[key] = _build(kind, family)
            return None
        except Exception as exc:  # a compiler error (or an unwritable cache): warn once, fall back
            msg = str(exc)
            if len(msg) > 4000:
                msg = "...\n" + msg[-4000:]
            _failures[key] = f"the {kind} extension of {family} failed to build: {msg}"
            _warn_once(kind, f"building the {kind} extension of {family} failed",
                       f"a C++ compiler with OpenMP (g++) that supports {torch_cxx_standard()} (torch's standard) "
                       "on PATH and a writable build cache "
                       f"(MEDATTN_BUILD_DIR, now {build_dir()}); MEDATTN_NO_BUILD=1 turns the build off",
                       f". Compiler output:\n{msg}")
            return _failures[key]


def status_reason(kind: str) -> Optional[str]:
    """Never builds: None when every family of ``kind`` is loaded, else what is missing and why."""
    pre = _precondition(kind)
    if pre:
        return pre
    fams = families(kind)
    if not fams:
        return f"no {kind} kernels in {CSRC / kind}"
    parts = []
    for fam in fams:
        if (kind, fam) in _modules:
            parts.append(f"{fam}: built")
        elif (kind, fam) in _failures:
            parts.append(f"{fam}: {_failures[(kind, fam)]}")
        else:
            parts.append(f"{fam}: not built yet")
    if all(p.endswith(": built") for p in parts):
        return None
    return "; ".join(parts) + " (builds on first use, or ahead of time with `medattn-fast build`)"


def build_all() -> Dict[Key, Optional[str]]:
    """Build every extension this machine can build; (kind, family) -> None (ok) or why not."""
    out: Dict[Key, Optional[str]] = {}
    for kind in KINDS:
        pre = _precondition(kind)
        fams = families(kind)
        if pre or not fams:
            out[(kind, "*")] = pre or f"no {kind} kernels in {CSRC / kind}"
            continue
        for fam in fams:
            out[(kind, fam)] = unavailable_reason(kind, fam)
    return out

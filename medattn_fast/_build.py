"""Lazy JIT build of the csrc extensions (never at import time).

Two extensions: ``cpu`` (``csrc/cpu/*.cpp`` -> module ``medattn_cpu``) and ``cuda``
(``csrc/cuda/*.cu`` + ``*.cpp`` -> ``medattn_cuda``, only where torch has CUDA and nvcc exists).
They are compiled with ninja through ``torch.utils.cpp_extension.load`` on first use, into
``$MEDATTN_BUILD_DIR`` (default ``~/.cache/medattn_fast``) under a directory keyed by the torch,
CUDA and Python versions, so one cache serves several environments.

Locking: torch's own build lock is a plain file ("baton") that a killed build leaves behind, after
which every later build waits on it forever. We take an ``fcntl`` lock first — the kernel releases
it when its holder dies — and, holding it, delete any baton left by a dead build.

A failed build warns once with the compiler's message; the backend predicates then report the
failure and ``auto`` falls back to the ``torch`` backend.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_NAMES = {"cpu": "medattn_cpu", "cuda": "medattn_cuda"}

_modules: Dict[str, ModuleType] = {}
_failures: Dict[str, str] = {}
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


def sources(kind: str) -> List[Path]:
    if kind == "cpu":
        return sorted((CSRC / "cpu").glob("*.cpp"))
    if kind == "cuda":
        return sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))
    raise ValueError(f"kind: expected 'cpu' or 'cuda', got {kind!r}")


def _precondition(kind: str) -> Optional[str]:
    """Why ``kind`` cannot even be attempted here (None: it can)."""
    if not CSRC.is_dir():
        return f"csrc sources not found at {CSRC}"
    if kind == "cuda":
        if torch.version.cuda is None:
            return "this torch has no CUDA support, CUDA sources skipped"
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            return "CUDA toolkit (nvcc) not found, CUDA sources skipped"
    if not sources(kind):
        return f"no {kind} sources under {CSRC / kind}"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is not installed"
    return None


def _flags(kind: str) -> Dict[str, list]:
    cflags = ["-O3", "-std=c++17"]
    if sys.platform != "win32":
        cflags += ["-fopenmp"] if kind == "cpu" else []
    out = {"extra_cflags": cflags}
    if kind == "cpu" and sys.platform != "win32":
        out["extra_ldflags"] = ["-fopenmp"]
    if kind == "cuda":
        out["extra_cuda_cflags"] = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
    return out


def _build(kind: str) -> ModuleType:
    import fcntl

    from torch.utils.cpp_extension import load

    name = _NAMES[kind]
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
                sources=[str(s) for s in sources(kind)],
                build_directory=str(directory),
                extra_include_paths=[str(CSRC)],
                verbose=verbose,
                **_flags(kind),
            )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def load(kind: str) -> ModuleType:
    """The extension module ``kind`` ('cpu' or 'cuda'), building it on first use.

    Raises ``RuntimeError`` with the reason when it is unavailable.
    """
    reason = unavailable_reason(kind)
    if reason:
        raise RuntimeError(reason)
    return _modules[kind]


def unavailable_reason(kind: str) -> Optional[str]:
    """None when extension ``kind`` is loaded (building it now if needed), else why not."""
    if kind in _modules:
        return None
    if kind in _failures:
        return _failures[kind]
    with _mutex:
        if kind in _modules:
            return None
        if kind in _failures:
            return _failures[kind]
        pre = _precondition(kind)
        if pre:
            _failures[kind] = pre
            return pre
        if os.environ.get("MEDATTN_NO_BUILD", "0") not in ("", "0"):
            _failures[kind] = "building csrc is disabled (MEDATTN_NO_BUILD=1)"
            return _failures[kind]
        try:
            _modules[kind] = _build(kind)
            return None
        except Exception as exc:  # a compiler error: warn once, fall back
            msg = str(exc)
            if len(msg) > 4000:
                msg = "...\n" + msg[-4000:]
            _failures[kind] = f"the {kind} extension failed to build: {msg}"
            warnings.warn(
                f"medattn_fast: building the {kind} extension failed; the 'auto' backend falls back "
                f"to 'torch'. Compiler output:\n{msg}",
                RuntimeWarning,
                stacklevel=2,
            )
            return _failures[kind]


def status_reason(kind: str) -> Optional[str]:
    """Like :func:`unavailable_reason` but never builds: reports 'not built yet' instead."""
    if kind in _modules:
        return None
    if kind in _failures:
        return _failures[kind]
    pre = _precondition(kind)
    if pre:
        return pre
    return "not built yet (builds on first use, or ahead of time with `medattn-fast build`)"


def build_all() -> Dict[str, Optional[str]]:
    """Build every extension this machine can build; kind -> None (ok) or the reason it failed."""
    return {kind: unavailable_reason(kind) for kind in _NAMES}

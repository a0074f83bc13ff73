"""Backend choice and per-op dispatch.

Backends:

=============  ==========================================================================
``reference``  the original's math (``medattn_fast.reference``): slow, obvious, the oracle
``torch``      vectorised composite of PyTorch ops (memory-lean where it can be)
``triton``     fused Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
``cuda``       fused CUDA C++ kernels from ``csrc/cuda`` (built lazily)
``cpp``        fused C++ CPU kernels from ``csrc/cpu`` (built lazily)
=============  ==========================================================================

``auto`` (the default) picks, per op and per call, by measurement (``medattn_fast.autotune``): on
the first call for a key it times every backend of the op's order for the device that can run the
call (and the family's kernel variants) and keeps the fastest, in memory and on disk. With
``MEDATTN_AUTOTUNE=0``, under ``torch.compile`` and wherever timing is not allowed, it takes the first
backend of that static order that can run the call. Every backend of an op has a predicate returning the
reasons it cannot run a call; a forced backend that cannot run raises :class:`BackendUnavailable`
listing them, while ``auto`` falls through and logs them at DEBUG (a problem of the installation,
such as missing C++ sources or a failed build, is also warned about once by ``_build``).

Export. ONNX cannot carry our ``medattn::`` custom ops, so while ``torch.onnx.export`` runs
(``torch.onnx.is_in_onnx_export()``, true for the dynamo exporter) and inside :func:`portable`,
every op runs its ``export_backend``: a plain-ATen path with no Python loop over data-dependent
counts, which the exporter lowers to standard ONNX ops with symbolic batch and spatial sizes.
``torch.export.export`` on its own keeps the fused custom ops (loading such a program needs
``import medattn_fast`` first, which registers them).

Select with :func:`set_backend`, the context manager :func:`use_backend` or ``MEDATTN_BACKEND``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import autotune

log = logging.getLogger("medattn_fast")

BACKENDS = ("auto", "reference", "torch", "triton", "cuda", "cpp")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# The context variable wins over the process-wide choice, which wins over the environment.
_ctx_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("medattn_backend", default=None)
_global_backend: Optional[str] = None
_ctx_portable: contextvars.ContextVar[bool] = contextvars.ContextVar("medattn_portable", default=False)


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this call (or no backend can); the message lists why."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Select the backend for every later call in this process (``None`` restores the default)."""
    global _global_backend
    _global_backend = None if name is None else _check_name(name)


@torch.compiler.assume_constant_result  # dynamo cannot trace ContextVar.get: read it at trace time
def get_backend() -> str:
    """The backend in force: ``use_backend`` > ``set_backend`` > ``MEDATTN_BACKEND`` > ``auto``.

    Under ``torch.compile`` the choice is read once, when the graph is traced.
    """
    name = _ctx_backend.get() or _global_backend or os.environ.get("MEDATTN_BACKEND") or "auto"
    return _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed calls with backend ``name``."""
    token = _ctx_backend.set(_check_name(name))
    try:
        yield
    finally:
        _ctx_backend.reset(token)


@contextlib.contextmanager
def portable() -> Iterator[None]:
    """Context manager: every op runs its export-friendly plain-ATen path (see the module docstring).

    Automatic under ``torch.onnx.export``; use it around ``torch.export.export`` when the program
    goes on to a runtime that cannot load the ``medattn::`` custom ops (ONNX, TensorRT, ExecuTorch).
    """
    token = _ctx_portable.set(True)
    try:
        yield
    finally:
        _ctx_portable.reset(token)


@torch.compiler.assume_constant_result  # read once at trace time, like get_backend
def exporting_portable() -> bool:
    """True while ``torch.onnx.export`` runs or inside :func:`portable`."""
    return _ctx_portable.get() or torch.onnx.is_in_onnx_export()


# --------------------------------------------------------------------------------------------
# capability predicates: each returns a list of reasons the backend cannot run (empty: it can).
# They answer without building anything: a csrc extension is built when its backend first runs
# (Op.choose), and a failed build is then one of the reasons.
# --------------------------------------------------------------------------------------------

def _tensors(args: Sequence) -> List[torch.Tensor]:
    """The tensors among ``args``, looking into tuples and lists (a named bundle of weights such as
    the gate's ``GateParams``)."""
    out: List[torch.Tensor] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (tuple, list)):
            out.extend(_tensors(a))
    return out


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_import_reason() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def triton_reasons(*tensors: torch.Tensor) -> List[str]:
    """Why the Triton backend cannot run on these tensors ([] when it can)."""
    reasons = []
    r = triton_import_reason()
    if r:
        return [r]
    for t in _tensors(tensors):
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and triton_interpret():
            if t.dtype in (torch.float16, torch.float64):
                reasons.append(f"the Triton interpreter on CPU supports float32/bfloat16, got {t.dtype}")
            continue
        reasons.append(f"Triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {t.device}")
        break
    for t in _tensors(tensors):
        if t.is_floating_point() and t.dtype == torch.float64 and t.device.type == "cuda":
            reasons.append("the Triton kernels support float16/bfloat16/float32, got float64")
            break
    return sorted(set(reasons))


# the csrc kind each C++ backend's kernels come from (csrc/<kind>/<family>.*)
EXTENSION_KIND = {"cpp": "cpu", "cuda": "cuda"}


def _extension_reasons(backend: str, family: str, tensors) -> List[str]:
    kind = EXTENSION_KIND[backend]
    device_type = "cpu" if kind == "cpu" else "cuda"
    for t in _tensors(tensors):
        if t.device.type != device_type:
            return [f"the {backend} backend runs on {device_type.upper()} tensors, got device {t.device}"]
    from . import _build

    reason = _build.known_reason(kind, family)
    return [reason] if reason else []


def cpp_reasons(*tensors: torch.Tensor, family: str) -> List[str]:
    """Why the C++ CPU kernels of ``family`` cannot run on these tensors ([] when they can, as far
    as is known without building: an earlier failed build is a reason)."""
    return _extension_reasons("cpp", family, tensors)


def cuda_reasons(*tensors: torch.Tensor, family: str) -> List[str]:
    """Why the CUDA C++ kernels of ``family`` cannot run on these tensors (as :func:`cpp_reasons`)."""
    return _extension_reasons("cuda", family, tensors)


def always(*_args, **_kwargs) -> List[str]:
    return []


def device_predicate(backend: str, family: str) -> Callable[..., List[str]]:
    """A backend's reasons from its device and dtypes alone, over every tensor of the call: the
    predicate a backend gets unless it registers its own."""
    if backend == "triton":
        return lambda *args, **kwargs: triton_reasons(*args, *kwargs.values())
    if backend in EXTENSION_KIND:
        return lambda *args, **kwargs: _extension_reasons(backend, family, (*args, *kwargs.values()))
    return always


@dataclass(frozen=True)
class Limit:
    """A size past which a fused backend's kernels cannot run a call, declared once (in the table of
    op families, ``medattn_fast.ops._families``): dispatch asks it, ``medattn-fast info`` prints it.

    ``size(*args, **kwargs)`` reads the call's value from the dispatcher's arguments; ``maximum``
    is the largest the kernels take (their own constant, tested against it); ``why`` says what holds
    the value (registers, a grid axis ...)."""

    backend: str
    what: str
    maximum: int
    why: str
    size: Callable[..., int]

    def reasons(self, *args, **kwargs) -> List[str]:
        value = self.size(*args, **kwargs)
        return [] if value <= self.maximum else [f"{self.why}: {self.what} <= {self.maximum}, got {value}"]

    def describe(self) -> str:
        return f"{self.what} <= {self.maximum} ({self.why})"


# --------------------------------------------------------------------------------------------
# per-op dispatch
# --------------------------------------------------------------------------------------------

@dataclass
class _Impl:
    fn: Callable
    reasons: Callable[..., List[str]]


@dataclass
class Op:
    """One op's backends, configured by its row in the table of op families
    (``medattn_fast.ops._families``).

    ``auto_cpu``/``auto_cuda``: ``auto``'s static order: the candidates of the measured choice
    (``medattn_fast.autotune``), and the choice itself when the autotune is off. ``auto_order(*args,
    **kw)``, when set, may return another static order for one call (or None for the default).
    ``tune_key(*args, **kw)``: the family's part of the autotune key (a string), or None when this
    call must not be timed. ``tune_variants(backend, *args, **kw)``: kernel-config variants of
    ``backend`` timed as candidates of their own (tuples of (field, value) pairs; empty: none).
    ``export_backend``: the backend every call runs while exporting
    (:func:`exporting_portable`), whatever backend is in force: plain ATen ops only, no Python loop
    over a count that depends on the input's shape (it would bake the example's sizes into the
    graph). ``limits``: :class:`Limit`-like objects (``backend``, ``reasons(*args, **kw)``,
    ``describe()``) added to that backend's reasons. ``family``: where the kernels live
    (``csrc/<kind>/<family>.*``); the ``cpp``/``cuda`` extension is built when that backend first
    runs a call, in :meth:`choose` — never by a predicate.
    """

    name: str
    auto_cpu: Sequence[str] = ("cpp", "torch")
    auto_cuda: Sequence[str] = ("triton", "cuda", "torch")
    impls: Dict[str, _Impl] = field(default_factory=dict)
    auto_order: Optional[Callable[..., Optional[Sequence[str]]]] = None
    export_backend: str = "torch"
    family: str = ""
    limits: Sequence = ()
    tune_key: Optional[Callable[..., Optional[str]]] = None
    tune_variants: Optional[Callable[..., Sequence[Tuple[Tuple[str, object], ...]]]] = None

    def register(self, backend: str, reasons: Optional[Callable[..., List[str]]] = None):
        """Decorator: ``fn`` implements this op on ``backend``; ``reasons(*args, **kw)`` says why not
        (default: :func:`device_predicate`, the backend's device and dtype reasons)."""
        _check_name(backend)
        if reasons is None:
            reasons = device_predicate(backend, self.family or self.name)

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = _Impl(fn, reasons)
            return fn

        return deco

    def why_not(self, backend: str, *args, **kwargs) -> List[str]:
        """The reasons ``backend`` cannot run this call ([] when it can); builds nothing."""
        impl = self.impls.get(backend)
        if impl is None:
            return [f"{self.name} has no {backend} implementation"]
        reasons = list(impl.reasons(*args, **kwargs))
        for limit in self.limits:
            if limit.backend == backend:
                reasons += limit.reasons(*args, **kwargs)
        return reasons

    def available(self, *args, **kwargs) -> Dict[str, List[str]]:
        """Every backend of this op -> the reasons it cannot run this call ([] when it can)."""
        return {b: self.why_not(b, *args, **kwargs) for b in BACKENDS[1:]}

    def _prepare(self, backend: str) -> Optional[str]:
        """Makes ``backend`` ready to run (builds its csrc extension on its first call); None, or
        why it cannot (a failed build warns once, see ``_build``)."""
        kind = EXTENSION_KIND.get(backend)
        if kind is None or not self.family:
            return None
        from . import _build

        return _build.unavailable_reason(kind, self.family)

    def _ready(self, name: str, *args, **kwargs) -> List[str]:
        """The reasons ``name`` cannot run this call, after making it ready to run ([] when it can)."""
        reasons = self.why_not(name, *args, **kwargs)
        if not reasons:
            failed = self._prepare(name)
            reasons = [failed] if failed else []
        return reasons

    def static_order(self, *args, **kwargs) -> List[str]:
        """``auto``'s static order for this call: the device's order (or the ``auto_order`` hook's),
        then ``torch`` and ``reference`` as the last resorts."""
        tensors = _tensors(args) + _tensors(kwargs.values())
        on_cuda = any(t.device.type == "cuda" for t in tensors)
        order = list(self.auto_cuda if on_cuda else self.auto_cpu)
        if self.auto_order is not None:
            order = list(self.auto_order(*args, **kwargs) or order)
        for fallback in ("torch", "reference"):
            if fallback not in order:
                order.append(fallback)
        return [name for name in order if name in self.impls]

    def select(self, *args, backend: Optional[str] = None, **kwargs) -> autotune.Choice:
        """The backend (and kernel variant) that runs this call, made ready to run (see
        :meth:`_prepare`): the forced backend, the export backend, or ``auto``'s pick — measured
        (``medattn_fast.autotune``) or, with ``MEDATTN_AUTOTUNE=0``, the first of the static order
        that can run the call."""
        backend = _check_name(backend) if backend is not None else get_backend()
        if exporting_portable():
            if backend not in ("auto", self.export_backend):
                log.debug("%s: exporting, runs %s instead of %s", self.name, self.export_backend, backend)
            return autotune.Choice(self.export_backend)
        if backend != "auto":
            reasons = self.why_not(backend, *args, **kwargs)
            failed = None if reasons else self._prepare(backend)
            if reasons or failed:
                raise BackendUnavailable(
                    f"{self.name}: backend {backend!r} cannot run this call: " + "; ".join(reasons or [failed])
                )
            return autotune.Choice(backend)
        order = self.static_order(*args, **kwargs)
        tried = []
        for position, name in enumerate(order):
            reasons = self._ready(name, *args, **kwargs)
            if not reasons:
                break
            log.debug("%s: auto skips %s: %s", self.name, name, "; ".join(reasons))
            tried.append(f"{name}: " + "; ".join(reasons))
        else:
            raise BackendUnavailable(f"{self.name}: no backend can run this call:\n  " + "\n  ".join(tried))
        static = autotune.Choice(name)
        if name == "reference" or torch.compiler.is_compiling() or not autotune.enabled():  # never traced
            return static
        if sum(other != "reference" for other in order[position:]) < 2:     # nothing to choose between
            return static
        extra = self.tune_key(*args, **kwargs) if self.tune_key is not None else ""
        if extra is None:
            return static

        def candidates() -> List[autotune.Choice]:
            """Every choice of the static order that can run this call (the static pick first), but reference."""
            out = []
            for other in order[position:]:
                if other == "reference" or (other != name and self._ready(other, *args, **kwargs)):
                    continue
                variants = self.tune_variants(other, *args, **kwargs) if self.tune_variants is not None else ()
                out += [autotune.Choice(other, v) for v in variants] or [autotune.Choice(other)]
            return out

        def can_run(choice: autotune.Choice) -> bool:
            return choice.backend in self.impls and choice.backend != "reference" \
                and not self._ready(choice.backend, *args, **kwargs)

        return autotune.choose(self, candidates, static, args, kwargs, extra=extra, can_run=can_run)

    def choose(self, *args, backend: Optional[str] = None, **kwargs) -> str:
        """The backend that runs this call, made ready to run (see :meth:`select`)."""
        return self.select(*args, backend=backend, **kwargs).backend

    def runner(self, choice: autotune.Choice) -> Callable:
        """``choice``'s implementation, run under its kernel variant (if it has one, for the fields
        the user did not set: see ``kernel_config.explicitly_set``)."""
        fn = self.impls[choice.backend].fn
        if not choice.variant:
            return fn

        def run(*args, **kwargs):
            import dataclasses

            from .kernel_config import explicitly_set, kernel_config, use_kernel_config

            # a field the user set (a cached pick measured before they did) keeps the user's value
            variant = {k: v for k, v in choice.variant if not explicitly_set(k)}
            if not variant:
                return fn(*args, **kwargs)
            with use_kernel_config(dataclasses.replace(kernel_config(), **variant)):
                return fn(*args, **kwargs)

        return run

    def __call__(self, *args, backend: Optional[str] = None, **kwargs):
        choice = self.select(*args, backend=backend, **kwargs)
        picks = None if torch.compiler.is_compiling() else _ctx_auto_picks.get()   # dynamo cannot trace .get
        if picks is not None and (backend or get_backend()) == "auto":
            picks[self.name] = choice.label
        return self.runner(choice)(*args, **kwargs)

    def describe(self) -> Dict[str, object]:
        """This op's row as ``medattn-fast info`` prints it."""
        def first_line(fn) -> Optional[str]:
            return (fn.__doc__ or fn.__name__).strip().splitlines()[0] if fn is not None else None

        return {"family": self.family, "backends": [b for b in BACKENDS[1:] if b in self.impls],
                "auto on CPU": list(self.auto_cpu), "auto on CUDA": list(self.auto_cuda),
                "auto": "measured (autotune)" if autotune.enabled() else "static order (MEDATTN_AUTOTUNE=0)",
                "per-call order": first_line(self.auto_order), "autotune key": first_line(self.tune_key),
                "autotune variants": first_line(self.tune_variants),
                "export": self.export_backend,
                "limits": [f"{limit.backend}: {limit.describe()}" for limit in self.limits]}


_ctx_auto_picks: contextvars.ContextVar[Optional[Dict[str, str]]] = contextvars.ContextVar("medattn_auto_picks",
                                                                                           default=None)


@contextlib.contextmanager
def recording_auto_picks() -> Iterator[Dict[str, str]]:
    """Context manager yielding a dict that fills, op name -> backend, with what ``auto`` ran for
    each op called inside (the last call's pick per op): how a benchmark row says what ``auto`` chose."""
    picks: Dict[str, str] = {}
    token = _ctx_auto_picks.set(picks)
    try:
        yield picks
    finally:
        _ctx_auto_picks.reset(token)


def autocast_entry(cast: bool = True):
    """Decorator for an op's public function: its behaviour under AMP autocast.

    Like ``F.scaled_dot_product_attention``, the op's floating tensor arguments but float64 ones
    (float32, and float16 under a bfloat16 autocast or the reverse, as autocast casts them for a
    matmul) are cast to the autocast dtype (``cast=False``: left as they are, for an op that
    handles mixed dtypes itself, e.g. the gate's float32 BatchNorm state); then validation and
    the backend run with autocast off, so the backend keeps its own precision policy (float32
    accumulation) — a C++ kernel's inner ATen matmuls must not silently turn bfloat16. Applied
    before validation, so the checks see the dtypes the backend will get.
    """

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            tensors = _tensors(args) + _tensors(kwargs.values())
            device_type = tensors[0].device.type if tensors else "cpu"
            if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
                return fn(*args, **kwargs)
            if cast:
                dtype = torch.get_autocast_dtype(device_type)
                args = tuple(_autocast_cast(a, dtype) for a in args)
                kwargs = {k: _autocast_cast(v, dtype) for k, v in kwargs.items()}
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def _autocast_cast(value, dtype: torch.dtype):
    """Floating tensors to the autocast dtype, as autocast casts a matmul's arguments: float64 and
    non-float tensors are left alone. A float16 tensor under a bfloat16 autocast is cast too: the
    module's convs/linears already turned its other arguments bfloat16 (left as it was, it met
    them in a dtype mismatch where the original module runs)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64 \
            and value.dtype != dtype:
        return value.to(dtype)
    return value


_OPS: Dict[str, Op] = {}


def op(name: str, **kw) -> Op:
    """The dispatcher of op family ``name`` (created on first use)."""
    if name not in _OPS:
        _OPS[name] = Op(name, **kw)
    return _OPS[name]


def registered_ops() -> Dict[str, Op]:
    return dict(_OPS)


# --------------------------------------------------------------------------------------------
# info()
# --------------------------------------------------------------------------------------------

def info(build: bool = False) -> Dict[str, object]:
    """Versions, device, which backends are available (with the reasons they are not), and every
    op's row of the table of families (``ops``: its backends, ``auto``'s orders, export backend,
    limits).

    ``build=False`` reports a csrc extension that was never built as "not built yet" instead of
    building it (a build takes tens of seconds).
    """
    from . import _build

    out: Dict[str, object] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as exc:  # pragma: no cover
        out["triton"] = f"unavailable ({exc})"
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out["backend"] = get_backend()
    backends: Dict[str, str] = {"reference": "available", "torch": "available"}
    r = triton_import_reason()
    if r:
        backends["triton"] = r
    elif torch.cuda.is_available():
        backends["triton"] = "available (CUDA)"
    elif triton_interpret():
        backends["triton"] = "available (CPU interpreter, TRITON_INTERPRET=1)"
    else:
        backends["triton"] = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    if build:
        _build.build_all()
    for kind, name in (("cpu", "cpp"), ("cuda", "cuda")):
        reason = _build.status_reason(kind)
        backends[name] = reason or "available (" + ", ".join(_build.families(kind)) + ")"
    out["backends"] = backends
    out["build_dir"] = str(_build.build_dir())
    out["ops"] = {name: op.describe() for name, op in sorted(_OPS.items())}
    return out

"""No op of the package synchronises with the host in a training step (forward + loss + backward),
for every model and every op family, so that a whole step can be captured as a CUDA graph
(``torch.cuda.graphs``, ``torch.compile(mode="reduce-overhead")``): MT-UNet's ops launch a few µs of
work each and only a captured step hides the launch latency.

On a CPU there is no CUDA synchronisation to observe, so the test watches the entry points through
which Python code makes the host wait for a device value, while one training step runs:

* the Tensor methods that copy a value to the host: ``item``, ``tolist``, ``numpy``, ``cpu`` (a no-op
  on a CPU tensor, flagged all the same: on CUDA it copies), ``to`` a CPU device from another
  device, and ``__bool__``/``__int__``/``__float__``/``__index__``/``__complex__`` of a tensor — a
  Python branch or a size taken from tensor values (``if (x > 0).any():``, ``range(t)``);
* data-dependent shapes, whose size the host must read back: ``nonzero``, ``masked_select``,
  ``unique``, ``torch.where`` with one argument, ``repeat_interleave`` without ``output_size``;
* at the ATen level (a :class:`TorchDispatchMode`), ``aten._local_scalar_dense`` (what every scalar
  read dispatches to, also from C++) and the data-dependent ops above, for the ops called outside
  the custom ops' own bodies.

The Tensor methods are wrapped on the class for the duration of the step, so they are seen inside
the custom ops' kernels and in their backward too (a dispatch mode is not active inside a custom
op's implementation). Calls made by the Triton interpreter (it copies every tensor argument to a
NumPy array to run the kernel on the CPU; on a GPU the launch passes pointers) are not counted,
nor the ``item<double>()`` with which the ``cpp`` backend's C++ kernels read a CPU scalar argument
(γ, θ, ψ's bias: a load from host memory in a CPU-only backend, never part of a CUDA graph; see
``_in_cpu_kernel``). On a CUDA device, ``test_gpu_model_training_step_has_no_cuda_sync`` adds
CUDA's own check, ``torch.cuda.set_sync_debug_mode("error")``.

A step runs once unwatched and then watched: a first call may measure or build (the autotune's
timing, an extension's lazy build), and a captured step is always warmed up first. Steps forced to
the Triton kernels under the interpreter (nothing to build or measure there, and slow) are watched
from their first call. A failure lists every call site with a short traceback.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import medattn_fast
import medattn_fast.functional as MF
from medattn_fast import models

_PACKAGE_DIR = os.path.dirname(os.path.abspath(medattn_fast.__file__))
_REPO_DIR = os.path.dirname(_PACKAGE_DIR)
# the running interpreter's own folders (a virtual environment may sit inside the checkout)
_PREFIXES = tuple(sorted({os.path.join(p, "") for p in (sys.prefix, sys.exec_prefix, sys.base_prefix)}))
_TRITON_INTERPRETER = os.path.join("triton", "runtime", "interpreter.py")

# Tensor methods that read device values on the host (each a synchronisation on CUDA).
_HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__complex__")
# Tensor methods and torch functions whose output shape depends on tensor values.
_DATA_DEPENDENT = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive")
_ATEN_SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten._unique2",
               "aten.unique_dim", "aten.unique_consecutive", "aten.repeat_interleave.Tensor", "aten.argwhere")
# Indexing with a boolean mask (``x[x > 0]``) runs nonzero on the mask.
_ATEN_INDEXING = ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_")


def _ours(filename: str) -> bool:
    """Whether ``filename`` is one of this repository's files: under its folder, but neither in an
    installed package (a virtual environment inside the checkout, as CI makes one) nor a test of
    this file."""
    return (filename.startswith(_REPO_DIR) and "test_no_host_sync" not in filename
            and os.sep + "site-packages" + os.sep not in filename and os.sep + "dist-packages" + os.sep not in filename
            and not filename.startswith(_PREFIXES))


def _call_site(stack: Sequence[traceback.FrameSummary]) -> str:
    """The last frames of ``stack`` that belong to this repository (package or kernels), or the
    last frames overall when none does."""
    ours = [f for f in stack if _ours(f.filename)]
    frames = ours[-4:] if ours else list(stack)[-4:]
    return " <- ".join(f"{os.path.relpath(f.filename, _REPO_DIR) if f.filename.startswith(_REPO_DIR) else f.filename}"
                       f":{f.lineno} {f.name}" for f in reversed(frames))


class HostSyncRecorder(TorchDispatchMode):
    """Records every host-sync entry point met while active (see the module docstring):
    ``events`` is a list of (what, call site)."""

    def __init__(self):
        super().__init__()
        self.events: List[Tuple[str, str]] = []
        self.cpu_kernel_reads = 0   # scalar reads by the C++ CPU kernels (see _in_cpu_kernel)
        self._saved: Dict[Tuple[object, str], object] = {}
        self._busy = False

    def _record(self, what: str) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            stack = traceback.extract_stack()[:-2]
            if any(_TRITON_INTERPRETER in f.filename for f in stack):
                return   # the interpreter's own copies to NumPy (a GPU launch passes pointers)
            self.events.append((what, _call_site(stack)))
        finally:
            self._busy = False

    def _wrap(self, owner, name: str, when: Callable[..., bool] = lambda *a, **k: True) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        self._saved[(owner, name)] = original
        recorder = self

        def watched(*args, **kwargs):
            if when(*args, **kwargs):
                recorder._record(f"{getattr(owner, '__name__', owner)}.{name}")
            return original(*args, **kwargs)

        setattr(owner, name, watched)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        full = str(func)
        if name in _ATEN_SYNCS or full in _ATEN_SYNCS:
            if name == "aten._local_scalar_dense" and args[0].device.type == "cpu" and _in_cpu_kernel():
                self.cpu_kernel_reads += 1
            else:
                self._record(full)
        elif name in _ATEN_INDEXING and _boolean_index(args[1] if len(args) > 1 else ()):
            self._record(f"{full} with a boolean mask")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in _HOST_READS + _DATA_DEPENDENT:
            self._wrap(torch.Tensor, name)
        for name in _DATA_DEPENDENT:
            self._wrap(torch, name)
        self._wrap(torch, "where", when=lambda *a, **k: len(a) + len(k) == 1)
        self._wrap(torch.Tensor, "repeat_interleave", when=lambda self_, repeats, *a, **k:
                   isinstance(repeats, torch.Tensor) and k.get("output_size") is None)
        self._wrap(torch.Tensor, "to", when=_moves_to_cpu)
        self._wrap(torch.Tensor, "__getitem__", when=lambda self_, index: _boolean_index(index))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for (owner, name), original in self._saved.items():
                setattr(owner, name, original)
            self._saved.clear()

    def report(self) -> str:
        counts: Dict[Tuple[str, str], int] = {}
        for event in self.events:
            counts[event] = counts.get(event, 0) + 1
        return "\n".join(f"  {what} ×{n}: {site}" for (what, site), n in counts.items())


_CPU_BACKEND_FILE = re.compile(r"medattn_fast[/\\]ops[/\\]_\w+_cpp\.py$")


def _in_cpu_kernel() -> bool:
    """Whether the innermost frame of this repository on the stack is a ``cpp`` backend's file
    (``ops/_<family>_cpp.py``): its C++ kernel reads a scalar argument (γ, θ, ψ's bias) with
    ``item<double>()``. The ``cpp`` backend runs CPU tensors only and is never part of a CUDA graph;
    reading a CPU tensor's value is a load from host memory, not a wait for a device."""
    ours = [f.filename for f in traceback.extract_stack() if _ours(f.filename)]
    return bool(ours) and _CPU_BACKEND_FILE.search(ours[-1]) is not None


def _boolean_index(index) -> bool:
    """An index (a tensor, or a tuple/list of indices) holding a boolean or uint8 mask tensor."""
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


def _moves_to_cpu(tensor, *args, **kwargs) -> bool:
    """``tensor.to(...)`` to the CPU from another device, or to an explicit ``"cpu"``."""
    target = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            target = a
    if target is None:
        return False
    if isinstance(target, str):
        if target == "cpu":
            return True
        target = torch.device(target)
    return target.type == "cpu" and tensor.device.type != "cpu"


@contextlib.contextmanager
def no_host_sync(what: str) -> Iterator[HostSyncRecorder]:
    """Fails the test with every call site if the enclosed code synchronises with the host."""
    recorder = HostSyncRecorder()
    with recorder:
        yield recorder
    assert not recorder.events, f"{what}: {len(recorder.events)} host synchronisation(s):\n{recorder.report()}"


def _watched_twice(what: str, step: Callable[[], None], warm_up: bool = True) -> None:
    """``step()`` once unwatched (warm-up: builds, measurements), then once under :func:`no_host_sync`.
    ``warm_up=False``: the first call is watched (a forced Triton backend has nothing to build or
    measure on a CPU, and the interpreter is slow)."""
    if warm_up:
        step()
    with no_host_sync(what):
        step()


# ---------------------------------------------------------------------------------------------
# the detector itself
# ---------------------------------------------------------------------------------------------
class _SyncsOnce(torch.nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.weight = torch.nn.Parameter(torch.randn(3))

    def forward(self, x):
        y = x * self.weight
        if self.how == "item":
            return y * y.sum().item()
        if self.how == "branch":
            return y * 2 if (y > 0).any() else y
        if self.how == "nonzero":
            return y[y > 0].sum() + y
        if self.how == "cpu":
            return y.cpu() * 2
        if self.how == "backward":
            return _ReadsInBackward.apply(y)
        if self.how == "custom_op":
            return _scaled_by_its_max(y)
        return y


class _ReadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y * 1

    @staticmethod
    def backward(ctx, grad):
        return grad * float(grad.abs().max())


@torch.library.custom_op("medattn_test::scaled_by_its_max", mutates_args=())
def _scaled_by_its_max(y: torch.Tensor) -> torch.Tensor:
    """A custom op whose body reads a value on the host (as a kernel launcher might)."""
    return y * y.abs().max().tolist()


_scaled_by_its_max.register_fake(lambda y: torch.empty_like(y))
_scaled_by_its_max.register_autograd(lambda ctx, grad: grad)


@pytest.mark.parametrize("how", ["item", "branch", "nonzero", "cpu", "backward", "custom_op"])
def test_detector_catches_a_sync(how):
    """Each kind of host sync, in forward or in backward, fails the check and names its line."""
    module = _SyncsOnce(how)
    x = torch.randn(4, 3)
    with pytest.raises(AssertionError, match="host synchronisation") as failure:
        with no_host_sync(how):
            module(x).sum().backward()
    assert "test_no_host_sync.py" in str(failure.value), str(failure.value)


def test_detector_passes_a_step_without_sync():
    module = _SyncsOnce("none")
    with no_host_sync("none"):
        module(torch.randn(4, 3)).sum().backward()
    assert module.weight.grad is not None


def test_detector_leaves_tensor_methods_as_they_were():
    before = {name: getattr(torch.Tensor, name) for name in _HOST_READS + ("to", "repeat_interleave")}
    with pytest.raises(AssertionError):
        with no_host_sync("restore"):
            torch.ones(1).item()
    assert {name: getattr(torch.Tensor, name) for name in before} == before


# ---------------------------------------------------------------------------------------------
# every model's training step
# ---------------------------------------------------------------------------------------------
def _segmentation_step(model: torch.nn.Module, x: torch.Tensor, classes: int) -> Callable[[], None]:
    target = torch.randint(0, classes, (x.shape[0],) + tuple(x.shape[2:]), device=x.device)
    loss_of = getattr(model, "losses", None)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        if isinstance(out, torch.Tensor):
            loss = F.cross_entropy(out, target)
        else:   # MSGANet: deep supervision, the model's own objective
            loss = loss_of(out, target)["total"]
        loss.backward()

    return step


# (name, constructor, input shape): the models of medattn_fast.models at the smallest sizes their
# strides allow, with every attention block the model has switched on.
MODELS = {
    "attention_unet_2d": (lambda: models.AttentionUNet(2, 2, 3, channels=(4, 8, 16), strides=(2, 2)), (2, 2, 12, 8)),
    "attention_unet_3d": (lambda: models.AttentionUNet(3, 1, 2, channels=(4, 8), strides=(2,)), (1, 1, 4, 6, 4)),
    "daunet": (lambda: models.DAUNet(2, 2, 3, channels=(8, 16, 32), strides=(2, 2),
                                     attention_at=("bottleneck", "skip-1"), attention_reduction=2), (2, 2, 12, 8)),
    "cross_attention_unet": (lambda: models.CrossAttentionUNet(2, 2, 3, channels=(4, 8, 16), strides=(2, 2), heads=2,
                                                               se_reduction=4), (2, 2, 12, 8)),
    "msganet": (lambda: models.MSGANet(1, 3, 8, backbone_widths=(8, 8, 16, 16), backbone_depths=(1, 1, 1, 1)),
                (2, 1, 32, 32)),
    "mtunet": (lambda: models.MTUNet(1, 3, base_channels=4, num_heads=4), (2, 1, 32, 32)),
}


def _model_step(name: str) -> Callable[[], None]:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().train()
    classes = 2 if name == "attention_unet_3d" else 3
    return _segmentation_step(model, torch.randn(shape), classes)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_training_step_has_no_host_sync(name):
    """Forward + loss + backward of every model on ``auto`` (on a CPU: the cpp kernels where they
    run, else torch), after one warm-up step."""
    step = _model_step(name)
    with medattn_fast.use_backend("auto"):
        _watched_twice(f"{name} training step on auto", step)


# Under the interpreter a Triton training step of MT-UNet takes minutes (external attention's
# kernels alone ~2 min at 32²), MSGANet's ~1 min: on a CPU the light models run here, and every
# op family runs its Triton kernels below; test_gpu_model_training_step_has_no_cuda_sync runs them all.
@pytest.mark.parametrize("name", ["attention_unet_2d", "attention_unet_3d"])
def test_model_training_step_on_triton_has_no_host_sync(name):
    step = _model_step(name)
    with medattn_fast.use_backend("triton"), no_host_sync(f"{name} training step on triton"):
        step()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_gpu_model_training_step_has_no_cuda_sync(name, backend):
    """On a CUDA device, every model's step on ``auto`` and on the Triton kernels, watched twice:
    by the recorder and by CUDA's own sync check (``torch.cuda.set_sync_debug_mode("error")``
    raises at any operation that waits for the device)."""
    from _tolerance import gpu_device, require_cuda_device

    require_cuda_device("CUDA's sync check (and the Triton kernels at speed: minutes per model interpreted)")
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().train().to(gpu_device())
    step = _segmentation_step(model, torch.randn(shape, device=gpu_device()), 2 if name == "attention_unet_3d" else 3)
    with medattn_fast.use_backend(backend):
        step()
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with no_host_sync(f"{name} training step on {backend} (CUDA)"):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)


# ---------------------------------------------------------------------------------------------
# every op family directly, on each backend that runs on a CPU
# ---------------------------------------------------------------------------------------------
def _with_random_scalars(module: torch.nn.Module) -> torch.nn.Module:
    """γ starts at 0 in DANet's modules: a random γ so that every gradient path carries values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.randn_like(p))
    return module


def _gaussian_from_scores(x):
    b, h, w, d = x.shape
    atten_x = torch.einsum("bhwd,bhjd->bhwj", x, x)
    atten_y = torch.einsum("bhwd,biwd->bwhi", x, x)
    return MF.gaussian_axial_from_scores(atten_x, atten_y, x * 2, _SHIFT)


_SHIFT = torch.nn.Parameter(torch.tensor([0.3]))

# family -> (module or function of one input, input shape, backends with a fused or torch kernel on a CPU)
FAMILIES = {
    "position": (lambda: _with_random_scalars(medattn_fast.nn.PositionAttention(8, reduction=4)), (2, 8, 5, 3),
                 ("torch", "cpp", "triton")),
    "channel": (lambda: _with_random_scalars(medattn_fast.nn.ChannelAttention()), (2, 6, 5, 3),
                ("torch", "cpp", "triton")),
    "gaussian_axial": (lambda: medattn_fast.nn.GaussianAxialAttention(8), (2, 3, 5, 8), ("torch", "cpp", "triton")),
    "gaussian_axial_from_scores": (lambda: _gaussian_from_scores, (2, 3, 5, 4), ("torch", "cpp", "triton")),
    "window": (lambda: medattn_fast.nn.WindowAttention(8, num_heads=2, window_size=2), (2, 3, 5, 8),
               ("torch", "triton")),
    "external": (lambda: medattn_fast.nn.ExternalAttention(8, num_heads=2, memory_size=8, expansion=2), (2, 7, 8),
                 ("torch", "triton")),
}
GATES = {   # (x, g) shapes; training mode: batch-statistics BatchNorms
    "additive_2d": (dict(spatial_dims=2), (2, 4, 6, 5), (2, 6, 3, 3)),
    "additive_3d": (dict(spatial_dims=3), (2, 4, 4, 3, 5), (2, 6, 2, 2, 3)),
    "grid_2d": (dict(spatial_dims=2, mode="grid"), (2, 4, 6, 6), (2, 6, 3, 3)),
}


@pytest.mark.parametrize("family,backend", [(f, b) for f, (_, _, backends) in FAMILIES.items() for b in backends])
def test_op_family_has_no_host_sync(family, backend):
    build, shape, _ = FAMILIES[family]
    torch.manual_seed(0)
    module = build()
    x = torch.randn(shape, requires_grad=True)
    cotangent = None

    def step():
        nonlocal cotangent
        out = module(x)
        cotangent = torch.randn_like(out) if cotangent is None else cotangent
        out.backward(cotangent)

    with medattn_fast.use_backend(backend):
        _watched_twice(f"{family} on {backend}", step, warm_up=backend != "triton")
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("gate", sorted(GATES))
def test_attention_gate_has_no_host_sync(gate, backend):
    options, x_shape, g_shape = GATES[gate]
    torch.manual_seed(0)
    module = medattn_fast.nn.AttentionGate(x_shape[1], g_shape[1], 3, **options).train()
    x, g = torch.randn(x_shape, requires_grad=True), torch.randn(g_shape, requires_grad=True)

    def step():
        out = module(x, g)
        out.backward(torch.ones_like(out))

    with medattn_fast.use_backend(backend):
        _watched_twice(f"attention gate {gate} on {backend}", step, warm_up=backend != "triton")
    assert g.grad is not None and torch.isfinite(g.grad).all()


def test_channel_16bit_gemm_path_has_no_host_sync():
    """Channel attention's cuBLAS candidate (``KernelConfig(channel_gemm="16bit")`` on ``torch``)."""
    module = _with_random_scalars(medattn_fast.nn.ChannelAttention()).bfloat16()
    x = torch.randn(2, 6, 5, 3).bfloat16().requires_grad_(True)

    def step():
        module(x).float().square().sum().backward()

    with medattn_fast.use_backend("torch"), medattn_fast.use_kernel_config(medattn_fast.KernelConfig(
            channel_gemm="16bit")):
        _watched_twice("channel 16-bit GEMMs on torch", step)
    assert torch.isfinite(x.grad).all()

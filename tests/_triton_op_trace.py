r"""The Triton backends' custom ops are ``torch.library.triton_op``s whose kernel launches
torch.compile traces into its graph (inductor then sees and schedules the kernels), checked on a
machine without a GPU.

Run as ``python -m tests._triton_op_trace`` with the interpreter off (tests/test_triton_op_trace.py
does, in a subprocess): the kernels are then JIT functions, ``torch.library.wrap_triton`` wraps their
launches, and the offline sm_90 driver of tests/_sm90_compile.py gives Triton the target it needs
to analyse them (nothing is launched). Each family's public function, forced to ``triton``, forward
and backward (``torch.autograd.grad``), is traced the way AOTAutograd traces it — functionalised
(``dispatch_functionalize``) on fake tensors (``make_fx``) — and its graph must hold the kernels as
``triton_kernel_wrapper_functional`` nodes and no opaque ``medattn::*_triton_*`` op. Under the
interpreter (the CPU suite) the same ops are plain custom ops: see
``medattn_fast.ops._custom_op.traceable_triton`` for why.

Prints one line per family, ``ok   <family>: <n> kernel launches traced`` or ``FAIL <family>: ...``.
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)   # before triton_kernels is imported

import torch  # noqa: E402

from tests._sm90_compile import _install  # noqa: E402


def _leaf(*shape):
    return torch.randn(*shape, requires_grad=True)


def _cases():
    import medattn_fast.functional as MF

    def channel():
        x, gamma = _leaf(2, 7, 5, 3), _leaf(1)
        return MF.channel_attention(x, gamma=gamma, residual=x, backend="triton"), (x, gamma)

    def gaussian_axial():
        q, k, v, shift = _leaf(2, 3, 5, 8), _leaf(2, 3, 5, 8), _leaf(2, 3, 5, 8), _leaf(1)
        return MF.gaussian_axial_attention(q, k, v, shift, backend="triton"), (q, k, v, shift)

    def gaussian_axial_from_scores():
        ax, ay, v, shift = _leaf(2, 3, 5, 5), _leaf(2, 5, 3, 3), _leaf(2, 3, 5, 8), _leaf(1)
        return MF.gaussian_axial_from_scores(ax, ay, v, shift, backend="triton"), (ax, ay, v, shift)

    def window():
        x = _leaf(2, 5, 6, 8)
        weights = [_leaf(8, 8) if i % 2 == 0 else _leaf(8) for i in range(8)]
        return MF.window_attention(x, *weights, window_size=2, num_heads=2, backend="triton"), (x, *weights)

    def external():
        x, wq, bq = _leaf(2, 7, 8), _leaf(8, 8), _leaf(8)
        mk, bk, mv, bv = _leaf(4, 4), _leaf(4), _leaf(4, 4), _leaf(4)
        wo, bo = _leaf(8, 8), _leaf(8)
        leaves = (x, wq, bq, mk, bk, mv, bv, wo, bo)
        return MF.external_attention(*leaves, num_heads=2, backend="triton"), leaves

    return {"channel": channel, "gaussian_axial": gaussian_axial,
            "gaussian_axial_from_scores": gaussian_axial_from_scores, "window": window, "external": external}


def trace(case):
    """The functionalised fake-tensor graph of ``case``'s forward and backward."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(seed):
        out, leaves = case()
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out) * seed, allow_unused=True)
        return out, [g for g in grads if g is not None]

    return make_fx(dispatch_functionalize(step), tracing_mode="fake")(torch.tensor(1.0))


def main() -> int:
    from medattn_fast.ops._custom_op import traceable_triton

    if not traceable_triton():
        print("FAIL: torch.library.triton_op/wrap_triton unavailable, or the interpreter is on")
        return 1
    _install()
    failures = 0
    for family, case in _cases().items():
        try:
            graph = trace(case)
        except Exception as exc:   # report every family
            print(f"FAIL {family}: {type(exc).__name__}: {exc}")
            failures += 1
            continue
        targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
        launches = sum("triton_kernel_wrapper_functional" in t for t in targets)
        opaque = sorted({t for t in targets if t.startswith("medattn.")})
        if launches == 0 or opaque:
            print(f"FAIL {family}: {launches} kernel launches traced, opaque ops {opaque}")
            failures += 1
        else:
            print(f"ok   {family}: {launches} kernel launches traced")
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

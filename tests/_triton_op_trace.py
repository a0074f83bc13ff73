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

Position attention is traced in three variants (separate and fused backward, transposed with
channel-first tensors) and the attention gate in three (additive in training with batch statistics,
additive in eval, grid); for these the launched kernels must be exactly those of the variant
(``EXPECTED_KERNELS``), and the tensors their launches are found to write must be results, not
inputs (``WRITTEN``; functionalisation copies whatever a launch writes). These six cases are also
run through the real entry point, ``torch.compile(fullgraph=True)`` of the public function (Dynamo,
then AOTAutograd with a backend that keeps its forward and backward graphs, run as traced: the
offline driver skips the launches), with the same checks on those graphs (``<case> compiled``).

Prints one line per case, ``ok   <case>: <n> kernel launches traced (<kernels>)`` or ``FAIL <case>: ...``.
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)   # before triton_kernels is imported

import torch  # noqa: E402

from tests._sm90_compile import _install  # noqa: E402


def _leaf(*shape):
    return torch.randn(*shape, requires_grad=True)


def _cases(compile_backend=None):
    """The cases by name: each returns ``(output, leaves)``. With ``compile_backend``, the position
    and gate cases call their public function through ``torch.compile(fullgraph=True)`` on it."""
    import medattn_fast
    import medattn_fast.functional as MF

    def op(fn):
        return fn if compile_backend is None else torch.compile(fn, backend=compile_backend, fullgraph=True)

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

    def position():
        # DANet's γ·o + x: the forward kernel, then _grad_out, the dv column kernel, dq and dk
        q, k, v, gamma = _leaf(2, 9, 8), _leaf(2, 7, 8), _leaf(2, 7, 12), _leaf(1)
        residual = _leaf(2, 9, 12)
        return (op(MF.position_attention)(q, k, v, gamma=gamma, residual=residual, backend="triton"),
                (q, k, v, gamma, residual))

    def position_fused_backward():
        # dq by atomics inside the dk kernel (KernelConfig(position_backward="fused"))
        q, k, v, gamma = _leaf(2, 9, 8), _leaf(2, 7, 8), _leaf(2, 7, 12), _leaf(1)
        with medattn_fast.use_kernel_config(medattn_fast.KernelConfig(position_backward="fused")):
            return op(MF.position_attention)(q, k, v, gamma=gamma, residual=q.new_zeros(2, 9, 12),
                                             backend="triton"), (q, k, v, gamma)

    def position_transpose():
        # V @ A, channel-first, o ⊙ f: the row statistics and column kernels forward, _row_kernel backward
        q, k, v, multiply = _leaf(2, 8, 9), _leaf(2, 8, 7), _leaf(2, 12, 9), _leaf(2, 12, 7)
        out = op(MF.position_attention)(q, k, v, transpose=True, layout="channels", multiply=multiply, scale=0.3,
                                        backend="triton")
        return out, (q, k, v, multiply)

    def _gate_leaves(cx, cg, ci, kernel=1):
        wx = _leaf(ci, cx, kernel, kernel)
        return wx, _leaf(ci), _leaf(ci, cg, 1, 1), _leaf(ci), _leaf(1, ci, 1, 1), _leaf(1)

    def _bn(channels):
        return MF.BatchNormParams(_leaf(channels), _leaf(channels), torch.zeros(channels), torch.ones(channels),
                                  torch.zeros((), dtype=torch.long))

    def attention_gate_train():
        # batch statistics: the logits kernel, ψ's BN between, the backward kernel (dot variant, Ci = 16)
        x, g = _leaf(2, 16, 6, 5), _leaf(2, 8, 3, 3)
        weights = _gate_leaves(16, 8, 16)
        out = op(MF.attention_gate)(x, g, *weights, bn_x=_bn(16), bn_g=_bn(16), bn_psi=_bn(1), training=True,
                                    backend="triton")
        return out, (x, g, *weights)

    def attention_gate_eval():
        # running statistics folded: the one-pass forward kernel and its backward (loop variant, Ci = 4)
        x, g = _leaf(2, 6, 6, 5), _leaf(2, 8, 3, 3)
        weights = _gate_leaves(6, 8, 4)
        out, alpha = op(MF.attention_gate)(x, g, *weights, bn_psi=_bn(1), training=False, double_sigmoid=True,
                                           return_alpha=True, backend="triton")
        return out + alpha, (x, g, *weights)

    def attention_gate_grid():
        # Oktay's grid gate: logits on the strided grid, then the output transform's project kernels
        x, g = _leaf(2, 6, 8, 6), _leaf(2, 8, 2, 3)
        weights = _gate_leaves(6, 8, 4, kernel=2)
        out_weight, out_bias = _leaf(6, 6, 1, 1), _leaf(6)
        out = op(MF.attention_gate)(x, g, *weights, out_weight=out_weight, out_bias=out_bias, bn_out=_bn(6),
                                    training=True, mode="grid", backend="triton")
        return out, (x, g, *weights, out_weight, out_bias)

    return {"channel": channel, "gaussian_axial": gaussian_axial,
            "gaussian_axial_from_scores": gaussian_axial_from_scores, "window": window, "external": external,
            "position": position, "position_fused_backward": position_fused_backward,
            "position_transpose": position_transpose, "attention_gate_train": attention_gate_train,
            "attention_gate_eval": attention_gate_eval, "attention_gate_grid": attention_gate_grid}


# The kernels each case must launch (sorted names, one per launch): the variant's own kernels, so a
# case that silently ran another variant (or an untraced launch) fails.
EXPECTED_KERNELS = {
    "position": ["_column_kernel", "_dk_kernel", "_dq_kernel", "_forward_kernel", "_grad_out_kernel"],
    "position_fused_backward": ["_column_kernel", "_dk_kernel", "_forward_kernel", "_grad_out_kernel"],
    "position_transpose": ["_column_kernel", "_dk_kernel", "_dq_kernel", "_grad_out_kernel", "_row_kernel",
                           "_row_lse_kernel"],
    "attention_gate_train": ["_backward_dot_kernel", "_forward_dot_kernel"],
    "attention_gate_eval": ["_backward_kernel", "_forward_kernel"],
    "attention_gate_grid": ["_backward_kernel", "_forward_kernel", "_project_backward_kernel", "_project_kernel"],
}


# The kernel parameters these cases' kernels write (their results and scratch): functionalisation
# clones every tensor a launch writes, as torch's analysis of the kernel's TTIR finds them, so an
# input found "written" (an address it could not follow) would be copied before every launch.
WRITTEN = {
    "position": {"o_ptr", "out_ptr", "lse_ptr", "g_ptr", "df_ptr", "dpart_ptr", "gpart_ptr", "dq_ptr", "dk_ptr"},
    "attention_gate": {"out_ptr", "alpha_ptr", "q_ptr", "gx_ptr", "ga_ptr", "part_ptr", "galpha_ptr"},
}


def traced_kernels(graph):
    """``(names, cloned)``: the sorted names of the Triton kernels ``graph``'s
    ``triton_kernel_wrapper_functional`` nodes launch, and ``kernel: parameter`` for each tensor
    parameter such a node clones as written."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    names, cloned = [], []
    for node in graph.graph.nodes:
        if node.op == "call_function" and "triton_kernel_wrapper_functional" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
            names.append(name)
            cloned += [f"{name}: {param}" for param in node.kwargs["tensors_to_clone"]]
    return sorted(names), cloned


def wrongly_written(case: str, cloned):
    """The cloned ``kernel: parameter``s of ``case`` that are not its family's results (``WRITTEN``)."""
    family = next((f for f in WRITTEN if case.startswith(f)), None)
    if family is None:
        return []
    return [c for c in cloned if c.split(": ")[1] not in WRITTEN[family]]


def trace(case):
    """The functionalised fake-tensor graph of ``case``'s forward and backward."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(seed):
        out, leaves = case()
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out) * seed, allow_unused=True)
        return out, [g for g in grads if g is not None]

    return make_fx(dispatch_functionalize(step), tracing_mode="fake")(torch.tensor(1.0))


def compiled(name):
    """The AOTAutograd forward and backward graphs of case ``name`` with its public function under
    ``torch.compile(fullgraph=True)`` (Dynamo, then AOTAutograd as every backend runs it; the graphs
    are run as traced, whose launches the offline driver skips), after its backward ran."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = []

    def keep(graph, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    torch._dynamo.reset()
    out, leaves = _cases(aot_autograd(fw_compiler=keep, bw_compiler=keep))[name]()
    torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    return graphs


def _check(case, graphs) -> bool:
    """Prints the case's line; whether it passed."""
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
    launches = sum("triton_kernel_wrapper_functional" in t for t in targets)
    opaque = sorted({t for t in targets if t.startswith("medattn.")})
    kernels, cloned = [], []
    for graph in graphs:
        names, clones = traced_kernels(graph)
        kernels, cloned = sorted(kernels + names), cloned + clones
    expected = EXPECTED_KERNELS.get(case.split(" ")[0])
    inputs_written = wrongly_written(case, cloned)
    other_kernels = expected is not None and kernels != sorted(expected)
    if launches == 0 or opaque or other_kernels or inputs_written:
        print(f"FAIL {case}: {launches} kernel launches traced {kernels}, opaque ops {opaque}"
              + (f", expected the kernels {sorted(expected)}" if other_kernels else "")
              + (f", inputs cloned as written {inputs_written}" if inputs_written else ""))
        return False
    print(f"ok   {case}: {launches} kernel launches traced ({', '.join(kernels)})")
    return True


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
        failures += not _check(family, [graph])
    # the real entry point, for the families that came last to triton_op: Dynamo captures the public
    # function whole (fullgraph) and AOTAutograd's forward and backward graphs launch the kernels
    for family in EXPECTED_KERNELS:
        try:
            graphs = compiled(family)
        except Exception as exc:
            print(f"FAIL {family} compiled: {type(exc).__name__}: {exc}")
            failures += 1
            continue
        failures += not _check(f"{family} compiled", graphs)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

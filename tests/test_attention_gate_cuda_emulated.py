r"""The ``cuda`` backend's kernels (``csrc/cuda/attention_gate.cu``) executed on the CPU, against the
float64 reference.

``tests/_cuda_emulation.py`` builds the unchanged ``.cu`` source as host C++ (a shim header and a few
explicit, counted rewrite rules): every block of a launch runs in turn, its 128 threads as real
``std::thread``\ s, ``__syncthreads()`` a real barrier, the ``__shared__`` tiles one array the block's
threads share, poisoned with NaN at each block's start. Its five functions become custom ops
``medattn::attention_gate_cudaemu_*`` with the ``cuda`` backend's fake kernels and autograd formulas
(``_attention_gate_fused.define_custom_ops``), and each test runs the plan a GPU run uses
(``_attention_gate_fused.fused_gate``: BN folding, the coarse map G, logits/forward/backward/project
kernels, the parameter-gradient GEMMs) on CPU tensors, after the public op's own argument checks.

Checked under the project's tolerance rule (``assert_within_pytorch_error``: every result within
twice PyTorch's own error in that dtype of the float64 ``reference``): out, α and the gradients of x,
g and every parameter, in eval and training mode (batch statistics: the logits kernel), and the BN
running statistics after a training step; at Cx = 32, Ci = 16 (the column in registers), past the
64 register channels (Cx = 130, Ci = 20: ragged column chunks and ragged 8-row tiles), in 3-D with a
channels_last_3d x, grid mode (its project kernels, chunked too), float64 (its own 32/16-channel
columns), bfloat16 and float16; the positions (a few hundred per batch element) leave the last block
of each batch element partly padding threads. Plus: the launchers' TORCH_CHECK messages on bad
input, bitwise-repeatable results over runs (a race would not be), and the rewrite rules refusing a
source they do not cover.

What this establishes: the kernels' arithmetic, indexing (strides, padding threads, chunk edges),
barriers and shared tiles, and the host launchers, run by CPU threads with a block's real
concurrency. What it cannot: warp-level behaviour and timing, the GPU memory model beyond what the
barriers order, nvcc's code generation (``--use_fast_math``'s ``exp``, FMA contraction), launch
limits (registers, shared memory) and any GPU performance figure — those need a GPU
(``test_attention_gate_cuda.py`` and the ``[cuda-*]`` cases of ``test_attention_gate_fused.py``).
"""
import copy

import pytest
import torch
from _helpers import randomize_batch_norms
from _tolerance import F64, assert_within_twice, max_errors
from test_attention_gate_fused import assert_within_pytorch_error, call, grid_call, make_block

import _cuda_emulation as E
from medattn_fast.functional import BatchNormParams
from medattn_fast.ops import attention_gate as AG
from medattn_fast.ops._attention_gate_fused import GateParams, fused_gate
from medattn_fast.reference import attention_gate as R

EMULATED = "cuda-emulated"


@pytest.fixture(scope="module")
def kernels():
    """The emulated extension, built once per session (30-45 s on 2 cores, cached under $MEDATTN_BUILD_DIR), and
    its custom ops."""
    E.load_emulated_extension("attention_gate")
    return E.emulated_gate_kernels()


def _additive_params(module: R.AttentionBlock):
    bn = BatchNormParams.from_module
    params = GateParams(module.Wx[0].weight, module.Wx[0].bias, module.Wg[0].weight, module.Wg[0].bias,
                        module.psi[0].weight, module.psi[0].bias, bn(module.Wx[1]), bn(module.Wg[1]), bn(module.psi[1]))
    return params, dict(mode="additive", double_sigmoid=module.double_sigmoid)


def _grid_params(module: R.GridAttentionBlock):
    params = GateParams(module.theta.weight, None, module.phi.weight, module.phi.bias, module.psi.weight,
                        module.psi.bias, out_weight=module.W[0].weight, out_bias=module.W[0].bias,
                        bn_out=BatchNormParams.from_module(module.W[1]))
    return params, dict(mode="grid", double_sigmoid=False)


def emulated_gate(kernels, module, x, g):
    """The ``cuda`` backend's plan on the emulated kernels: what ``MF.attention_gate(..., backend="cuda")``
    runs after dispatch (the public op's checks, every BN in its mode, ``fused_gate``)."""
    params, options = (_grid_params if isinstance(module, R.GridAttentionBlock) else _additive_params)(module)
    AG._check(x, g, params, training=module.training, return_alpha=True, **options)
    return fused_gate(kernels, x, g, params.in_mode(module.training), return_alpha=True, **options)


def gate_for(kernels, launched):
    """``gate(module, x, g, backend)`` for ``assert_within_pytorch_error``: the emulated cuda backend
    for :data:`EMULATED`, the public op otherwise; ``launched`` collects the x layouts it ran on."""
    def gate(module, x, g, backend):
        if backend != EMULATED:
            return (grid_call if isinstance(module, R.GridAttentionBlock) else call)(module, x, g, backend)
        launched.append((x.dtype, x.is_contiguous(), x.stride()))
        return emulated_gate(kernels, module, x, g)
    return gate


def assert_buffers_match(kernels, block64, x, g, dtype):
    """After one training step, every BN's running statistics of the emulated run within the rule of
    the float64 reference's (the ψ-BN's come from the logits kernel's q)."""
    def step(run, dtype):
        module = copy.deepcopy(block64).to(dtype)
        with torch.no_grad():
            run(module, x.to(dtype), g.to(dtype))
        return [b.double() for name, b in module.named_buffers() if "running" in name]

    def public(backend):
        return lambda module, x, g: (grid_call if isinstance(module, R.GridAttentionBlock) else call)(
            module, x, g, backend)

    exact = step(public("reference"), F64)
    yardstick = max_errors(step(public("reference"), dtype), exact)
    got = step(lambda module, x, g: emulated_gate(kernels, module, x, g), dtype)
    names = [name for name, _ in block64.named_buffers() if "running" in name]
    assert_within_twice(got, yardstick, exact, dtype, names, f"{EMULATED} {dtype} running stats")


def _check(kernels, block64, x, g, dtype, *, channels_last=False):
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    cots = torch.randn_like(x), torch.randn(x.shape[0], 1, *x.shape[2:], dtype=F64)
    launched = []
    assert_within_pytorch_error(block64, gate_for(kernels, launched), x, g, cots, EMULATED, dtype)
    assert launched and launched[0][0] == dtype
    if channels_last:
        assert not launched[0][1], "the kernels ran on the channels_last x"
    if block64.training and dtype in (torch.float32, F64):
        assert_buffers_match(kernels, block64, x, g, dtype)


# (nd, x spatial, g spatial, Cx, Cg, Ci): a few hundred positions per batch element (two or three
# 128-thread blocks, the last one partly padding threads)
ADDITIVE = {
    "2d-resident": (2, (13, 17), (5, 6), 32, 24, 16),      # the x column in registers
    "2d-chunked": (2, (11, 13), (4, 5), 130, 12, 20),      # 64 + 64 + 2 channels, 8 + 8 + 4 rows of W
    "3d-chunked": (3, (5, 6, 7), (3, 3, 4), 70, 10, 12),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(ADDITIVE))
def test_float32_matches_float64(kernels, case, training):
    nd, xs, gs, cx, cg, ci = ADDITIVE[case]
    block64 = make_block(nd, cx, cg, ci, training=training)
    x, g = torch.randn(2, cx, *xs, dtype=F64), torch.randn(2, cg, *gs, dtype=F64)
    _check(kernels, block64, x, g, torch.float32, channels_last=nd == 3)


def test_float32_double_sigmoid(kernels):
    """σ∘σ through the forward kernel (eval) and its backward."""
    block64 = make_block(2, 32, 24, 16, training=False, double_sigmoid=True)
    _check(kernels, block64, torch.randn(2, 32, 13, 17, dtype=F64), torch.randn(2, 24, 5, 6, dtype=F64),
           torch.float32)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_float64_matches_reference(kernels, training):
    """float64 holds 32 channels of the column (16 in the backward): Cx = 40 is its chunked path."""
    block64 = make_block(2, 40, 12, 10, training=training)
    _check(kernels, block64, torch.randn(2, 40, 13, 17, dtype=F64), torch.randn(2, 12, 5, 6, dtype=F64), F64,
           channels_last=True)


def test_float64_strided_view_narrower_than_a_tile(kernels):
    """x a non-dense view (every other column of a wider buffer), Cx = 5 and Ci = 3 (less than one
    8-row tile of W), batch 1, σ∘σ: the kernels address x through its strides."""
    block64 = make_block(2, 5, 6, 3, training=False, double_sigmoid=True)
    x = torch.randn(1, 5, 13, 34, dtype=F64)[..., ::2]
    g = torch.randn(1, 6, 5, 6, dtype=F64)
    cots = torch.randn(1, 5, 13, 17, dtype=F64), torch.randn(1, 1, 13, 17, dtype=F64)
    launched = []
    assert_within_pytorch_error(block64, gate_for(kernels, launched), x, g, cots, EMULATED, F64)
    assert launched[0][2] == x.stride() and x.stride()[-1] == 2, "the kernels ran on the strided view"


@pytest.mark.parametrize("dtype,training", [(torch.bfloat16, False), (torch.float16, True)], ids=str)
def test_16_bit_within_pytorch_error(kernels, dtype, training):
    block64 = make_block(2, 32, 24, 16, training=training)
    _check(kernels, block64, torch.randn(2, 32, 13, 17, dtype=F64), torch.randn(2, 24, 5, 6, dtype=F64), dtype)


# (x spatial, g spatial, Cx, Cg, Ci, dtype)
GRID = {
    "2d-float32": ((25, 23), (5, 4), 32, 24, 16, torch.float32),
    "3d-float32": ((9, 10, 11), (2, 3, 3), 16, 12, 8, torch.float32),
    "2d-chunked-float32": ((13, 17), (4, 5), 70, 12, 20, torch.float32),   # project: 2 column chunks, 9 row tiles
    "2d-float64": ((13, 17), (4, 5), 40, 12, 10, F64),
}


# float64 once, in training (batch statistics: the logits and both project kernels)
GRID_RUNS = [(case, training) for case in GRID for training in (False, True) if GRID[case][-1] != F64 or training]


@pytest.mark.parametrize("case,training", GRID_RUNS, ids=[f"{c}-{'train' if t else 'eval'}" for c, t in GRID_RUNS])
def test_grid_matches_float64(kernels, case, training):
    xs, gs, cx, cg, ci, dtype = GRID[case]
    block64 = randomize_batch_norms(R.GridAttentionBlock(cx, cg, ci, spatial_dims=len(xs), sub_sample_factor=2))
    block64 = block64.to(F64).train(training)
    x, g = torch.randn(2, cx, *xs, dtype=F64), torch.randn(2, cg, *gs, dtype=F64)
    _check(kernels, block64, x, g, dtype, channels_last=len(xs) == 2 and cx > 64)


def test_results_repeat_bitwise(kernels):
    """Three runs of the chunked forward and backward give identical bits: the per-block partial
    sums are summed in a fixed order, and a race on the shared tiles would not repeat."""
    ext = E.load_emulated_extension("attention_gate")
    x = torch.randn(2, 130, 11, 13)
    G, W, b = torch.randn(2, 20, 4, 5), torch.randn(20, 130) / 8, torch.randn(20)
    w, c = torch.randn(20), torch.randn(1)
    go, ga = torch.randn_like(x), torch.randn(2, 1, 11, 13)
    alpha, W_out, go_out = torch.rand(2, 1, 11, 13), torch.randn(70, 130) / 8, torch.randn(2, 70, 11, 13)
    runs = [[*ext.gate_forward(x, G, W, b, w, c, False), *ext.gate_backward(x, G, W, b, w, c, None, go, ga, False),
             *ext.gate_project_backward(x, alpha, W_out, go_out)] for _ in range(3)]
    for run in runs[1:]:
        for first, again in zip(runs[0], run):
            assert torch.equal(first, again)


def test_bad_input_gives_the_launchers_message(kernels):
    """The launchers' TORCH_CHECKs (not a crash) on a wrong device, shape or dtype."""
    ext = E.load_emulated_extension("attention_gate")
    x, G = torch.randn(1, 6, 5, 7), torch.randn(1, 4, 3, 4)
    W, b, w, c = torch.randn(4, 6), torch.randn(4), torch.randn(4), torch.randn(1)
    with pytest.raises(RuntimeError, match=r"attention_gate \(cuda\): expected CUDA tensors, got meta"):
        ext.gate_forward(x.to("meta"), G, W, b, w, c, False)
    with pytest.raises(RuntimeError, match=r"attention_gate \(cuda\): weight must be \(Ci, Cx\), got \[4, 5\]"):
        ext.gate_forward(x, G, W[:, :5], b, w, c, False)
    with pytest.raises(RuntimeError, match=r"G and the folded parameters must be Double"):
        ext.gate_logits(x.double(), G, W, b, w, c)
    with pytest.raises(RuntimeError, match=r"give grad_q \(logits pass\) or grad_out/grad_alpha"):
        ext.gate_backward(x, G, W, b, w, c, None, None, None, False)
    with pytest.raises(RuntimeError, match=r"project \(cuda\): alpha must be \(B, 1, \*S\)"):
        ext.gate_project(x, torch.rand(1, 1, 5, 6), torch.randn(6, 6), None)


def test_rules_refuse_a_source_they_do_not_cover():
    """A construct the rules or the shim do not cover fails loudly, naming it."""
    source = (E.ROOT / "csrc" / "cuda" / "attention_gate.cu").read_text()
    text, counts = E.emulated_source(source)
    assert counts == {"shared": 5, "is_cuda": 2, "launches": 4, "c10/cuda includes": 3}
    assert "<<<" not in E._code_only(text) and "__shared__" not in E._code_only(text)
    dynamic = source.replace("<<<grid, kThreads, 0,", "<<<grid, kThreads, bytes,", 1)
    with pytest.raises(E.EmulationError, match="dynamic shared memory"):
        E.emulated_source(dynamic)
    unmatched = source.replace("forward_kernel<scalar_t, acc_t><<<", "forward_kernel<scalar_t, acc_t> <<<", 1)
    with pytest.raises(E.EmulationError, match="launch"):
        E.emulated_source(unmatched)
    warp = source.replace("acc_t sum = acc_t(0);", "acc_t sum = __shfl_down_sync(~0u, acc_t(0), 1);", 1)
    with pytest.raises(E.EmulationError, match="__shfl_down_sync"):
        E.emulated_source(warp)
    global_shared = source.replace("constexpr int kRows = 8;", "constexpr int kRows = 8;\n__shared__ float spare[4];")
    with pytest.raises(E.EmulationError, match="not inside a __global__"):
        E.emulated_source(global_shared)

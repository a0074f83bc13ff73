"""The CUDA attention gate has no width limit (csrc/cuda/attention_gate.cu: one thread per position,
its x column in registers, W streamed through a fixed (8 × 64) shared tile, a few KB per block): the
table of families lists no ``cuda`` limit, and dispatch gives no shared-memory reason at any width.
On a GPU (``-m gpu``) the widths the old kernels refused (Cx = 512, Ci = 256: their x and W tiles
needed more than the 227 KiB a Hopper block can opt into) run in float32 within the tolerance rule of
the float64 reference (twice PyTorch's own float32 error), forward and every gradient, in eval and
training mode; and widths past the 64 register channels (the kernels' chunked path) in 3-D with
channels_last x and in grid mode too. (The float32/bfloat16/float16 cases at Cx = 32, Ci = 16, the
column-in-registers path, are tests/test_attention_gate_fused.py's ``test_gpu_*[cuda-*]``.)
"""
import pytest
import torch

from _helpers import randomize_batch_norms
from _tolerance import F64, gpu_device
from test_attention_gate_fused import assert_within_pytorch_error, call, grid_call

from medattn_fast import backend as B
from medattn_fast.ops._attention_gate_fused import GateParams
from medattn_fast.reference.attention_gate import AttentionBlock, GridAttentionBlock


def test_no_width_is_refused_for_shared_memory():
    op = B.registered_ops()["attention_gate"]
    for cx, ci in ((512, 256), (4096, 2048)):
        x, g = torch.randn(1, cx, 2, 2), torch.randn(1, 3, 2, 2)
        params = GateParams(torch.randn(ci, cx, 1, 1), None, torch.randn(ci, 3, 1, 1), None,
                            torch.randn(1, ci, 1, 1), None)
        reasons = op.why_not("cuda", x, g, params, mode="additive", double_sigmoid=False, return_alpha=False)
        assert not any("shared memory" in r or "channels" in r for r in reasons), reasons


def _matches_float64(block64, gate, x, g):
    """cuda in float32 against the float64 ``reference`` under the tolerance rule (twice the error of
    PyTorch's own float32 ``reference``/``torch``): out, α, the gradients of x, g and every parameter."""
    cots = torch.randn_like(x), torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
    assert_within_pytorch_error(block64, gate, x, g, cots, "cuda", torch.float32)


def _cuda():
    dev = gpu_device()
    if dev.type != "cuda":
        pytest.skip("the cuda backend needs a CUDA device (dry run on the CPU)")
    return dev


@pytest.mark.gpu
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gpu_wide_gate_runs_within_float32_error(training):
    """Cx = 512, Ci = 256 (refused by the old kernels for shared memory): the chunked path (x re-read per
    8 rows of W, 8 chunks of 64 channels), 32 row chunks."""
    dev = _cuda()
    block = randomize_batch_norms(AttentionBlock(512, 64, 256)).to(dev, F64).train(training)
    x, g = torch.randn(2, 512, 13, 11, device=dev, dtype=F64), torch.randn(2, 64, 7, 6, device=dev, dtype=F64)
    _matches_float64(block, call, x, g)


@pytest.mark.gpu
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gpu_3d_past_the_register_column_channels_last(training):
    """Cx = 70 (one full and one partial 64-channel chunk), Ci = 13 (a partial row chunk), 3-D,
    x channels_last_3d (a channel stride of 1)."""
    dev = _cuda()
    block = randomize_batch_norms(AttentionBlock(70, 9, 13, spatial_dims=3)).to(dev, F64).train(training)
    x = torch.randn(2, 70, 5, 7, 9, device=dev, dtype=F64).to(memory_format=torch.channels_last_3d)
    g = torch.randn(2, 9, 3, 4, 5, device=dev, dtype=F64)
    _matches_float64(block, call, x, g)


@pytest.mark.gpu
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gpu_grid_gate_wide_output_transform(training):
    """Grid mode with a 300-channel x and output transform (the old kernels staged (Cx + Co) × 32 tiles:
    2048 channels were refused), 2-D."""
    dev = _cuda()
    block = randomize_batch_norms(GridAttentionBlock(300, 24, 40, sub_sample_factor=2)).to(dev, F64).train(training)
    x, g = torch.randn(2, 300, 18, 14, device=dev, dtype=F64), torch.randn(2, 24, 5, 4, device=dev, dtype=F64)
    _matches_float64(block, grid_call, x, g)

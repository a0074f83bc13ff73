"""The CUDA attention gate's shared-memory limit (csrc/cuda/attention_gate.cu stages x, W_x and a
(Ci + 1)-row buffer per block of >= 32 positions): past what a block can hold (Cx = 512, Ci = 256 in
float32 on a Hopper GPU), the backend predicate says why, so ``auto`` takes another backend and a
forced ``cuda`` call raises with that reason instead of the kernel's own error at launch.
"""
import pytest
import torch

import medattn_fast.functional as MF
from medattn_fast.backend import BackendUnavailable
from medattn_fast.ops._families import GateSharedMemory
from medattn_fast.reference.attention_gate import AttentionBlock
from _tolerance import gpu_device

HOPPER_OPTIN = 232448   # bytes of shared memory a block may opt into on sm_90 (227 KiB)
cuda_shared_memory_reasons = GateSharedMemory().shared_memory_reasons   # the table of families' limit


def _need(cx, ci, tiles, elem=4, p=32):
    return elem * (tiles * cx * p + ci * cx + (ci + 1) * p)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_wide_gates_are_refused_with_the_sizes(backward):
    x, w = torch.randn(1, 512, 4, 4), torch.randn(256, 512, 1, 1)
    reasons = cuda_shared_memory_reasons(x, w, mode="additive", out_weight=None, backward=backward,
                                         limit=HOPPER_OPTIN)
    need = _need(512, 256, 2 if backward else 1)
    assert reasons == [f"the cuda gate's gate pass needs {need} B of shared memory per block at 32 positions "
                       f"(Cx = 512, Ci = 256, torch.float32{', backward' if backward else ''}), over this "
                       f"device's {HOPPER_OPTIN} B"]


def test_the_bound_is_the_kernels_own():
    """At the largest Ci that fits for Cx = 256 it runs; one more channel of Ci and it does not; float64
    tiles take twice the bytes."""
    cx = 256
    ci = max(c for c in range(1, 512) if _need(cx, c, 2) <= HOPPER_OPTIN)
    x = torch.randn(1, cx, 2, 2)
    fits = cuda_shared_memory_reasons(x, torch.randn(ci, cx), mode="additive", out_weight=None, backward=True,
                                      limit=HOPPER_OPTIN)
    over = cuda_shared_memory_reasons(x, torch.randn(ci + 1, cx), mode="additive", out_weight=None,
                                      backward=True, limit=HOPPER_OPTIN)
    assert fits == [] and len(over) == 1
    assert cuda_shared_memory_reasons(x.double(), torch.randn(ci, cx).double(), mode="additive", out_weight=None,
                                      backward=True, limit=HOPPER_OPTIN)


def test_grid_mode_counts_the_logits_pass_and_the_output_transform():
    """Grid mode: the logits pass runs on θ·x (Ci channels, W_x = I), the output pass stages Cx + Co."""
    x = torch.randn(1, 2048, 4, 4)
    theta = torch.randn(64, 2048, 2, 2)
    assert cuda_shared_memory_reasons(x, theta, mode="grid", out_weight=None, backward=True,
                                      limit=HOPPER_OPTIN) == []
    reasons = cuda_shared_memory_reasons(x, theta, mode="grid", out_weight=torch.randn(2048, 2048, 1, 1),
                                         backward=True, limit=HOPPER_OPTIN)
    assert len(reasons) == 1 and "output transform needs 524288 B" in reasons[0]


def test_cpu_tensors_are_left_to_the_device_check():
    assert cuda_shared_memory_reasons(torch.randn(1, 512, 2, 2), torch.randn(256, 512), mode="additive",
                                      out_weight=None, backward=True) == []


@pytest.mark.gpu
def test_gpu_wide_gate_falls_through_and_a_forced_call_explains():
    dev = gpu_device()
    if dev.type != "cuda":
        pytest.skip("the cuda backend needs a CUDA device (dry run on the CPU)")
    block = AttentionBlock(512, 512, 256).to(dev).eval()
    x, g = torch.randn(2, 512, 16, 16, device=dev), torch.randn(2, 512, 8, 8, device=dev)

    def call(backend):
        return MF.attention_gate(x, g, block.Wx[0].weight, block.Wx[0].bias, block.Wg[0].weight, block.Wg[0].bias,
                                 block.psi[0].weight, block.psi[0].bias, backend=backend)

    with pytest.raises(BackendUnavailable, match="shared memory per block"):
        call("cuda")
    with torch.no_grad():
        torch.testing.assert_close(call(None), call("torch"), rtol=1e-4, atol=1e-5)

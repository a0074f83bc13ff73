"""Inputs and odd shapes shared by the position-attention tests of every backend."""
import torch

F64 = torch.float64

# (B, Nq, Nk, dk, dv, block): the block (query chunk / tile) size is swept with the shape
SHAPES = [
    (1, 1, 1, 1, 1, None),          # N = 1
    (2, 13, 13, 1, 5, 4),           # prime N, dk = 1 (C/8 = 1), block not dividing N
    (3, 17, 11, 4, 7, 5),           # Nq != Nk, dv not a power of two
    (1, 31, 29, 8, 6, 7),           # B = 1, primes
    (2, 9, 23, 3, 12, 64),          # block larger than N
]


def position_inputs(batch, nq, nk, dk, dv, *, transpose=False, layout="tokens", dtype=F64, strided=False):
    """Fresh random q, k, v (requires_grad) in the layout; ``strided``: non-contiguous views."""
    rows_v = nq if transpose else nk

    def make(n, d):
        shape = (batch, d, n) if layout == "channels" else (batch, n, d)
        if strided:  # every other element of a wider tensor, last two dims swapped
            big = torch.randn(batch, shape[2], 2 * shape[1], dtype=dtype)
            return big[:, :, ::2].transpose(1, 2).detach().requires_grad_(True)
        return torch.randn(shape, dtype=dtype, requires_grad=True)

    return make(nq, dk), make(nk, dk), make(rows_v, dv)


def grads(out, tensors, cotangent):
    return torch.autograd.grad(out, tensors, cotangent)

"""The fast networks train like their reference twins (bench/loss_curves.py, tiny sizes).

Every network of medattn_fast.models and its reference twin start from the same weights and take
3 SGD steps on the same phantom batches in float32; the two loss curves must agree to within float32
rounding of the loss's own magnitude — or, for a network whose training amplifies rounding
(MSGANet), within a few times the spread of the reference's own curve when its weights are moved by
one float32 rounding — and training must move the loss. A control run shows the tolerance is tight
enough to see a real difference (one weight off by 0.1%).
"""
import pytest
import torch

from bench.loss_curves import MODELS, compare, twins

STEPS = 3
CPU = torch.device("cpu")


def _tolerance(record) -> float:
    """Float32 agreement of two loss curves: 256 ulps of the first-step loss (the fused kernels sum
    in another order; three SGD steps amplify the differences of the first a little), or twice the
    reference's own spread under a one-rounding perturbation of its weights, whichever is larger
    (MSGANet: tiny maps make its BatchNorms and channel-attention softmaxes amplify rounding ~100×
    per step, in the reference as much as in the fast network)."""
    reference = record["reference_loss"]
    noise = max(abs(p - r) for p, r in zip(record["perturbed_reference_loss"], reference))
    return max(_ulps(reference[0]), 2 * noise)


def _ulps(first_loss: float) -> float:
    return 256 * torch.finfo(torch.float32).eps * abs(first_loss)


@pytest.mark.parametrize("name", MODELS)
def test_fast_and_reference_twins_train_alike(name):
    (twin,) = twins(CPU, "tiny", [name], seed=int(torch.randint(0, 2**16, ()).item()))
    record = compare(twin, STEPS, CPU, seed=int(torch.randint(0, 2**16, ()).item()))
    reference, fast = record["reference_loss"], record["fast_loss"]
    assert len(reference) == len(fast) == STEPS
    assert all(torch.isfinite(torch.tensor(reference + fast)))
    tol = _tolerance(record)
    for step, (r, f) in enumerate(zip(reference, fast)):
        assert abs(f - r) <= tol, f"{name}: step {step} reference {r!r} fast {f!r} (tolerance {tol:.2e})"
    # the optimiser steps change the loss by far more than float32 rounding: not a constant curve
    assert max(reference) - min(reference) > 100 * _ulps(reference[0])
    assert record["max_rel_diff"] == max(abs(f - r) / abs(r) for r, f in zip(reference, fast))


def test_tolerance_sees_a_small_weight_change():
    """Control: the fast twin with its output conv's weight scaled by 1.001 leaves the tolerance
    (the last conv: a conv followed by BatchNorm would be scale-invariant)."""
    (twin,) = twins(CPU, "tiny", ["DAUNet"])
    with torch.no_grad():
        conv = [m for m in twin.fast.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        conv.weight.mul_(1.001)
    record = compare(twin, STEPS, CPU)
    tol = _tolerance(record)
    assert max(abs(f - r) for r, f in zip(record["reference_loss"], record["fast_loss"])) > tol


def test_twins_rejects_unknown_model_and_size():
    with pytest.raises(ValueError, match="unknown models"):
        list(twins(CPU, "tiny", ["UNet"]))
    with pytest.raises(ValueError, match="size must be"):
        list(twins(CPU, "huge", ["DAUNet"]))


@pytest.mark.parametrize("name", ["CrossAttentionUNet", "AttentionUNet"])
def test_float64_twins_train_identically(name):
    """In float64 the two curves agree to float64 rounding (1e-12 relative over 3 steps), so a
    float32 difference between them is rounding and not a difference in the math."""
    (twin,) = twins(CPU, "tiny", [name])
    record = compare(twin, STEPS, CPU, dtype=torch.float64, noise_floor=False)
    assert record["dtype"] == "float64"
    assert record["max_rel_diff"] < 1e-12, record["max_rel_diff"]
    assert max(record["reference_loss"]) - min(record["reference_loss"]) > 1e-3  # training moved the loss
    # the losses carry float64 digits (a float32 loss would make the comparison vacuous)
    assert any(float(torch.tensor(v, dtype=torch.float32)) != v for v in record["reference_loss"])

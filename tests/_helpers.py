"""Shared test fixtures for modules with batch norms."""
from __future__ import annotations

from typing import Optional

import torch


def randomize_batch_norms(module: torch.nn.Module, *, batches_tracked: Optional[int] = 3) -> torch.nn.Module:
    """Give every BatchNorm in ``module`` a non-trivial state, in place: γ, β and the running mean
    drawn from N(0, 1), the running variance from U(0.5, 1.5) (one draw each, in that order, from
    the default generator), the batch counter set to ``batches_tracked`` (None: left alone). The
    defaults (γ=1, β=0, μ=0, σ²=1) would hide a wrong fold or a missing running-stat update."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 1.5)
                if batches_tracked is not None:
                    m.num_batches_tracked.fill_(batches_tracked)
    return module

"""The last step of every compat class's ``from_original``."""
from __future__ import annotations

from torch import nn


def adopt(new: nn.Module, original: nn.Module) -> nn.Module:
    """Finish ``new`` (a compat module built with ``original``'s constructor arguments): move it to
    the original's device and floating dtype, load the original's state_dict with ``strict=True``
    (a different parameter structure raises here: not the class we took it for), and copy every
    submodule's training flag by name."""
    ref = next((t for t in list(original.parameters()) + list(original.buffers()) if t.is_floating_point()), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(original.state_dict(), strict=True)
    flags = {name: m.training for name, m in original.named_modules()}
    for name, m in new.named_modules():
        m.training = flags.get(name, original.training)
    return new

r"""nnU-Net v2 with the Attention U-Net gate: ``pip install "medattn-fast[nnunet]"``.

* :class:`AttentionGatedPlainConvUNet`, :class:`AttentionGatedResidualEncoderUNet`: nnU-Net's two
  U-Nets (``dynamic_network_architectures``), 2-D and 3-D, with a gate on every skip; built by
  nnU-Net from the dotted path ``medattn_fast.integrations.nnunet.<Class>`` in the plans.
* :func:`add_configuration` / ``medattn-fast nnunet add-config -d ID -c 3d_fullres``: a plans
  configuration (``3d_fullres_attngate``) that inherits the preprocessed data and trains the gated
  network with nnU-Net's own trainer (``nnUNetv2_train ID 3d_fullres_attngate FOLD``).
* ``nnUNetTrainerAttnGate`` / ``nnUNetTrainerAttnGateMONAI`` for ``-tr`` (nnU-Net >= 2.8, through
  ``nnUNet_extTrainer``: ``medattn-fast nnunet trainer-path`` prints the folder).
* :func:`warm_start` / :func:`convert_checkpoint` / ``medattn-fast nnunet warm-start``: the gated
  network from a stock checkpoint, equal to the stock network at first.

Nothing here is imported by ``import medattn_fast``; this package imports nnU-Net's modules only
when one of its names is first used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AttentionGatedPlainConvUNet": "networks", "AttentionGatedResidualEncoderUNet": "networks",
    "GatedUNetDecoder": "networks", "gate_norm_of": "networks", "GATE_FROM": "networks",
    "add_configuration": "plans", "add_configuration_to_file": "plans", "build_network": "plans",
    "gated_architecture": "plans", "plans_file": "plans",
    "warm_start": "warm_start", "convert_checkpoint": "warm_start",
    "nnUNetTrainerAttnGate": "trainer", "nnUNetTrainerAttnGateMONAI": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # lazy: nnU-Net (and torch's heavier imports it brings) load on first use, not at import
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

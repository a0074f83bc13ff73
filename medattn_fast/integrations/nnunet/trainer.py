r"""nnU-Net trainers that train the attention-gated network of any stock configuration:
``nnUNetv2_train ID 3d_fullres FOLD -tr nnUNetTrainerAttnGate`` (and ``nnUNetv2_predict ... -tr
nnUNetTrainerAttnGate``), found by nnU-Net >= 2.8 through ``nnUNet_extTrainer`` (the folder that
``medattn-fast nnunet trainer-path`` prints). Everything but the network is nnU-Net's
``nnUNetTrainer``: data, augmentation, loss, deep supervision, schedule, DDP, inference.
"""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from .plans import gated_architecture

__all__ = ["nnUNetTrainerAttnGate", "nnUNetTrainerAttnGateMONAI"]


class nnUNetTrainerAttnGate(nnUNetTrainer):
    """``nnUNetTrainer`` whose network is the configuration's stock U-Net with an attention gate
    on every skip, gated from the coarser feature (Oktay et al.)."""

    gate_from = "coarse"

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        architecture = gated_architecture({
            "network_class_name": configuration_manager.network_arch_class_name,
            "arch_kwargs": configuration_manager.network_arch_init_kwargs,
        }, gate_from=cls.gate_from)
        return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)


class nnUNetTrainerAttnGateMONAI(nnUNetTrainerAttnGate):
    """As :class:`nnUNetTrainerAttnGate`, gated from the upsampled feature (MONAI's AttentionUnet)."""

    gate_from = "upsampled"

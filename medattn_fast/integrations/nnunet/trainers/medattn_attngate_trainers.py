"""Found by nnU-Net's ``-tr`` lookup when ``nnUNet_extTrainer`` names this folder; the trainers are
defined once, in ``medattn_fast.integrations.nnunet.trainer``."""
from medattn_fast.integrations.nnunet.trainer import nnUNetTrainerAttnGate, nnUNetTrainerAttnGateMONAI  # noqa: F401

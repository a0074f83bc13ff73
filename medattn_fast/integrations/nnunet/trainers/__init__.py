"""The folder to name in ``nnUNet_extTrainer`` (``medattn-fast nnunet trainer-path`` prints it):
nnU-Net >= 2.8 scans it for the trainer that ``-tr`` names."""

"""Adapters to the frameworks users train in, each imported only when asked for (never by
``import medattn_fast``) and each behind its own extra:

``medattn_fast.integrations.nnunet``
    nnU-Net v2: attention-gated ``PlainConvUNet`` / ``ResidualEncoderUNet``, the plans
    configuration that selects them, a trainer and a warm start from a stock checkpoint
    (``pip install "medattn-fast[nnunet]"``).
"""

"""Full networks built on the fast blocks."""

from .attention_unet import AttentionUNet  # noqa: F401

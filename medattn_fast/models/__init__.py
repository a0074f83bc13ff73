"""Full networks built on the fast blocks."""

from .attention_unet import AttentionUNet  # noqa: F401
from .mtunet import MTUNet  # noqa: E402,F401
from .cross_attention_unet import CrossAttentionUNet  # noqa: F401
from .daunet import DAUNet  # noqa: F401
from .msganet import MSGANet, MSGANetOutputs, msganet_loss  # noqa: F401

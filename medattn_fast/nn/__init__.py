"""Clean, well-named nn.Modules built on ``medattn_fast.functional``."""
from .attention import (ChannelAttention, DualAttention, Pointwise, PositionAttention, SEChannelAttention,
                        SelfAttentionLayer, SkipCrossAttentionLayer)
from .attention_gate import AttentionGate
from .mtunet import (ExternalAttention, GaussianAxialAttention, LocalGlobalAttention, MixedTransformerBlock,
                     WindowAggregation, WindowAttention)

__all__ = ["AttentionGate", "ChannelAttention", "DualAttention", "ExternalAttention", "GaussianAxialAttention",
           "LocalGlobalAttention", "MixedTransformerBlock", "Pointwise", "PositionAttention", "SEChannelAttention",
           "SelfAttentionLayer", "SkipCrossAttentionLayer", "WindowAggregation", "WindowAttention"]

"""Clean, well-named nn.Modules built on ``medattn_fast.functional``."""

"""Pure Triton kernels and their launch functions; no autograd, no nn."""

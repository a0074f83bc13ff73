"""One file per op family: validation, backend dispatch, custom-op registration, autograd, and
the vectorised pure-PyTorch ("torch") implementation. Nothing here imports ``medattn_fast.nn``."""

"""Fixtures shared by the test suite (``tests/``) and the benchmarks (``bench/``), which never
import each other: the reference twins of the full networks (:mod:`.twins`) and a restatement of
MONAI's AttentionUnet (:mod:`.monai_attention_unet`). Nothing in the package imports this
subpackage; it ships so that both trees (and users checking their own networks) can build the
same twins.
"""

"""Code shared by the test suite (``tests/``), the benchmarks (``bench/``) and ``medattn-fast
verify``, which never import each other: the reference twins of the full networks (:mod:`.twins`),
a restatement of MONAI's AttentionUnet (:mod:`.monai_attention_unet`) and the one tolerance rule
(:mod:`.tolerance`). Nothing else in the package imports this subpackage; it ships so that both
trees, ``verify`` on an installed wheel, and users checking their own networks use the same code.
"""

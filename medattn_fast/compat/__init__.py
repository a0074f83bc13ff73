"""Drop-in replacements for the originals' modules: the same class names, constructor signatures,
module trees and state_dict keys, fast inside. Change one import line::

    from medattn_fast.compat.danet import PAM_Module, CAM_Module   # was: from danet import ...

Every compat class is a subclass of its namesake in :mod:`medattn_fast.reference` (whose
docstrings hold the math, the shapes and the original's quirks) that replaces ``forward`` only,
with the same inputs and outputs; so the module tree, the construction order (one seed, the
original's initial weights) and the keys are the original's by construction.
``from_original(module)`` (:class:`~medattn_fast.compat._adopt.FromOriginal`) builds the fast twin
of an original instance; each module's ``COMPAT_CLASSES`` maps the original class names to its
classes for :func:`medattn_fast.convert`.
"""

"""Drop-in replacements with the originals' class names, constructor signatures and state_dict
keys, fast inside. Change one import line::

    from medattn_fast.compat.danet import PAM_Module, CAM_Module   # was: from danet import ...

Every compat class has ``from_original(module)``, used by :func:`medattn_fast.convert`.
"""

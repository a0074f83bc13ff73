"""``from_original`` of the compat classes (:class:`FromOriginal`, :func:`adopt`) and the
hand-over ``convert`` does (:func:`graft`)."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

# Every hook table of an nn.Module (forward, backward, state_dict): handed over as the very same
# dict objects, so the handles the user holds can still remove them.
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
                "_is_full_backward_hook", "_state_dict_hooks", "_state_dict_pre_hooks",
                "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def adopt(new: nn.Module, original: nn.Module) -> nn.Module:
    """Finish ``new`` (a compat module built with ``original``'s constructor arguments): move it to
    the original's device and floating dtype, load the original's state_dict with ``strict=True``
    (a different parameter structure raises here: not the class we took it for), and copy every
    submodule's training flag by name. ``new`` owns copies: ``original`` is left untouched."""
    ref = next((t for t in list(original.parameters()) + list(original.buffers()) if t.is_floating_point()), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(_state_without_hooks(original), strict=True)
    flags = {name: m.training for name, m in original.named_modules()}
    for name, m in new.named_modules():
        m.training = flags.get(name, original.training)
    return new


def _state_without_hooks(module: nn.Module) -> "OrderedDict[str, Any]":
    """``module.state_dict()`` without running its state_dict hooks: building a twin must not call
    the user's hooks (they run when the user asks for a state_dict, and ``graft`` hands them to the
    twin). Each submodule saves itself as ``state_dict`` makes it (``_save_to_state_dict``)."""
    state: "OrderedDict[str, Any]" = OrderedDict()
    for path, m in module.named_modules(remove_duplicate=False):
        m._save_to_state_dict(state, f"{path}." if path else "", False)
    return state


def _without_hooks(module: nn.Module) -> nn.Module:
    """``module`` (a deep copy of an original's layer) with empty hook tables: the copy only carries
    the layer's settings into the twin (``graft`` puts the original instance, hooks and all, back),
    so the user's hooks must not fire from it while the twin loads its state."""
    for m in module.modules():
        for table in _HOOK_TABLES:
            if table in m.__dict__:
                object.__setattr__(m, table, type(m.__dict__[table])())
    return module


def paired_submodules(new: nn.Module, original: nn.Module) -> List[Tuple[str, nn.Module, Optional[nn.Module]]]:
    """``(path, new's submodule, original's submodule at that path or None)`` for every submodule of
    ``new`` below its root, as a list (the caller may replace modules while it walks)."""
    originals = dict(original.named_modules())
    return [(path, m, originals.get(path)) for path, m in new.named_modules() if path]


# layers whose settings (eps, momentum, affine, the class itself: BatchNorm, SyncBatchNorm, a
# GroupNorm given as norm_layer ...) no constructor argument carries: copied from the original
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def mirror_layers(new: nn.Module, original: nn.Module) -> None:
    """Give ``new`` (built with ``original``'s constructor arguments) what those arguments do not
    say: a convolution the original has without bias loses its bias, and every normalisation layer
    becomes a copy of the original's at the same path."""
    for path, m, o in paired_submodules(new, original):
        if o is None:
            continue
        if isinstance(m, nn.modules.conv._ConvNd) and m.bias is not None and getattr(o, "bias", 0) is None:
            m.register_parameter("bias", None)
        elif isinstance(m, _NORMS):
            parent, _, name = path.rpartition(".")
            new.get_submodule(parent)._modules[name] = _without_hooks(copy.deepcopy(o))


def _settings(layer: nn.Module) -> dict:
    """A layer's settings: its public attributes, but the training flag (copied) and ``inplace``
    (where an activation writes is not part of the math)."""
    return {k: v for k, v in vars(layer).items() if not k.startswith("_") and k not in ("training", "inplace")}


class FromOriginal:
    """``from_original(module)`` for a compat class: the twin of an instance of the original class
    of the same name. A subclass reads the constructor arguments off the original in
    ``_init_args(module, **options) -> (args, kwargs)``; the rest is shared: build,
    :meth:`_check_layers` (refuses an original not built like the twin), :func:`mirror_layers`,
    :func:`adopt`."""

    @classmethod
    def _init_args(cls, module: nn.Module, **options: Any) -> Tuple[tuple, Dict[str, Any]]:
        raise NotImplementedError(f"{cls.__name__} does not say how to read its constructor arguments")

    # the norms a twin may take from the original: mirror_layers copies them, and the forward calls
    # them (a twin whose fused forward reads a norm's statistics narrows this to BatchNorm)
    MIRRORED_NORMS: Tuple[type, ...] = _NORMS
    NORM_NAMES = "normalisation layer (BatchNorm, InstanceNorm, GroupNorm, LayerNorm)"

    @classmethod
    def _check_layers(cls, new: nn.Module, module: nn.Module) -> None:
        """Raise ValueError where ``module`` is not built like its twin ``new``, whose forward would
        then compute something else (a fork: a dilated conv, another dropout rate, a softmax over
        another dim ...). At every path below the root: a container holds the same children, a norm
        is one of :attr:`MIRRORED_NORMS`, any other layer has the twin's class and settings (its
        public attributes but ``inplace``: kernel, stride, padding, dilation, groups, p, dim, ...)
        and, for a convolution, no bias where the twin has none."""
        for path, m, o in paired_submodules(new, module):
            if o is None:
                raise ValueError(f"{path} is missing")
            if isinstance(m, _NORMS):
                if not isinstance(o, cls.MIRRORED_NORMS):
                    raise ValueError(f"{path} must be a {cls.NORM_NAMES}, got {type(o).__name__}")
            elif m._modules:
                if set(o._modules) != set(m._modules):
                    raise ValueError(f"{path} must hold the layers {sorted(m._modules)}, got {sorted(o._modules)}")
            elif (type(o) is not type(m) or _settings(o) != _settings(m)
                  or (isinstance(m, nn.modules.conv._ConvNd) and m.bias is None and o.bias is not None)):
                raise ValueError(f"{path} must be {m!r}, got {o!r}")

    @classmethod
    def from_original(cls, module: nn.Module, **options: Any):
        """The fast twin of ``module``: constructor arguments read off it, its normalisation
        layers and bias-free convolutions mirrored, its state_dict loaded strictly, its device,
        dtype and training flags kept; ``module`` itself is left untouched."""
        try:
            args, kwargs = cls._init_args(module, **options)
        except (AttributeError, KeyError, IndexError) as exc:
            raise TypeError(f"{cls.__name__}.from_original: {type(module).__name__} does not have the structure "
                            f"of the original {cls.__name__} ({type(exc).__name__}: {exc})") from exc
        new = cls(*args, **kwargs)
        cls._check_layers(new, module)
        mirror_layers(new, module)
        return adopt(new, module)


def hooked_submodules(module: nn.Module) -> list:
    """Paths of ``module``'s descendants (not itself) that carry forward or backward hooks: a fused
    forward reads their parameters without calling them, so those hooks would no longer run."""
    found = []
    for path, m in module.named_modules():
        if path and any(getattr(m, table, None) for table in _HOOK_TABLES[:7]):
            found.append(path)
    return found


def graft(new: nn.Module, original: nn.Module) -> nn.Module:
    """Make ``new`` (``adopt``-ed from ``original``) hold ``original``'s own objects, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does: every submodule of the same class at the
    same path (and no module of this package below it) is ``original``'s instance itself; every other Parameter and buffer is ``original``'s
    Parameter/tensor object (so an optimizer built before the swap still trains it, and
    ``requires_grad``, device and dtype are the original's); the hook tables of ``original`` become
    ``new``'s (same dict objects: existing handles still remove them); training flags follow.

    Raises ValueError when a Parameter or buffer of ``new`` has no counterpart of the same kind and
    shape in ``original`` (``adopt``'s strict load makes that a bug, not a user error).
    """
    def walk(n_mod: nn.Module, o_mod: nn.Module, prefix: str) -> None:
        for name, n_child in list(n_mod._modules.items()):
            o_child = o_mod._modules.get(name)
            if n_child is None or o_child is None:
                continue
            # the original's instance itself, unless the twin's subtree holds modules of ours (a
            # Sequential of fast blocks must not become the Sequential of slow ones)
            if type(o_child) is type(n_child) and not any(
                    type(m).__module__.startswith("medattn_fast.") for m in n_child.modules()):
                n_mod._modules[name] = o_child
            else:
                walk(n_child, o_child, f"{prefix}{name}.")
                # a submodule replaced by one of ours keeps its hooks (the forward/backward kinds
                # never get here: convert refuses a block whose submodules carry them; the
                # state_dict kinds fire from the twin as they did from the original)
                _hand_over_hooks(n_child, o_child)
        for table in ("_parameters", "_buffers"):
            n_tab, o_tab = getattr(n_mod, table), getattr(o_mod, table)
            for name, t in list(n_tab.items()):
                if t is None:
                    continue
                o = o_tab.get(name)
                if o is None or o.shape != t.shape:
                    if table == "_buffers" and name in n_mod._non_persistent_buffers_set:
                        continue  # the compat module's own working buffer (not in any state_dict)
                    raise ValueError(f"graft: {prefix}{name} of {type(new).__name__} has no {table[1:-1]} of shape "
                                     f"{tuple(t.shape)} in {type(original).__name__}")
                n_tab[name] = o
        n_mod.training = o_mod.training

    walk(new, original, "")
    _hand_over_hooks(new, original)
    return new


def _hand_over_hooks(new: nn.Module, original: nn.Module) -> None:
    """``original``'s hook tables become ``new``'s (the same dict objects: the user's handles still
    remove them). A hook registered with its module (``register_load_state_dict_pre_hook``) holds
    a weak reference to ``original``; it is re-pointed at ``new``, in place under the same handle
    id — else, once ``original`` is dropped, ``load_state_dict`` would raise "the hook of a dead
    Module", and while it lives the hook would be handed the module no longer in the model."""
    for table in _HOOK_TABLES:
        if table not in original.__dict__:
            continue
        hooks = original.__dict__[table]
        if isinstance(hooks, dict):
            for key, hook in list(hooks.items()):
                if getattr(hook, "with_module", False) and getattr(hook, "module", lambda: None)() is original:
                    hooks[key] = type(hook)(hook.hook, new)
        object.__setattr__(new, table, hooks)

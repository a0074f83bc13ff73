"""``convert(model)``: swap the original networks' attention blocks for their fast compat twins.

Modules are matched by class name (``PAM_Module``, ``GaussianTrans``, ``AttentionBlock``, ...) and
by parameter structure: the compat class is built from the original with ``from_original``, which
infers the constructor arguments from the module and loads its ``state_dict`` with
``strict=True`` — a module of the same name but another structure fails that load and is left
alone (and reported). Parameters, buffers, training mode, device and dtype are kept. The outermost
matching module wins: a converted ``CSAttention`` already contains fast ``WinAttention`` etc.

    report = medattn_fast.convert(model)
    print(report)        # what was swapped, what was skipped and why
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Type

from torch import nn

FAMILIES = ("attention_unet", "danet", "guided_attention", "mtunet")


def compat_classes(families: Optional[Iterable[str]] = None) -> Dict[str, Type[nn.Module]]:
    """Original class name -> compat class, over the chosen compat families (default: all)."""
    out: Dict[str, Type[nn.Module]] = {}
    for fam in families or FAMILIES:
        if fam not in FAMILIES:
            raise ValueError(f"convert: argument 'families' must name members of {FAMILIES}, got {fam!r}")
        mod = importlib.import_module(f"medattn_fast.compat.{fam}")
        out.update(getattr(mod, "COMPAT_CLASSES"))
    return out


@dataclass
class ConvertReport:
    swapped: List[Tuple[str, str, str]] = field(default_factory=list)  # (path, original, compat)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)  # (path, class, reason)

    def __len__(self) -> int:
        return len(self.swapped)

    def __str__(self) -> str:
        lines = [f"convert: swapped {len(self.swapped)} module(s)"]
        for path, orig, new in self.swapped:
            lines.append(f"  {path or '<root>'}: {orig} -> {new}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} module(s) with a known name:")
            for path, cls, why in self.skipped:
                lines.append(f"  {path or '<root>'}: {cls}: {why}")
        return "\n".join(lines)


def _is_compat(module: nn.Module) -> bool:
    return type(module).__module__.startswith("medattn_fast.compat")


def convert(model: nn.Module, *, families: Optional[Iterable[str]] = None) -> ConvertReport:
    """Replace, in place, every instance of an original block inside ``model`` by its fast twin.

    Returns a :class:`ConvertReport`. ``model`` itself is converted only through its children: to
    convert a bare block, wrap it (``nn.Sequential(block)``) or call ``Compat.from_original``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    table = compat_classes(families)
    report = ConvertReport()

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            cls_name = type(child).__name__
            target = table.get(cls_name)
            if target is not None and not _is_compat(child):
                try:
                    new = target.from_original(child)
                except Exception as exc:  # structure differs: not the original class
                    report.skipped.append((path, cls_name, f"{type(exc).__name__}: {exc}".splitlines()[0]))
                else:
                    setattr(parent, name, new)
                    report.swapped.append((path, f"{type(child).__module__}.{cls_name}",
                                           f"{type(new).__module__}.{type(new).__name__}"))
                    continue
            visit(child, path)

    visit(model, "")
    return report

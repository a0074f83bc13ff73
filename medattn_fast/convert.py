"""``convert(model)``: swap the original networks' attention blocks for their fast compat twins.

A module is swapped only when all of these hold, and each refusal is reported with its reason:

1. **Its code is a version we reproduce.** The class name picks the candidates (``PAM_Module``,
   ``GaussianTrans``, ``AttentionBlock`` ...); the class's code must then be one we know: its
   methods other than ``__init__`` (inherited ones included), as tokens without comments,
   docstrings or layout, hashed (:func:`code_fingerprint`), must equal the fingerprint of one of
   the originals (DANet, Oktay's Attention-Gated-Networks, LeeJunHyun's Image_Segmentation, MONAI
   1.6.1, Multi-Scale-Attention, MT-UNet; :data:`KNOWN_ORIGINALS`) or of this package's own
   restatement (``medattn_fast.reference``). A fork whose forward differs — a 3-D ``CAM_Module``,
   another gate mode's code — is not swapped. So is a module holding a submodule whose code is not
   one we know where the twin runs a class of ours instead (an edited ``DoubleConv`` inside an
   original ``MTUNet``). ``trust=[cls]`` vouches for a class of your own.
2. **Its constructor state is one we reproduce**: ``from_original`` reads the channels, kernel
   sizes, strides, layer types and modes from the module and raises (-> skipped, with its message)
   on anything else (Oktay's ``concatenation_debug``/``_residual`` modes, a conv with padding or
   groups, another activation ...); it loads the ``state_dict`` with ``strict=True``.
3. **No submodule carries hooks** (forward/backward): the fused forward reads their parameters
   without calling them, so their hooks would silently stop running. State-dict hooks (state_dict
   pre/post, load_state_dict pre/post) on the block or any submodule are carried over and fire
   from the swapped module as they did (building the twin calls none of them).

The swap keeps everything a training script holds, as ``torch.nn.SyncBatchNorm.
convert_sync_batchnorm`` does: the same Parameter and buffer objects (an optimizer built before
``convert`` still trains them; ``requires_grad``, device and dtype are theirs), the same submodule
instances where the twin has a module of the same class, the swapped module's hooks and those of
every submodule replaced by a class of ours (the same hook tables, so existing handles still remove
them; a hook registered with its module is handed the swapped one) and every training flag. The outermost match wins
(a converted ``CSAttention`` already contains fast ``WinAttention`` ...).

    report = medattn_fast.convert(model, dry_run=True)   # what would change, nothing touched
    report = medattn_fast.convert(model)
    print(report)        # every swap, and every skip with its reason
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import io
import textwrap
import tokenize
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type

from torch import nn

from .compat._adopt import graft, hooked_submodules, paired_submodules

FAMILIES = ("attention_unet", "danet", "guided_attention", "mtunet")

_DANET = "DANet (junfu1115/DANet encoding/nn/da_att.py; also sinAshish/Multi-Scale-Attention src/models/attention.py)"
_OKTAY = "Oktay's Attention-Gated-Networks models/layers/grid_attention_layer.py"
_MTUNET = "MT-UNet (Dootmaan/MT-UNet model/MTUNet.py)"

# code_fingerprint of the originals' classes, measured on their repositories (HEAD of each, and
# MONAI 1.6.1 from PyPI): class name -> {fingerprint: where that code lives}.
KNOWN_ORIGINALS: Dict[str, Dict[str, str]] = {
    "PAM_Module": {"d59c7f0d3e784d22": _DANET},
    "CAM_Module": {"a17d99d6bd6dac02": _DANET},
    "DANetHead": {"77b956192ea7be03": "DANet (junfu1115/DANet encoding/models/sseg/danet.py)"},
    "GridAttentionBlock2D": {"25f28fd89bc75de6": _OKTAY},
    "GridAttentionBlock3D": {"25f28fd89bc75de6": _OKTAY},
    "Attention_block": {"02627f513c23da9f": "LeeJunHyun/Image_Segmentation network.py"},
    "AttentionBlock": {"ee94b85d34483440": "MONAI 1.6.1 monai.networks.nets.attentionunet"},
    "MEAttention": {"3326a59c5203507e": _MTUNET},
    "Attention": {"1c304b38339a2813": _MTUNET},
    "WinAttention": {"a031e9c535f80db9": _MTUNET},
    "DlightConv": {"b7e86cd4e4c71a27": _MTUNET},
    "GaussianTrans": {"26331a4b13f52f0d": _MTUNET},
    "CSAttention": {"35a086c1f00ae1e6": _MTUNET},
    "EAmodule": {"90a791af3003ac44": _MTUNET},
    "encoder_block": {"88a0af46df0f6edb": _MTUNET},
    "decoder_block": {"c2dc741babbb5fe6": _MTUNET},
    "MTUNet": {"f2b72163020797e3": _MTUNET},
    # the CNN parts, checked inside a swapped MTUNet (they have no compat twin of their own)
    "ConvBNReLU": {"629c506ef859dc09": _MTUNET},
    "DoubleConv": {"8b677bc8c0926cbe": _MTUNET},
    "U_encoder": {"77d232581ddca8ad": _MTUNET},
    "U_decoder": {"53272f30347ef424": _MTUNET},
    "DecoderStem": {"82001502d1880bbf": _MTUNET},
    "Stem": {"6c81751526122959": _MTUNET},
}

_REFERENCE_MODULES = ("attention_gate", "danet", "guided_attention", "mtunet", "gaussian_trans", "cross_attention")


# ---------------------------------------------------------------------------------------------
# code identity
# ---------------------------------------------------------------------------------------------

def _function_tokens(source: str) -> str:
    """The tokens of one ``def`` (its decorators, comments, docstring and layout dropped)."""
    import ast

    source = textwrap.dedent(source)
    tree = ast.parse(source)
    node = tree.body[0]
    skip = set()
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        skip = set(range(body[0].lineno, body[0].end_lineno + 1))
    lines = source.splitlines(keepends=True)[node.lineno - 1:]
    offset = node.lineno - 1
    out = []
    ignore = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
              tokenize.ENDMARKER, tokenize.ENCODING)
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type in ignore or (tok.start[0] + offset) in skip:
            continue
        out.append(tok.string)
    return " ".join(out)


def _methods(cls: type) -> Dict[str, object]:
    """Name -> function of every method ``cls`` defines or inherits below ``nn.Module``, ``__init__``
    excluded (the constructor state is checked on the instance instead)."""
    found: Dict[str, object] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith("torch."):
            continue
        for name, attr in vars(klass).items():
            if name in found or name == "__init__":
                continue
            fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            if inspect.isfunction(fn):
                found[name] = fn
    return found


@functools.lru_cache(maxsize=None)
def code_fingerprint(cls: type) -> Optional[str]:
    """A 16-hex-digit hash of ``cls``'s code (see the module docstring), or None when its source
    cannot be read (a class built by ``exec`` or in an interactive session)."""
    digest = hashlib.sha256()
    try:
        for name, fn in sorted(_methods(cls).items()):
            digest.update(f"{name}:{_function_tokens(inspect.getsource(fn))}\n".encode())
    except (OSError, TypeError, SyntaxError, tokenize.TokenError, IndexError):
        return None
    return digest.hexdigest()[:16]


_reference_fingerprints: Optional[Dict[str, Dict[str, str]]] = None


def _reference_known() -> Dict[str, Dict[str, str]]:
    """Class name -> {fingerprint: origin} of this package's restatements (medattn_fast.reference)."""
    global _reference_fingerprints
    if _reference_fingerprints is None:
        table: Dict[str, Dict[str, str]] = {}
        for mod_name in _REFERENCE_MODULES:
            try:
                mod = importlib.import_module(f"medattn_fast.reference.{mod_name}")
            except ImportError:
                continue
            for name, obj in vars(mod).items():
                if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == mod.__name__:
                    fp = code_fingerprint(obj)
                    if fp is not None:
                        table.setdefault(name, {})[fp] = f"{obj.__module__}.{obj.__qualname__}"
        _reference_fingerprints = table
    return _reference_fingerprints


def _known_code(compat_cls: type, original_name: str) -> Dict[str, str]:
    """Fingerprint -> origin of every version of ``original_name`` that ``compat_cls`` reproduces."""
    # a compat class may narrow the originals (ORIGINAL_CODE: fingerprints) and name its
    # restatements in medattn_fast.reference (REFERENCE_NAMES; default: the original's name)
    allowed = getattr(compat_cls, "ORIGINAL_CODE", None)
    known = {fp: where for fp, where in KNOWN_ORIGINALS.get(original_name, {}).items()
             if allowed is None or fp in allowed}
    refs = _reference_known()
    for name in getattr(compat_cls, "REFERENCE_NAMES", (original_name,)):
        known.update(refs.get(name, {}))
    return known


# ---------------------------------------------------------------------------------------------
# the table and the report
# ---------------------------------------------------------------------------------------------

def compat_classes(families: Optional[Iterable[str]] = None) -> Dict[str, Tuple[Type[nn.Module], ...]]:
    """Original class name -> candidate compat classes, over the chosen compat families (default: all).

    A name can have several candidates (the widely copied and MONAI's ``AttentionBlock``); the code
    fingerprint and ``from_original``'s structural checks decide between them.
    """
    out: Dict[str, Tuple[Type[nn.Module], ...]] = {}
    for fam in families or FAMILIES:
        if fam not in FAMILIES:
            raise ValueError(f"convert: argument 'families' must name members of {FAMILIES}, got {fam!r}")
        mod = importlib.import_module(f"medattn_fast.compat.{fam}")
        for name, target in getattr(mod, "COMPAT_CLASSES").items():
            targets = tuple(target) if isinstance(target, (tuple, list)) else (target,)
            out[name] = out.get(name, ()) + targets
    return out


@dataclass
class ConvertReport:
    """What ``convert`` did (or, with ``dry_run``, would do)."""

    swapped: List[Tuple[str, str, str]] = field(default_factory=list)  # (path, original, compat)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)  # (path, class, reason)
    dry_run: bool = False

    def __len__(self) -> int:
        return len(self.swapped)

    def __str__(self) -> str:
        verb = "would swap" if self.dry_run else "swapped"
        lines = [f"convert: {verb} {len(self.swapped)} module(s)"]
        for path, orig, new in self.swapped:
            lines.append(f"  {path or '<root>'}: {orig} -> {new}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} module(s) with a known name:")
            for path, cls, why in self.skipped:
                lines.append(f"  {path or '<root>'}: {cls}: {why}")
        return "\n".join(lines)


def _is_compat(module: nn.Module) -> bool:
    return type(module).__module__.startswith("medattn_fast.compat")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _unknown_submodule_code(new: nn.Module, original: nn.Module, trust: Tuple[type, ...]) -> str:
    """Why ``new`` (a twin of ``original``) would not compute what ``original`` does below its root:
    a submodule of ``original`` whose code is none we reproduce, where ``new`` runs a class of this
    package instead; "" when there is none."""
    for path, m, o in paired_submodules(new, original):
        if o is None or type(o) is type(m) or type(o) in trust or not type(m).__module__.startswith("medattn_fast."):
            continue
        fp = code_fingerprint(type(o))
        if fp is None or fp not in _known_code(type(m), type(o).__name__):
            return (f"its submodule {path} ({_qualified(type(o))}) has code {fp}, none of the versions "
                    f"{type(m).__name__} reproduces (pass trust=[{type(o).__name__}] to vouch for it)")
    return ""


def _twin(child: nn.Module, candidates: Sequence[type], trust: Tuple[type, ...]) -> Tuple[Optional[nn.Module], str]:
    """(the compat twin of ``child``, "") or (None, the reason it is not swapped)."""
    cls = type(child)
    name = cls.__name__
    trusted = cls in trust
    reasons, unknown_code = [], 0
    fp = None if trusted else code_fingerprint(cls)
    if not trusted and fp is None:
        return None, (f"the source of {_qualified(cls)} cannot be read, so its code cannot be checked against "
                      f"the versions we reproduce (pass trust=[{name}] to vouch for it)")
    for target in candidates:
        if not trusted:
            known = _known_code(target, name)
            if fp not in known:
                reasons.append(f"{target.__name__}: code fingerprint {fp} is none of the versions it reproduces "
                               f"({', '.join(sorted(set(known.values()))) or 'none'})")
                unknown_code += 1
                continue
        try:
            new = target.from_original(child)
        except Exception as exc:  # noqa: BLE001 - any refusal is reported, never raised
            reasons.append(f"{target.__name__}.from_original refused it: "
                           + f"{type(exc).__name__}: {exc}".splitlines()[0])
            continue
        why = _unknown_submodule_code(new, child, trust)
        if why:
            reasons.append(f"{target.__name__}: {why}")
            continue
        return new, ""
    if unknown_code == len(candidates):
        reasons.append(f"pass trust=[{name}] to vouch for a class of your own")
    return None, "; ".join(reasons)


def convert(model: nn.Module, *, families: Optional[Iterable[str]] = None, dry_run: bool = False,
            trust: Iterable[type] = ()) -> ConvertReport:
    """Replace, in place, every original block inside ``model`` that we reproduce exactly by its
    fast twin (see the module docstring for the rules); returns a :class:`ConvertReport` with every
    swap and every skip (a module with a known class name that is not swapped) and its reason.

    Args:
        model: any ``nn.Module``; converted through its children (to convert a bare block, wrap it
            in ``nn.Sequential`` or call ``Compat.from_original``).
        families: restrict to these compat families (default all of :data:`FAMILIES`).
        dry_run: build and check every twin, report, change nothing.
        trust: classes whose code you vouch for (a copy of an original with edits that do not
            change its math); their instances skip the code-fingerprint check, not the structural
            ones.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    trusted = tuple(trust)
    for cls in trusted:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"convert: argument 'trust' must hold nn.Module classes, got {cls!r}")
    table = compat_classes(families)
    report = ConvertReport(dry_run=bool(dry_run))

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            cls = type(child)
            candidates = table.get(cls.__name__)
            if candidates and not _is_compat(child):
                hooked = hooked_submodules(child)
                if hooked:
                    new, why = None, (f"submodule(s) {', '.join(hooked)} carry forward/backward hooks that the "
                                      f"fused forward would not run")
                else:
                    new, why = _twin(child, candidates, trusted)
                if new is None:
                    report.skipped.append((path, _qualified(cls), why))
                else:
                    if not dry_run:
                        setattr(parent, name, graft(new, child))
                    report.swapped.append((path, _qualified(cls), _qualified(type(new))))
                    continue
            visit(child, path)

    visit(model, "")
    return report

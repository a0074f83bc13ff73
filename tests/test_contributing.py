"""CONTRIBUTING.md's file tables match the tree: every file they name exists, and every op module
(public module or fused backend) is in them."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "CONTRIBUTING.md").read_text()
NAMED = set(re.findall(r"`([\w/.<>-]+\.(?:py|cpp|cu|h))`", TEXT))


def _exists(name: str) -> bool:
    return any((ROOT / base / name).is_file() for base in ("", "medattn_fast"))


def test_every_named_file_exists():
    concrete = {n for n in NAMED if "<" not in n and "/" in n}
    assert len(concrete) > 20
    missing = sorted(n for n in concrete if not _exists(n))
    assert not missing, f"CONTRIBUTING.md names files that do not exist: {missing}"


def test_every_op_module_is_named():
    ops = {p for p in (ROOT / "medattn_fast" / "ops").glob("*.py") if p.name not in ("__init__.py", "_validate.py")}
    unnamed = sorted(p.name for p in ops if f"ops/{p.name}" not in TEXT)
    assert not unnamed, f"CONTRIBUTING.md's family table lacks {unnamed}"

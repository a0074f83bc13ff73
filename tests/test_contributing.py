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


def test_every_environment_variable_is_documented_in_one_place():
    """README's "Environment variables" table lists every ``MEDATTN_*`` variable that the package,
    the tests, the benchmarks or the build scripts read."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Environment variables", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(MEDATTN_[A-Z0-9_]+)` \|", section, re.M))
    used = set()
    for folder in ("medattn_fast", "triton_kernels", "tests", "bench", ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".sh", "") and "__pycache__" not in path.parts:
                used |= set(re.findall(r"\bMEDATTN_[A-Z0-9_]+\b", path.read_text(errors="ignore")))
    assert len(used) >= 10, used
    assert not used - listed, f"undocumented in README's Environment variables: {sorted(used - listed)}"
    assert not listed - used, f"documented but read nowhere: {sorted(listed - used)}"

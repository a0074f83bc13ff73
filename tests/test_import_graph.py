"""The package's import graph has no cycle: every module of ``medattn_fast`` and ``triton_kernels``
imports only modules below it, so any one of them can be read (and imported) on its own.

The graph is built from the source with ``ast`` (imports inside functions included: a lazy import
that closes a circle is still a circle for the reader), not by importing anything.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("medattn_fast", "triton_kernels")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str) -> str:
    """The absolute name of ``from <level dots><target>`` written in ``module``."""
    if level == 0:
        return target
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _unalias(module: str) -> str:
    """The top-level ``triton_kernels/`` folder is imported as ``medattn_fast.triton_kernels``."""
    prefix = "medattn_fast.triton_kernels"
    return module[len("medattn_fast."):] if module == prefix or module.startswith(prefix + ".") else module


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the package modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [_unalias(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _unalias(_resolve(name, is_package, node.level, node.module or ""))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # ``import a.b.c`` needs a.b.c; the nearest package module that exists is the edge
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` as a list of modules (first == last), or [] when it has none."""
    state: Dict[str, int] = {}   # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 20, f"found only {len(graph)} modules under {PACKAGES}"
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_models_are_built_on_nn_only():
    """The full networks use the clean modules of medattn_fast.nn, never the drop-ins (compat) or the
    oracle (reference): their reference twins are built outside them (medattn_fast/testing/twins.py)."""
    graph = import_graph()
    models = [m for m in graph if m == "medattn_fast.models" or m.startswith("medattn_fast.models.")]
    assert len(models) > 3
    forbidden = {m: sorted(t for t in graph[m] if t.split(".")[1] in ("compat", "reference")) for m in models}
    assert not {m: t for m, t in forbidden.items() if t}, forbidden


def upward_imports_in_ops(graph: Dict[str, Set[str]]) -> Dict[str, List[str]]:
    """Private modules of ``medattn_fast.ops`` (each ``_<family>_<backend>.py``, and the pieces they
    share: ``_<family>_fused``, ``_batch_norm``, ``_custom_op``, ``_families`` ...) that import a public
    family module (``ops/<family>.py``). Backends import down only and are never called back from
    the family module: -> the public modules they import."""
    prefix = "medattn_fast.ops."
    leaves = {m[len(prefix):] for m in graph if m.startswith(prefix)}
    public = {leaf for leaf in leaves if not leaf.startswith("_")}
    found = {}
    for module, targets in graph.items():
        if module.startswith(prefix) and module[len(prefix):].startswith("_"):
            up = sorted(t for t in targets if t.startswith(prefix) and t[len(prefix):] in public)
            if up:
                found[module] = up
    return found


def test_backend_files_import_down_only():
    graph = import_graph()
    backends = [m for m in graph if m.startswith("medattn_fast.ops._") and m.rsplit("_", 1)[-1] in
                ("cpp", "cuda", "triton")]
    assert len(backends) >= 11, backends
    found = upward_imports_in_ops(graph)
    assert not found, f"private ops modules importing a public family module: {found}"


def test_the_checker_finds_a_backend_importing_its_family():
    graph = {"medattn_fast.ops.position": {"medattn_fast.ops._custom_op"},
             "medattn_fast.ops._custom_op": set(),
             "medattn_fast.ops._position_cpp": {"medattn_fast.ops._custom_op", "medattn_fast.ops.position"},
             "medattn_fast.ops": {"medattn_fast.ops.position", "medattn_fast.ops._position_cpp"}}
    assert upward_imports_in_ops(graph) == {"medattn_fast.ops._position_cpp": ["medattn_fast.ops.position"]}
    del graph["medattn_fast.ops._position_cpp"]
    assert upward_imports_in_ops(graph) == {}


# ------------------------------------------------------------------------------------------------
# bench/ and tests/ never import each other: what both need (the reference twins, MONAI's
# AttentionUnet restated) lives in medattn_fast/testing/, which both may import.
# ------------------------------------------------------------------------------------------------

# the tests whose subject is the benchmark code itself (bench/gpu_check.sh and its report included):
# they import the bench module they test
BENCH_TESTS = ("test_bench_*.py", "test_loss_curves.py", "test_gpu_check_script.py")
# calls that load a module from a file path, around the import system
PATH_LOADERS = {"spec_from_file_location", "run_path", "SourceFileLoader", "load_source", "exec"}


def imported_roots(tree: ast.AST) -> Set[str]:
    """The top-level names of every absolute import in ``tree`` (imports inside functions included)."""
    roots: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def path_loads(tree: ast.AST) -> List[str]:
    """Calls in ``tree`` that load code from a file path (``spec_from_file_location``, ``runpy.run_path``,
    ``SourceFileLoader``, ``exec``), by name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in PATH_LOADERS:
                found.append(f"{name}() at line {node.lineno}")
    return found


def bench_tests_crossings(root: Path = ROOT) -> Dict[str, List[str]]:
    """File -> why it crosses the bench/tests line: a file of ``bench/`` importing ``tests`` or one
    of the test helpers (``tests/_*.py``, importable by name under pytest), or loading any file by
    path; a file of ``tests/`` importing ``bench``, unless it is a test of the bench itself
    (:data:`BENCH_TESTS`)."""
    helpers = {p.stem for p in (root / "tests").glob("*.py")} | {"tests", "conftest"}
    bench_tests = {p for pattern in BENCH_TESTS for p in (root / "tests").glob(pattern)}
    found: Dict[str, List[str]] = {}
    for path in sorted((root / "bench").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        why = [f"imports {m}" for m in sorted(imported_roots(tree) & helpers)] + path_loads(tree)
        if why:
            found[str(path.relative_to(root))] = why
    for path in sorted((root / "tests").rglob("*.py")):
        if path in bench_tests:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        if "bench" in imported_roots(tree):
            found[str(path.relative_to(root))] = ["imports bench"]
    return found


def test_bench_and_tests_do_not_import_each_other():
    assert (ROOT / "medattn_fast" / "testing" / "twins.py").is_file()
    found = bench_tests_crossings()
    assert not found, f"bench/ and tests/ must not import each other (shared code: medattn_fast/testing/): {found}"


def test_the_checker_finds_bench_and_tests_crossing(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "_helpers.py").write_text("X = 1\n")
    (tmp_path / "tests" / "test_bench_run.py").write_text("from bench.run import main\n")      # tests the bench
    (tmp_path / "bench" / "cases_ok.py").write_text("from medattn_fast.testing.twins import reference_twin\n")
    assert bench_tests_crossings(tmp_path) == {}
    (tmp_path / "tests" / "test_models.py").write_text("def f():\n    from bench.twins import reference_twin\n")
    (tmp_path / "bench" / "cases_a.py").write_text("from _helpers import X\n")
    (tmp_path / "bench" / "cases_b.py").write_text(
        "import importlib.util\nspec = importlib.util.spec_from_file_location('m', 'tests/_helpers.py')\n")
    assert bench_tests_crossings(tmp_path) == {
        "bench/cases_a.py": ["imports _helpers"],
        "bench/cases_b.py": ["spec_from_file_location() at line 2"],
        "tests/test_models.py": ["imports bench"]}

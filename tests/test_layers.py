"""The layers hold: passes/ is a leaf, onnxruntime lives in bnfold/validate, nobody imports the CLI, no cycles.

Three independent checks of the same rules (docs/rules.md, "Layers"):

- what ``import bnfold.passes`` really loads, in a fresh interpreter;
- the import graph of every project module, read from the source with ``ast`` — every ``import``, including
  those inside functions (only ``if TYPE_CHECKING:`` blocks are left out, they never run) — checked for the
  layer rules and for cycles;
- the ruff lint (rule TID251 with the nested ``ruff.toml`` files) passes on the tree and fails on a deliberate
  violation in each layer.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Files that may import the CLI although they are not in bnfold/cli: the `python -m bnfold` entry point.
CLI_IMPORT_EXCEPTIONS = frozenset({"bnfold.__main__"})
# Packages that may import onnxruntime: validation only (sessions, verifier, environment probe).
ONNXRUNTIME_PACKAGES = ("bnfold.validate",)


# -- the import graph ----------------------------------------------------------------------------------------


def project_modules() -> dict[str, Path]:
    """Every module of the project by dotted name: bnfold/ (without the passes symlink) and passes/."""
    modules: dict[str, Path] = {}
    roots = [(REPO / "bnfold", "bnfold"), (REPO / "passes", "bnfold.passes")]
    for root, package in roots:
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root)
            if relative.parts[0] == "passes" and package == "bnfold":
                continue  # bnfold/passes is a symlink to passes/, walked as its own root
            parts = [package, *relative.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement anywhere in ``tree`` (functions included), except under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            if _is_type_checking_block(child):
                pending.extend(child.orelse)  # (the else branch runs)
            else:
                pending.append(child)
    return found


def imported_names(module: str, path: Path, known: set[str]) -> set[str]:
    """Dotted names ``module`` imports: project modules resolved exactly, other packages by their top name."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for statement in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(statement, ast.Import):
            targets = [alias.name for alias in statement.names]
        else:
            base = statement.module or ""
            if statement.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (statement.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in statement.names]
        for target in targets:
            while target not in known and "." in target and target.split(".")[0] in ("bnfold",):
                target = target.rsplit(".", 1)[0]  # `import bnfold.x.Name`: the longest module prefix
            names.add(target if target in known else target.split(".")[0])
    names.discard(module)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_names(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_reader_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nimport numpy\nif TYPE_CHECKING:\n    import bnfold.cli\nelse:\n"
        "    import onnx\ndef f():\n    from bnfold.passes import rule\n    import onnxruntime.capi\n"
    )
    known = {"bnfold", "bnfold.passes", "bnfold.passes.rule", "bnfold.cli", "probe"}
    assert imported_names("probe", source, known) == {"typing", "numpy", "onnx", "bnfold.passes.rule", "onnxruntime"}


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_passes_import_nothing_of_bnfold_outside_bnfold_passes(graph):
    allowed_external = {"onnx", "onnx_ir", "numpy", "ml_dtypes", "__future__"}
    violations = {}
    for module, targets in graph.items():
        if not module.startswith("bnfold.passes"):
            continue
        project = {t for t in targets if t == "bnfold" or t.startswith("bnfold.")}
        outside = {t for t in project if not t.startswith("bnfold.passes")}
        third_party = {t for t in targets - project if t not in allowed_external and t not in sys.stdlib_module_names}
        if outside or third_party:
            violations[module] = sorted(outside | third_party)
    assert violations == {}


def test_onnxruntime_is_imported_only_in_validation(graph):
    importers = sorted(m for m, targets in graph.items() if "onnxruntime" in targets)
    assert importers, "no module imports onnxruntime: the graph reader is broken"
    assert [m for m in importers if not m.startswith(ONNXRUNTIME_PACKAGES)] == []


def test_nobody_outside_the_cli_imports_the_cli(graph):
    importers = {
        module
        for module, targets in graph.items()
        if any(t == "bnfold.cli" or t.startswith("bnfold.cli.") for t in targets)
        and not module.startswith("bnfold.cli")
    }
    assert importers <= CLI_IMPORT_EXCEPTIONS


def test_no_import_cycle_in_passes(graph):
    passes = {m: {t for t in targets if t.startswith("bnfold.passes")} for m, targets in graph.items()}
    passes = {m: targets for m, targets in passes.items() if m.startswith("bnfold.passes")}
    assert cycles(passes) == []


def test_no_import_cycle_among_project_modules(graph):
    found = cycles(graph)
    if found and all(not any(m.startswith("bnfold.passes") for m in cycle) for cycle in found):
        pytest.xfail(f"cycles outside passes/ (the file-handling split of issue 16 removes them): {found}")
    assert found == []


# -- what importing passes loads -----------------------------------------------------------------------------


def test_import_bnfold_passes_loads_no_higher_layer():
    code = (
        "import bnfold.passes, sys; "
        "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in ('bnfold', 'onnxruntime'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    loaded = result.stdout.split()
    assert "bnfold.passes.fold_batch_norm" in loaded  # (the probe really imported the passes)
    assert [m for m in loaded if m != "bnfold" and not m.startswith("bnfold.passes")] == []


# -- the ruff lint -------------------------------------------------------------------------------------------


def _ruff() -> list[str]:
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.importorskip("ruff")
    return [sys.executable, "-m", "ruff"]


def _lint(source: str, filename: str) -> str:
    """TID251 findings for ``source`` as if it were the file ``filename`` (its directory's ruff.toml applies)."""
    command = [*_ruff(), "check", "--no-cache", "--select", "TID251", "--output-format", "concise"]
    result = subprocess.run(
        [*command, "--stdin-filename", filename, "-"], input=source, capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode in (0, 1), result.stderr
    return result.stdout if result.returncode else ""


@pytest.mark.parametrize(
    ("filename", "source", "banned"),
    [
        ("passes/probe.py", "from bnfold.errors import UsageError\n", "bnfold.errors"),
        ("passes/probe.py", "def f():\n    from bnfold.training import opsets\n", "bnfold.training"),
        ("passes/probe.py", "import onnxruntime\n", "onnxruntime"),
        ("bnfold/files/probe.py", "import onnxruntime as ort\n", "onnxruntime"),
        ("bnfold/recalibration/probe.py", "from onnxruntime.capi import _pybind_state\n", "onnxruntime"),
        ("bnfold/probe.py", "from bnfold.cli import render\n", "bnfold.cli"),
        ("bnfold/validate/probe.py", "from bnfold import cli\n", "bnfold.cli"),
        ("bnfold/cli/probe.py", "import onnxruntime\n", "onnxruntime"),
    ],
    ids=[
        "passes_errors",
        "passes_in_function",
        "passes_ort",
        "files_ort",
        "recal_ort",
        "lib_cli",
        "validate_cli",
        "cli_ort",
    ],
)
def test_lint_fails_a_deliberate_layer_violation(filename, source, banned):
    assert f"`{banned}` is banned" in _lint(source, filename)


@pytest.mark.parametrize(
    ("filename", "source"),
    [
        ("passes/probe.py", "from bnfold.passes.rule import FoldPlan\n"),
        ("bnfold/validate/probe.py", "import onnxruntime\n"),
        ("bnfold/cli/probe.py", "from bnfold.cli import render\n"),
        ("bnfold/__main__.py", "from bnfold.cli import main\n"),
    ],
    ids=["passes_self", "validate_ort", "cli_self", "main_entry_point"],
)
def test_lint_allows_what_the_layers_allow(filename, source):
    assert _lint(source, filename) == ""


def test_lint_passes_on_the_tree():
    result = subprocess.run(
        [*_ruff(), "check", "--no-cache", "--select", "TID251", "bnfold", "passes"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr

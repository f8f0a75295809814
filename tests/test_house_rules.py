"""The package's structure rules, checked on its source with ``ast``: imports run down the
layers, no knnlm import hides inside a function outside the CLI, no private name crosses a
module, and no function body grows past 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "knnlm"

# Lower layers first (ARCHITECTURE.md). A module may import its own layer and the ones before.
LAYERS = [
    {"errors", "locking", "fileio", "provenance", "prefetch", "settings"},
    {"data"},
    {"lm"},
    {"forward_pass"},
    {"retrieval"},
    {"token_scores", "neighbour_cache", "sweep", "generation", "retrieved_entries"},
    {"evaluate", "continuations", "index_perplexity", "frontier", "tune"},
    {"experiments"},
    {"api"},  # the Python API offers the analyses too
    {"report"},
    {"inspect"},
    {"cli", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        top = rel.parts[0].removesuffix(".py")
        yield path, top, ast.parse(path.read_text(encoding="utf-8"))


def _knnlm_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("knnlm"):
            yield node


def unranked(modules) -> list[str]:
    """Packages and modules with no layer: the layering check would let them import anything."""
    return sorted({top for _, top, _ in modules if top not in RANK})


def upward_imports(modules) -> list[str]:
    bad = []
    for path, top, tree in modules:
        for node in _knnlm_imports(tree):
            parts = node.module.split(".")
            if len(parts) < 2 or top not in RANK:
                continue  # reported by unranked
            if RANK.get(parts[1], -1) > RANK[top]:
                bad.append(f"{path.name}:{node.lineno} {top} imports {node.module}")
    return bad


def function_imports(modules) -> list[str]:
    bad = []
    for path, top, tree in modules:
        if top == "cli":  # the CLI imports lazily for start-up time
            continue
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                bad += [f"{path.name}:{node.lineno}" for node in _knnlm_imports(fn)]
    return sorted(set(bad))


def private_imports(modules) -> list[str]:
    return [f"{path.name}:{node.lineno} {a.name}" for path, _, tree in modules
            for node in _knnlm_imports(tree) for a in node.names
            if a.name.startswith("_") and a.name != "__version__"]  # fmt: skip


def body_lines(fn) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    lines = {i for stmt in body for i in range(stmt.lineno, stmt.end_lineno + 1)}
    for node in (n for stmt in body for n in ast.walk(stmt)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            lines -= set(range(node.lineno, node.end_lineno + 1))  # nested: counted alone
    return len(lines)


def long_functions(modules, limit: int) -> list[str]:
    return [f"{path.name}:{fn.name} {body_lines(fn)}" for path, _, tree in modules
            for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
            and body_lines(fn) > limit]  # fmt: skip


@pytest.fixture(scope="module")
def modules():
    return list(_modules())


def test_every_module_has_a_layer(modules):
    assert unranked(modules) == []


def test_imports_run_down_the_layers(modules):
    assert upward_imports(modules) == []


def test_no_knnlm_import_inside_a_function_outside_the_cli(modules):
    assert function_imports(modules) == []


def test_no_private_name_crosses_a_module(modules):
    assert private_imports(modules) == []


def test_no_function_body_over_80_lines_and_few_over_50(modules):
    assert long_functions(modules, 80) == []
    assert len(long_functions(modules, 50)) <= 10


def test_the_checks_catch_what_they_forbid(tmp_path):
    bad = tmp_path / "data"
    src = (
        "from knnlm.report.claims import x\n"
        "from knnlm.errors import _hidden\n"
        "def f():\n    from knnlm.errors import KnnlmError\n" + "    y = 1\n" * 81
    )
    tree = ast.parse(src)
    mods = [(bad / "corpus.py", "data", tree)]
    assert unranked(mods + [(tmp_path / "newpkg" / "x.py", "newpkg", tree)]) == ["newpkg"]
    assert len(upward_imports(mods)) == 1
    assert len(function_imports(mods)) == 1
    assert private_imports(mods) == ["corpus.py:2 _hidden"]
    assert long_functions(mods, 80) == ["corpus.py:f 82"]

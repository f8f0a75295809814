#!/usr/bin/env python
"""Targeted mutation check: break one thing at a time and rerun the tests meant to catch it.

Each mutant of ``mutants.py`` edits the source of one named function (or class, or module-level
constant) wherever it lives in ``src/knnlm``, so it follows the code when the code moves. It is
applied to its own copy of ``src/knnlm`` in a temporary folder; its tests run with
``PYTHONPATH`` pointing at that copy (checked to win over the installed package). A mutant is
*killed* when its tests fail, *survived* when they pass. An anchor that is not defined exactly
once, or a pattern that does not occur exactly once inside it, is an error, not a pass. The
selected tests are first run on an unmodified copy: they must pass there, or no kill means
anything.

    python tests/mutation/run.py              # every mutant, 2 in parallel
    python tests/mutation/run.py -k claim -j 1
    python tests/mutation/run.py --list
    python tests/mutation/run.py --check     # anchors, patterns and test ids only, no test runs

Exit code 0 only when every mutant is killed, every anchor and pattern matched and the
baseline passed.
"""

from __future__ import annotations

import argparse
import ast
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SRC = REPO / "src" / "knnlm"
sys.path.insert(0, str(HERE))

from mutants import MUTANTS, Mutant  # noqa: E402


def defined_names(tree: ast.Module) -> dict[str, ast.AST]:
    """Every def and class by qualified name (``Class.method``, ``outer.inner``), and every
    module-level assignment by its name (for constants such as a threshold)."""
    found: dict[str, ast.AST] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found[prefix + child.name] = child
                walk(child, prefix + child.name + ".")

    walk(tree, "")
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for t in targets if isinstance(node, (ast.Assign, ast.AnnAssign)) else []:
            if isinstance(t, ast.Name):
                found.setdefault(t.id, node)
    return found


def module_of(path: Path, pkg: Path) -> str:
    return ".".join(path.relative_to(pkg).with_suffix("").parts)


def locate(anchor: str, pkg: Path) -> tuple[Path | None, str]:
    """The file defining ``anchor`` (``name``, ``Class.method`` or ``module.path:name``);
    an error message instead when no module or more than one defines it."""
    module, _, qualname = anchor.rpartition(":")
    hits = [path for path in sorted(pkg.rglob("*.py"))
            if (not module or module_of(path, pkg) == module)
            and qualname in defined_names(ast.parse(path.read_text()))]  # fmt: skip
    if len(hits) == 1:
        return hits[0], ""
    if not hits:
        return None, f"{anchor} is defined nowhere in src/knnlm"
    where = ", ".join(module_of(h, pkg) for h in hits)
    return None, f"{anchor} is defined in {where}: prefix it with its module ('module:{anchor}')"


def span(text: str, node: ast.AST) -> tuple[int, int]:
    """Character offsets of the lines ``node`` covers (decorators included)."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts[first - 1], starts[node.end_lineno]


def apply(mutant: Mutant, pkg: Path) -> str | None:
    """Edit the copy at ``pkg``; returns an error message when an anchor is not found once or
    its pattern does not occur exactly once inside the anchor's source."""
    for anchor, old, new in mutant.edits:
        path, err = locate(anchor, pkg)
        if path is None:
            return err
        text = path.read_text()
        begin, end = span(text, defined_names(ast.parse(text))[anchor.rpartition(":")[2]])
        count = text[begin:end].count(old)
        if count != 1:
            return f"pattern found {count} times in {anchor}: {old!r}"
        path.write_text(text[:begin] + text[begin:end].replace(old, new) + text[end:])
    return None


def copy_package(root: Path, name: str) -> Path:
    dest = root / name
    shutil.copytree(SRC, dest / "knnlm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "--no-header", "-p", "no:cacheprovider",
           "-W", "ignore", *tests]  # fmt: skip
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=timeout)  # fmt: skip
        code, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        code, out = -1, f"timed out after {timeout:.0f}s"
    return code, out, time.perf_counter() - t0


def first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return line[:160]
    return out.strip().splitlines()[-1][:160] if out.strip() else ""


def check_not_shadowed(root: Path) -> None:
    copy = copy_package(root, "_import_check")
    env = dict(os.environ, PYTHONPATH=str(copy))
    where = subprocess.run([sys.executable, "-c", "import knnlm; print(knnlm.__file__)"],
                           cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
    got = where.stdout.strip()
    if not got.startswith(str(copy)):
        sys.exit(f"error: PYTHONPATH does not win over the installed knnlm ({got or where.stderr})")
    shutil.rmtree(copy)


def classify(code: int) -> str:
    """pytest exit codes: 1 tests failed, 2 collection error (both kill the mutant; a
    timeout too); 0 passed (survived); 3-5 internal/usage error or nothing collected."""
    if code == 0:
        return "SURVIVED"
    if code in (1, 2, -1):
        return "killed"
    return f"ERROR (pytest exit {code})"


def check_collects(copy: Path, tests: list[str]) -> list[str]:
    """Node ids that pytest cannot find on the unmodified package (empty when all exist)."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
           *tests]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode == 0:
        return []
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "not found" in ln or "ERROR" in ln]
    return lines or [(p.stdout + p.stderr)[-500:]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", dest="select", help="run mutants whose name contains this")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="mutants run in parallel")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run")
    ap.add_argument("--list", action="store_true", help="list mutants and their tests")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmodified run")
    ap.add_argument("--check", action="store_true", help="only check patterns and test ids")
    args = ap.parse_args()

    mutants = [m for m in MUTANTS if not args.select or args.select in m.name]
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        sys.exit("error: duplicate mutant names")
    if args.list:
        for m in mutants:
            anchors = ", ".join(dict.fromkeys(a for a, _, _ in m.edits))
            print(f"{m.name} [{anchors}]: {m.why}\n    " + "\n    ".join(m.tests))
        return 0
    if not mutants:
        sys.exit(f"error: no mutant matches {args.select!r}")

    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="knnlm-mutants-"))
    try:
        check_not_shadowed(root)
        errors: list[str] = []
        jobs: list[tuple[Mutant | None, Path]] = []  # None: the unmodified baseline
        for m in mutants:
            copy = copy_package(root, m.name)
            err = apply(m, copy / "knnlm")
            if err:
                errors.append(f"{m.name}: {err}")
                print(f"ERROR    {m.name}: {err}", flush=True)
            else:
                jobs.append((m, copy))
        union = sorted({t for m, _ in jobs for t in m.tests})
        missing = check_collects(copy_package(root, "_collect"), union)
        if missing:
            errors.append(f"tests not found (renamed?): {missing}")
            print(f"ERROR    tests not found (renamed?): {missing}", flush=True)
            jobs = []
        elif args.check:
            found = f"{len(jobs)}/{len(mutants)} anchors found, patterns match once"
            print(f"{found}; all {len(union)} tests exist")
            return 1 if errors else 0
        elif not args.no_baseline:
            jobs.insert(0, (None, copy_package(root, "_baseline")))

        def work(job: tuple[Mutant | None, Path]) -> tuple[Mutant | None, str, str]:
            m, copy = job
            code, out, secs = run_tests(copy, union if m is None else list(m.tests), args.timeout)
            if m is None:
                name, status = "baseline (unmodified)", "passed" if code == 0 else "FAILED"
                detail = "" if code == 0 else first_failure(out)
            else:
                name, status = m.name, classify(code)
                detail = "its tests pass on the mutant" if code == 0 else first_failure(out)
            print(f"{status:8} {name} ({secs:.1f}s) {detail}", flush=True)
            return m, status, out

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(work, jobs))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    baseline_ok = True
    killed, survivors = 0, []
    for m, status, out in results:
        if m is None:
            baseline_ok = status == "passed"
            if not baseline_ok:
                print("\nbaseline output:\n" + out[-4000:])
        elif status == "killed":
            killed += 1
        elif status == "SURVIVED":
            survivors.append(m.name)
        else:
            errors.append(f"{m.name}: {status}")
    total = len(mutants)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru.ru_utime + ru.ru_stime
    print(f"\nkilled {killed}/{total} in {wall:.0f}s wall, {cpu:.0f}s CPU in test processes "
          f"({args.jobs} in parallel, load average {os.getloadavg()[0]:.1f})")  # fmt: skip
    if survivors:
        print("survivors: " + ", ".join(survivors))
    if errors:
        print("errors (the code or the tests moved; re-target these mutants):")
        for e in errors:
            print("  " + e)
    if not baseline_ok:
        print("the selected tests FAIL on the unmodified code: kills mean nothing")
    return 0 if (killed == total and not errors and baseline_ok) else 1


if __name__ == "__main__":
    sys.exit(main())

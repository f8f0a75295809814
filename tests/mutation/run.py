#!/usr/bin/env python
"""Targeted mutation check: break one thing at a time and rerun the tests meant to catch it.

Each mutant of ``mutants.py`` is applied to its own copy of ``src/knnlm`` in a temporary folder;
its tests run with ``PYTHONPATH`` pointing at that copy (checked to win over the installed
package). A mutant is *killed* when its tests fail, *survived* when they pass. A pattern that
no longer matches exactly once is an error, not a pass. The selected tests are first run on an
unmodified copy: they must pass there, or no kill means anything.

    python tests/mutation/run.py              # every mutant, 2 in parallel
    python tests/mutation/run.py -k claim -j 1
    python tests/mutation/run.py --list
    python tests/mutation/run.py --check     # patterns and test ids only, no test runs

Exit code 0 only when every mutant is killed, every pattern matched and the baseline passed.
"""

from __future__ import annotations

import argparse
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


def apply(mutant: Mutant, pkg: Path) -> str | None:
    """Edit the copy at ``pkg``; returns an error message when a pattern does not match once."""
    for file, old, new in mutant.edits:
        path = pkg / file
        if not path.is_file():
            return f"{file} does not exist"
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            return f"pattern found {count} times in {file}: {old!r}"
        path.write_text(text.replace(old, new))
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
            print(f"{m.name}: {m.why}\n    " + "\n    ".join(m.tests))
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
            print(f"{len(jobs)}/{len(mutants)} patterns match once; all {len(union)} tests exist")
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

#!/usr/bin/env bash
# The API reference, generated from the docstrings by pdoc into ${1:-docs/api} (not committed:
# CI builds it so it cannot rot; run this script to read it locally). Any output on stderr
# (an import error, a pdoc warning) fails the build.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-docs/api}"
LOG="$(mktemp)"
# Every public module, not only the package's top-level names (its __all__ lists names, and
# pdoc would follow it and skip the submodules).
MODULES="$(python -c 'import pkgutil, knnlm
names = [m.name for m in pkgutil.iter_modules(knnlm.__path__, "knnlm.")]  # packages recurse
print(" ".join(["knnlm"] + [n for n in names if not any(p.startswith("_") for p in n.split("."))]))')"
# shellcheck disable=SC2086  # one word per module
python -m pdoc --docformat markdown -o "$OUT" $MODULES 2>"$LOG" || { cat "$LOG" >&2; exit 1; }
if [ -s "$LOG" ]; then
  cat "$LOG" >&2
  echo "pdoc printed warnings (above): fix the docstrings" >&2
  exit 1
fi
test -s "$OUT/knnlm.html"
test -s "$OUT/knnlm/retrieval/datastore.html"  # the submodules too
echo "API reference: $OUT/index.html"

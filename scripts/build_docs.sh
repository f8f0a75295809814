#!/usr/bin/env bash
# The API reference, generated from the docstrings by pdoc into ${1:-docs/api} (not committed:
# CI builds it so it cannot rot; run this script to read it locally). Any output on stderr
# (an import error, a pdoc warning) fails the build.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-docs/api}"
LOG="$(mktemp)"
python -m pdoc --docformat markdown -o "$OUT" knnlm 2>"$LOG" || { cat "$LOG" >&2; exit 1; }
if [ -s "$LOG" ]; then
  cat "$LOG" >&2
  echo "pdoc printed warnings (above): fix the docstrings" >&2
  exit 1
fi
test -s "$OUT/knnlm.html"
echo "API reference: $OUT/index.html"

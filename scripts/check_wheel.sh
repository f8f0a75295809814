#!/usr/bin/env bash
# The wheel builds and works outside the source tree: installed into a fresh virtualenv, it
# carries its package data (the embedded WikiText-2 slice) and its CLI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv "$WORK/build"
"$WORK/build/bin/python" -m pip install -q build
"$WORK/build/bin/python" -m build -q --wheel --outdir "$WORK/dist" . >/dev/null
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q torch==2.13.0
"$WORK/venv/bin/python" -m pip install -q "$WORK"/dist/knnlm-*.whl
cd "$WORK"  # away from src/: the installed copy is the one imported
"$WORK/venv/bin/knnlm" --version
"$WORK/venv/bin/python" - <<'PY'
from importlib.resources import files

data = files("knnlm.data.wikitext2")
for name in ("train.txt.gz", "valid.txt.gz", "test.txt.gz", "ATTRIBUTION.md"):
    assert data.joinpath(name).is_file(), f"{name} missing from the wheel"
import knnlm
assert "site-packages" in knnlm.__file__, knnlm.__file__
print("wheel ok:", knnlm.__file__)
PY

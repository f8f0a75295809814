#!/usr/bin/env bash
# The declared version floors install together and work: a fresh virtualenv gets torch as
# README pins it and exactly the floor (pkg==floor) of every other dependency and extra,
# `pip check` confirms they agree, and a fast subset of the tests runs (about 2 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="$(mktemp -d)/floors"
trap 'rm -rf "$(dirname "$VENV")"' EXIT
"$PY" -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# shellcheck disable=SC2046
python -m pip install -q torch==2.13.0 $(python scripts/floors.py faiss lora hf report) \
  pytest
python -m pip install -q --no-deps -e .
python -m pip check
python -m pip freeze | grep -iE '^(numpy|transformers|tokenizers|safetensors|typer|click|datasets|peft|faiss-cpu|matplotlib)=='
python -m pytest -q -p no:cacheprovider tests/test_api.py tests/test_adapters_and_perplexity.py \
  tests/test_cli_options.py tests/test_generation.py \
  tests/test_reference_models.py::test_lora_on_llama_trains_every_target_and_merges_by_hand

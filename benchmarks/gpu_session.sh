#!/usr/bin/env bash
# The GPU part of issue 19 in one call, within 8 minutes; needs torch with CUDA, not FAISS.
#   bash benchmarks/gpu_session.sh OUT_DIR [WIKITEXT2_DIR]
# 1. bench_search.py --part gpu --skip-eval: search of 128 queries (k = 1024) over 1M and 10M
#    synthetic float16 keys of d = 1024 against the copy-bandwidth limit, and agreement with a
#    float64 brute force at 1M (-> OUT_DIR/search_gpu_synthetic.json).
# 2. bench_search.py --part gpu --skip-search: kNN-LM evaluation with --search exact against the
#    plain LM, random GPT-2 (12 layers, d = 768), ~500k keys, k = 1024; WikiText-2 prefixes when
#    WIKITEXT2_DIR is given, else synthetic text (-> OUT_DIR/search_gpu_eval.json).
# Each step has its own time limit, so a slow step still leaves the other's JSON in OUT_DIR.
set -u -o pipefail
out=${1:?OUT_DIR}; corpus=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
python3 -c "import faiss; print('faiss', faiss.__version__)" 2>/dev/null || echo "faiss: not installed (not needed)"
timeout 150 python3 benchmarks/bench_search.py --part gpu --skip-eval \
  --out "$out/search_gpu_synthetic.json" >/dev/null 2>"$out/search_gpu_synthetic.err"
echo "synthetic search rc=$?"; tail -n 5 "$out/search_gpu_synthetic.err"
timeout 300 python3 benchmarks/bench_search.py --part gpu --skip-search ${corpus:+--corpus "$corpus"} \
  --out "$out/search_gpu_eval.json" >/dev/null 2>"$out/search_gpu_eval.err"
echo "kNN-LM eval rc=$?"; tail -n 5 "$out/search_gpu_eval.err"
for f in "$out"/search_gpu_*.json; do echo "== $f"; cat "$f"; done

#!/usr/bin/env bash
# Exact search on a GPU in one call, within 8 minutes; needs torch with CUDA, not FAISS.
#   bash benchmarks/gpu_session.sh OUT_DIR [CORPUS_DIR]
# CORPUS_DIR: a WikiText-style folder (train.txt, valid.txt, test.txt), given by path; without
# it the text is synthetic (disjoint train / valid / test). A GPU machine that gets only the
# repository has no ../shared: bring the corpus inside the repository first, e.g.
#   mkdir -p data && cp -r /work/shared/data/wikitext-2 data/   # untracked, not ignored: it
#   bash benchmarks/gpu_session.sh /tmp/gpu data/wikitext-2     # travels with the work tree
# 1. bench_search.py --part gpu --skip-eval: search of 128 queries (k = 1024) over 1M and 4M
#    synthetic float16 keys of d = 1024 through open_backend (one split-precision GEMM), after
#    a warm-up, CUDA-synchronized, against the copy-bandwidth limit, and agreement with a
#    float64 brute force at 1M (-> OUT_DIR/search_gpu_synthetic.json).
# 2. bench_search.py --part gpu --skip-search: kNN-LM evaluation with --search exact against the
#    plain LM, random GPT-2 (12 layers, d = 768), ~500k keys, k = 1024, each timed after a
#    warm-up with CUDA synchronized (-> OUT_DIR/search_gpu_eval.json).
# Each step has its own time limit (150 s + 300 s), so a slow step still leaves the other's
# JSON in OUT_DIR; the whole session stays under 8 minutes.
set -u -o pipefail
out=${1:?OUT_DIR}; corpus=${2:-}
if [ -n "$corpus" ] && [ ! -f "$corpus/train.txt" ]; then
  echo "Error: $corpus has no train.txt (a WikiText-style folder is needed)" >&2; exit 2
fi
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

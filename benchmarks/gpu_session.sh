#!/usr/bin/env bash
# The whole GPU check of a lent machine, in one call: versions, gpu_check.py (CUDA parity,
# overlap, bf16; FAISS-GPU parts when faiss-gpu is installed), then bench_exact.py with the
# LM on the GPU at the datastore size of benchmarks/README.md's peer table (~504k keys).
#   bash benchmarks/gpu_session.sh OUT_DIR WIKITEXT2_DIR
# Each step has its own time limit, so a slow step still leaves the others' JSON in OUT_DIR.
set -u -o pipefail
out=${1:?OUT_DIR}; corpus=${2:?WIKITEXT2_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import faiss, torch, transformers; print('faiss', faiss.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
timeout 170 python3 benchmarks/gpu_check.py --k 1024 >"$out/gpu_check.json" 2>"$out/gpu_check.err"
echo "gpu_check rc=$?"; cat "$out/gpu_check.json"; tail -n 5 "$out/gpu_check.err"
timeout 330 python3 benchmarks/bench_exact.py --corpus "$corpus" --device cuda \
  --train-fraction 0.215 --valid-fraction 0.1 --k 1024 --repeats 1 \
  --out "$out/bench_exact_cuda.json" >/dev/null 2>"$out/bench_exact.err"
echo "bench_exact rc=$?"; tail -n 12 "$out/bench_exact.err"
python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['summary'], indent=1))" \
  "$out/bench_exact_cuda.json"

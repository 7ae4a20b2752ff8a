#!/usr/bin/env bash
# Everything only a GPU can show, for a session that has one (issue "On a lent H100").
# Usage: bash benchmarks/gpu_checks.sh tests|bench [OUT_DIR]
#   tests: the GPU tests (pytest -m gpu) and the whole suite on the GPU machine's CPU
#   bench: benchmarks/bench_gpu_block.py and the quickstart's wall time on the GPU
# Optional wheels (torchao) in .whl/ are installed into /tmp/site first (no registry there).
set -uo pipefail
what=${1:?tests or bench}; out=${2:-gpu-results}; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; grep -m1 'model name' /proc/cpuinfo; nproc; } | tee "$out/env.txt"
if [ "$what" = tests ]; then
  python3 -m pytest -q -rs -m gpu tests/test_gpu_backends.py 2>&1 | tee "$out/pytest_gpu.txt"
  python3 -m pytest -q -x -m "not gpu" 2>&1 | tail -15 | tee "$out/pytest_cpu.txt"
else
  python3 benchmarks/bench_gpu_block.py --out "$out/bench_gpu.md" 2>&1 | tee "$out/bench_gpu.txt"
  python3 -m benchmarks.gpu_fast_accum 2>&1 | tee "$out/fast_accum.md"  # TE's fprop runs with FAST_ACCUM
  start=$(date +%s.%N)
  python3 -m fp8lab.run.cli run recipes/quickstart.py --out "$out/logs" 2>&1 | tail -12 | tee "$out/quickstart.txt"
  echo "quickstart wall time: $(echo "$(date +%s.%N) - $start" | bc) s" | tee -a "$out/quickstart.txt"
fi

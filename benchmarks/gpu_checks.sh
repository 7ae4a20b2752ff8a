#!/usr/bin/env bash
# Everything only a GPU can show, in one command for the first FP8 GPU (issue 21, item 5).
# Usage: bash benchmarks/gpu_checks.sh [OUT_DIR]        (default gpu-results)
#        ONLY=tests|bench bash benchmarks/gpu_checks.sh  (one half)
#        CPU_SUITE=1 ...                                  (also the whole suite on this machine's CPU, ~5+ min)
#        SKIP_SETTLED=1 ...                               (skip steps 3 and 4, settled on an H200 2026-12-04)
# Writes OUT_DIR/results.md (every section below, in order) next to each step's full log.
# Each step has its own time limit so the whole run ends within 10 minutes on one H100/H200
# (limits sum to 610 s plus setup; 540 s with SKIP_SETTLED=1); a step that hits its limit says so in results.md.
#   1. GPU tests (pytest -m gpu): scaled_mm and TE vs the emulation (numerics), the CPU
#      model of CUDA's _scaled_mm rules vs the real one, no host sync in a step, short
#      training runs vs BF16; every gpu-marked test under tests/                [220 s]
#   2. FP8 vs BF16 speed per layer size (TransformerBlock 768/2048/4096, GPT-2 124M step),
#      update_scales and telemetry cost (benchmarks/bench_gpu_block.py; BENCH_ARGS) [170 s]
#   3. fast accumulation vs the hardware model (benchmarks/gpu_fast_accum.py)    [ 45 s]
#   4. torch's blockwise _scaled_mm: what it accepts, and its numerics vs the
#      float64 model (benchmarks/gpu_blockwise_probe.py)                          [ 25 s]
#   5. the quickstart recipe's wall time                                         [ 90 s]
#   6. one FP8 block step under torch.profiler, dynamo's recompile counters
#      (benchmarks/gpu_profile_step.py)                                           [ 60 s]
# Optional wheels (torchao, transformer-engine) in .whl/ are installed into /tmp/site first
# (no registry there).
set -uo pipefail
out=${1:-gpu-results}; mkdir -p "$out"; results="$out/results.md"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1

section() {  # section TITLE LIMIT_S LOG COMMAND...: run, keep the log, append its tail to results.md
  local title=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS rc
  timeout "$limit" "$@" >"$out/$log" 2>&1; rc=$?
  { echo; echo "## $title"; echo; echo "\`$*\` -> exit $rc in $((SECONDS - start)) s$([ $rc = 124 ] && echo " (TIME LIMIT ${limit} s)") — full log: $log"; echo
    echo '```'; tail -n 60 "$out/$log"; echo '```'; } >>"$results"
}

{ echo "# fp8lab GPU checks ($(date -u +%Y-%m-%dT%H:%MZ))"; echo; echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'capability', torch.cuda.get_device_capability() if torch.cuda.is_available() else None)"
  python3 -c "import importlib.metadata as m; print('transformer-engine', m.version('transformer_engine'))" 2>/dev/null || echo "transformer-engine: not installed (TE tests skip)"
  grep -m1 'model name' /proc/cpuinfo; nproc; echo '```'; } | tee "$results"

if [ "${ONLY:-tests}" = tests ] || [ -z "${ONLY:-}" ]; then
  section "GPU tests" 220 pytest_gpu.txt python3 -m pytest -q -rs -m gpu --continue-on-collection-errors -p no:cacheprovider tests/
fi
if [ "${ONLY:-bench}" = bench ] || [ -z "${ONLY:-}" ]; then
  section "FP8 vs BF16 per layer size" 170 bench_gpu.txt python3 benchmarks/bench_gpu_block.py ${BENCH_ARGS:-} --out "$out/bench_gpu.md"
  if [ "${SKIP_SETTLED:-0}" != 1 ]; then
    section "Fast accumulation" 45 fast_accum.txt python3 -m benchmarks.gpu_fast_accum
    section "Blockwise _scaled_mm probe" 25 blockwise.txt python3 -m benchmarks.gpu_blockwise_probe
  fi
  section "Quickstart wall time" 90 quickstart.txt python3 -m fp8lab.run.cli run recipes/quickstart.py --out "$out/logs"
  section "One FP8 block step, profiled" 60 profile.txt python3 -m benchmarks.gpu_profile_step
  echo "dynamo recompile warnings in the logs: $(cat "$out"/*.txt | grep -ci 'recompile')" | tee -a "$results"
fi
if [ "${CPU_SUITE:-0}" = 1 ]; then
  section "Whole suite on this machine's CPU" 900 pytest_cpu.txt python3 -m pytest -q -x -m "not gpu"
fi
echo "results: $results"

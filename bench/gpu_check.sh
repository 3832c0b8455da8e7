#!/usr/bin/env bash
# One device-time-budgeted check on a lent GPU machine (H100/H200), in a few minutes:
#   1. install the package (offline: --no-deps --no-build-isolation; the image has torch/triton),
#   2. the test suite on CUDA (real compiled kernels, Inductor compile tests, 64-bit offsets),
#   3. the full benchmark table (fused / eager / compile / floor, every shape, fp32 + bf16),
#      plus the skewed id distributions at gpt2-124M, the fused-dropout rows and Hugging Face
#      GPT2Model's embedding before/after swap_input_embeddings (what the swap saves there).
# Logs, JSON and the plot go to $OUT (the device tool's output folder) or /tmp/tokemb-gpu.
# Usage: bash bench/gpu_check.sh [--quick]   (--quick: tests + gpt2-124M only)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tokemb-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/env.txt"

# Time limits add up to under 10 minutes (the device tool's per-command limit). Each bench
# rewrites its JSON after every shape and dtype, so one cut short by its limit keeps what it
# measured; shapes run in order of importance (the targets' shapes first).
status=0
# On a GPU most of the suite's time is Triton compiling each new kernel specialisation (about 350
# distinct ones, counted under the interpreter on 2026-11-27; 0.2-1 s each), one at a time per
# process. So: pytest-xdist's 8 processes when it is installed (the device image has it), 60
# hypothesis examples instead of 200, and the slowest tests listed for the next run.
xdist=""
python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
TOKEMB_FAST_HYPOTHESIS_EXAMPLES=60 timeout 180 python3 -m pytest -q $xdist --maxfail=10 -p no:cacheprovider \
  --durations=15 tests 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ "${1:-}" = "--quick" ]; then
  shapes=gpt2-124M
else
  shapes=gpt2-124M,big,gpt2-xl,decode,seed
fi
timeout 240 tokemb-fast bench --shapes "$shapes" --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1 \
  | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 60 tokemb-fast bench --shapes gpt2-124M --ids zipf,equal --impls fused,eager --modes fwd+bwd \
  --json "$OUT/bench-skew.json" 2>&1 | tee "$OUT/bench-skew.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 90 tokemb-fast bench --shapes gpt2-124M,big \
  --impls fused,fused+dropout,eager+dropout,compile+dropout,hf-eager,hf-swapped \
  --json "$OUT/bench-dropout.json" 2>&1 | tee "$OUT/bench-dropout.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status

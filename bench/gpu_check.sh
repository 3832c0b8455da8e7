#!/usr/bin/env bash
# Device-time-budgeted checks on a lent GPU machine (H100/H200). One device call each:
#   bash bench/gpu_check.sh            # call 1: `accept`, issue #22's acceptance run (limit 450 s;
#                                      # ~8 min with the install, under a device call's 600 s)
#   bash bench/gpu_check.sh tests      # call 2 (or a later session): the CUDA test suite
#   bash bench/gpu_check.sh profile bench-124M  # any steps named, in that order
# Liger-Kernel (the `liger` rows, target 3) is not in the device image: fetch its wheel here first
# (`bash bench/fetch_wheels.sh`, into the git-ignored .whl/) and name `.whl` in the device call's
# carry; this script installs what it finds there (no network there).
# Steps (each with its own time limit; the seconds are that limit):
#   accept      (450) bench/acceptance.py: every target of issue #22 in one process with a verdict
#                     each (per call against eager, torch.compile and Liger; CUDA-graph GPU time
#                     against the floor; the row kernel against its own floor; Zipf against uniform;
#                     bitwise determinism; Hugging Face GPT-2; train_gpt2.py tokens/s; the candidate
#                     scatter backward beside the default), gpt2-124M,
#                     gpt2-xl, big, decode, seed x fp32, bf16; acceptance.md/.json to $OUT
#   tests       (170) the test suite on CUDA: real compiled kernels, Inductor compile tests,
#                     CUDA-graph capture, 64-bit offsets; the slowest tests listed
#   example     (110) examples/train_gpt2.py at GPT-2 124M, swapped and not, alternated 3 times each
#   profile      (60) bench/profile_gpu.py at gpt2-124M: eager vs CUDA-graph-replay time (host
#                     overhead vs GPU time) and the kernels of one fused forward+backward
#   bench-124M  (100) gpt2-124M: the module (default id check), unchecked and sync-checked calls,
#                     eager / compile / floor, dropout rows, and Hugging Face GPT2Model's embedding
#                     before/after swap_input_embeddings
#   bench-big    (70) the big shape (Llama-3-like table), plain rows
#   bench-skew   (40) Zipf and all-equal ids at gpt2-124M, forward+backward
#   bench-rest   (90) gpt2-xl, decode and seed, plain rows
#   bench-bert   (40) bert-base: the encoder op (token types, LayerNorm) beside Hugging Face's
#                     BertEmbeddings arithmetic in eager PyTorch and its torch.compile, and the floor
#   bench-suite  (90) the pytest-benchmark suite (bench/bench_embedding.py) at the seed shape
#   tp           (90) with 2 or more GPUs only: tensor parallelism on NCCL (bench/bench_tp.py: the
#                     fused op against RowwiseParallel, outputs compared, then timed); else skipped
#   first, second     the two calls of the tables before the acceptance run existed (440 s, 420 s)
# One log (gpu_check.log) and the step's JSON or markdown files go to $OUT (the device tool's output
# folder, which brings back at most 8 files) or /tmp/tokemb-gpu; the installed package is this
# checkout (pip -e, offline: the image has torch, triton and the test tools; --use-pep517, since
# the legacy `setup.py develop` path of the image's setuptools calls pip again with build isolation,
# which needs the network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tokemb-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=()
for arg in "$@"; do
  case $arg in
    first) steps+=(tests profile bench-124M bench-big bench-skew) ;;  # 440 s of limits: what #11 and #12 read first
    second) steps+=(example bench-rest bench-bert bench-suite tp) ;;  # 420 s (tp: 0 s on one GPU)
    *) steps+=("$arg") ;;
  esac
done
[ ${#steps[@]} -gt 0 ] || steps=(accept)

for step in "${steps[@]}"; do
  case $step in accept|tests|example|profile|bench-124M|bench-big|bench-skew|bench-rest|bench-bert|bench-suite|tp) ;; *) echo "unknown step $step"; exit 2 ;; esac
done
LOG=$OUT/gpu_check.log
python3 -m pip install -q --no-deps --no-build-isolation --use-pep517 -e . >"$LOG" 2>&1 || { cat "$LOG"; exit 1; }
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels (bench/fetch_wheels.sh), e.g. liger-kernel
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >>"$LOG" 2>&1 || { cat "$LOG"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))" 2>/dev/null \
    || echo "liger-kernel: not installed (the liger rows are skipped; bench/fetch_wheels.sh and carry .whl)"
} | tee -a "$LOG"

status=0
summary=()
run_step() {  # name, time limit (s), command...
  local name=$1 limit=$2 started=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=1
  summary+=("$name: rc $rc, $((SECONDS - started)) s")
}

for step in "${steps[@]}"; do
  case $step in
    accept)
      # Its own budget (390 s) stops it from starting a part that would overrun; the limit is the backstop.
      run_step accept 450 python3 bench/acceptance.py --out "$OUT" --budget-s 390 ;;
    tests)
      # Most of the suite's GPU time is Triton compiling each new kernel specialisation, one at a
      # time per process: so xdist's processes, 60 hypothesis examples instead of 200, and a
      # per-test limit so that one hang cannot take the whole step.
      extra=()
      python3 -c "import xdist" 2>/dev/null && extra+=(-n 12)
      python3 -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 150)
      # One Inductor compile thread per test process: 12 processes already share 16 cores.
      TORCHINDUCTOR_COMPILE_THREADS=1 TOKEMB_FAST_HYPOTHESIS_EXAMPLES=60 run_step tests 170 \
        python3 -m pytest -q -rfE "${extra[@]}" -p no:cacheprovider --durations=15 tests ;;
    example)
      # Alternated, three runs each (issue #11 asks for all of them, not the best).
      run_step example 110 bash -c 'for run in 1 2 3; do python3 examples/train_gpt2.py --steps 30 &&
        python3 examples/train_gpt2.py --steps 30 --no-swap || exit 1; done' ;;
    profile)
      run_step profile 60 python3 bench/profile_gpu.py --shapes gpt2-124M ;;
    bench-124M)
      run_step bench-124M 100 tokemb-fast bench --shapes gpt2-124M \
        --impls fused,fused-unchecked,fused-sync,eager,compile,floor,fused+dropout,eager+dropout,compile+dropout,hf-eager,hf-swapped \
        --json "$OUT/bench-124M.json" ;;
    bench-big)
      run_step bench-big 70 tokemb-fast bench --shapes big --json "$OUT/bench-big.json" ;;
    bench-skew)
      run_step bench-skew 40 tokemb-fast bench --shapes gpt2-124M --ids zipf,equal \
        --impls fused,eager --modes fwd+bwd --json "$OUT/bench-skew.json" ;;
    bench-rest)
      run_step bench-rest 90 tokemb-fast bench --shapes gpt2-xl,decode,seed \
        --json "$OUT/bench-rest.json" ;;
    bench-bert)
      run_step bench-bert 40 tokemb-fast bench --shapes bert-base --impls fused,eager,compile,floor \
        --json "$OUT/bench-bert.json" ;;
    bench-suite)
      # One process: pytest-benchmark saves nothing under xdist (pytest.ini asks for workers).
      run_step bench-suite 90 python3 -m pytest -q -p no:cacheprovider -n 0 bench/bench_embedding.py -k seed \
        --benchmark-json "$OUT/bench-suite.json" ;;
    tp)
      gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
      if [ "$gpus" -ge 2 ]; then
        run_step tp 90 python3 bench/bench_tp.py --nproc "$gpus" --shapes gpt2-124M,big --json "$OUT/bench-tp.json"
      else
        echo "=== tp: skipped ($gpus GPU: tensor parallelism needs 2 or more)" | tee -a "$LOG"
        summary+=("tp: skipped, $gpus GPU")
      fi ;;
  esac
done
printf '%s\n' "${summary[@]}" | tee -a "$LOG"
exit $status

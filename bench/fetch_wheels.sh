#!/usr/bin/env bash
# The Python packages the GPU checks need that the device image lacks, as wheels in the git-ignored
# .whl/ (the device machine reaches no package index): run here, where PyPI is reachable, then name
# `.whl` in the device call's carry; bench/gpu_check.sh installs them there with --no-deps.
#   liger-kernel: the Triton peer of issue #22's target 3 (pure Python; its needs, torch and
#   triton, are in the image). The pin is the version the acceptance run was checked with here.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d .whl "liger-kernel==0.8.5"
ls -l .whl

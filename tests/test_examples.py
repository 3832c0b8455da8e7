"""examples/train_gpt2.py runs and learns (tiny config, CPU)."""
import os
import re
import subprocess
import sys

import pytest

from tokemb_fast import triton_ops

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_gpt2.py")


def run(*args, backend):
    env = dict(os.environ, TOKEMB_FAST_BACKEND=backend)
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_training_script_loss_goes_down():
    out = run("--steps", "20", backend="torch")
    assert "LLMs-from-scratch GPTModel" in out and "step   20/20" in out
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+) over 20 steps", out).groups())
    assert last < first - 0.5


@pytest.mark.skipif(not triton_ops.INTERPRETED, reason="the CPU run reaches the kernels only under TRITON_INTERPRET=1")
def test_training_script_through_the_kernels():
    out = run("--steps", "2", backend="triton")
    assert re.search(r"loss [\d.]+ -> [\d.]+ over 2 steps", out)

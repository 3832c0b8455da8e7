"""Host (Python) time per call of the GPU path, measured without a GPU.

On an H100 a gpt2-124M forward takes ~0.025 ms of GPU time but ~0.14 ms per eager call
(`bench/RESULTS.md`): the call is bounded by the host. This script times that host part on any
machine: the real autograd path and launchers run on CPU tensors under the stand-in Triton
driver of `bench/compile_report.py`, which compiles the kernels for sm_90a and records launches
instead of running them. What it measures is everything but the GPU and the CUDA launch call
itself: PyTorch dispatch, argument handling, Triton's Python launcher and autotuner. Absolute
figures depend on the CPU (this project's 2-core machine is slower than a GPU host); compare
versions on one machine, several runs each.

`torch.sort` runs for real here (on the CPU, unlike on a GPU, where it is asynchronous), so the
forward+backward figure is also given without the sort's own time.

    python bench/host_overhead.py [--calls 1000] [--shape gpt2-124M] [--dtype fp32]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_report import CompileOnlyDriver  # noqa: E402  (exits if TRITON_INTERPRET=1)

import torch  # noqa: E402
from triton.runtime import driver  # noqa: E402


def per_call_us(fn, calls: int, repeats: int = 5) -> float:
    """Median over repeats of the mean wall time of `calls` back-to-back calls."""
    fn()
    fn()
    means = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(means)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--shape", default="gpt2-124M")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args(argv)

    fake = CompileOnlyDriver()
    driver.set_active(fake)
    from tokemb_fast.bench import DTYPES, SHAPES
    from tokemb_fast.functional import FusedInputEmbeddingFunction

    shape, dtype = SHAPES[args.shape], DTYPES[args.dtype]
    ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len))
    # Never filled: nothing runs on them.
    token_weight = torch.empty(shape.vocab_size, shape.dim, dtype=dtype, requires_grad=True)
    position_weight = torch.empty(shape.context_length, shape.dim, dtype=dtype, requires_grad=True)
    grad_out = torch.empty(shape.batch, shape.seq_len, shape.dim, dtype=dtype)

    def call():
        return FusedInputEmbeddingFunction.apply(ids, token_weight, position_weight, None, 0, False, None, False,
                                                 False, None, False, False, 0.0)

    def forward():
        with torch.no_grad():
            call()

    def forward_backward():
        token_weight.grad = position_weight.grad = None
        call().backward(grad_out)

    keys = ids.reshape(-1).to(torch.int32)
    forward_us = per_call_us(forward, args.calls)
    both_us = per_call_us(forward_backward, max(1, args.calls // 5))
    sort_us = per_call_us(lambda: torch.sort(keys, stable=True), args.calls)
    launches = len(fake.launches)
    print(f"{args.shape} {args.dtype}, torch {torch.__version__}, {os.cpu_count()} CPUs: host time per call")
    print(f"  forward           {forward_us:8.1f} us")
    print(f"  forward+backward  {both_us:8.1f} us ({both_us - sort_us:.1f} us without the CPU sort's {sort_us:.1f})")
    print(f"  ({launches} launches recorded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

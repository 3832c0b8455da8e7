"""pytest-benchmark suite: forward, backward and forward+backward of the fused op, eager PyTorch
and torch.compile at the shapes of bench.SHAPES. CUDA only; `tokemb-fast bench` prints the
side-by-side table with the floor (do_bench medians), this suite feeds pytest-benchmark's
history and comparison tools (`pytest bench --benchmark-autosave`, `--benchmark-compare`).

Timed with the host clock around a synchronised call, so sub-0.1 ms numbers include launch and
sync overhead; use the `tokemb-fast bench` table for ratios against the floor.

TOKEMB_FAST_BENCH_SMOKE=1 (with TRITON_INTERPRET=1, on a machine without CUDA) runs every case
once at a tiny shape on CPU: a check that the suite itself works (tests/test_bench.py runs it),
not a measurement.
"""
import os

import pytest
import torch

from tokemb_fast import bench, triton_ops

SMOKE = os.environ.get("TOKEMB_FAST_BENCH_SMOKE") == "1" and not torch.cuda.is_available()
DEVICE = "cpu" if SMOKE else "cuda"
# The GPT op's shapes (the encoder op's bert-base rows: `tokemb-fast bench --shapes bert-base`).
SHAPES = {"tiny": bench.Shape("tiny", 2, 8, 50, 16, 8)} if SMOKE else \
    {name: shape for name, shape in bench.SHAPES.items() if not shape.type_vocab_size}
ROUNDS = dict(warmup_rounds=0, rounds=1) if SMOKE else dict(warmup_rounds=5, rounds=50)

if SMOKE and not triton_ops.INTERPRETED:
    raise RuntimeError("TOKEMB_FAST_BENCH_SMOKE=1 needs TRITON_INTERPRET=1 (the kernels on CPU tensors)")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or SMOKE),
                                reason="GPU benchmarks: need CUDA (on CPU, `tokemb-fast bench` times the fallback)")


def _synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()

_COMPILED = {}


def _forward(impl, shape_name, dtype_name):
    if impl.startswith("compile"):
        key = (impl, shape_name, dtype_name)
        if key not in _COMPILED:
            torch._dynamo.reset()
            _COMPILED.clear()
            eager = bench._eager_dropout if impl.endswith("+dropout") else bench._eager
            _COMPILED[key] = torch.compile(eager, fullgraph=True, dynamic=False)
        return _COMPILED[key]
    return bench.implementations()[impl]


@pytest.mark.parametrize("impl", ["fused", "eager", "compile"] + list(bench.DROPOUT_IMPLS))
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_input_embedding(benchmark, shape_name, dtype_name, mode, impl):
    shape = SHAPES[shape_name]
    inputs = bench.make_inputs(shape, bench.DTYPES[dtype_name], DEVICE)
    input_ids, position_ids, token_weight, position_weight, grad_out = inputs
    forward = _forward(impl, shape_name, dtype_name)
    benchmark.group = f"{shape_name} {dtype_name} {mode}"
    forward_bytes = bench.bytes_moved(shape, token_weight.element_size(), "fwd")
    step_bytes = bench.bytes_moved(shape, token_weight.element_size(), "fwd+bwd")
    benchmark.extra_info.update(shape=shape.describe(), bytes_moved={
        "fwd": forward_bytes, "bwd": step_bytes - forward_bytes, "fwd+bwd": step_bytes}[mode])

    if mode == "bwd":
        # A fresh forward before each timed backward, untimed: a retained graph cannot be
        # replayed by torch.compile's backward (it donates its buffers).
        def fresh_graph():
            token_weight.grad = None
            position_weight.grad = None
            out = forward(input_ids, token_weight, position_weight, position_ids)
            _synchronize()
            return (out,), {}

        def backward(out):
            out.backward(grad_out)
            _synchronize()

        benchmark.pedantic(backward, setup=fresh_graph, iterations=1, **ROUNDS)
    else:
        run = bench._step(forward, inputs, mode)

        def step():
            run()
            _synchronize()

        benchmark.pedantic(step, iterations=1, **ROUNDS)

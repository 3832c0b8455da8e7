"""pytest-benchmark suite: forward, backward and forward+backward of the fused op, eager PyTorch
and torch.compile at the shapes of bench.SHAPES. CUDA only; `tokemb-fast bench` prints the
side-by-side table with the floor (do_bench medians), this suite feeds pytest-benchmark's
history and comparison tools (`pytest bench --benchmark-autosave`, `--benchmark-compare`).

Timed with the host clock around a synchronised call, so sub-0.1 ms numbers include launch and
sync overhead; use the `tokemb-fast bench` table for ratios against the floor.
"""
import pytest
import torch

from tokemb_fast import bench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU benchmarks: need CUDA (on CPU, `tokemb-fast bench` times the fallback)")

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
@pytest.mark.parametrize("shape_name", list(bench.SHAPES))
def test_input_embedding(benchmark, shape_name, dtype_name, mode, impl):
    shape = bench.SHAPES[shape_name]
    inputs = bench.make_inputs(shape, bench.DTYPES[dtype_name], "cuda")
    input_ids, position_ids, token_weight, position_weight, grad_out = inputs
    forward = _forward(impl, shape_name, dtype_name)
    benchmark.group = f"{shape_name} {dtype_name} {mode}"
    benchmark.extra_info.update(shape=shape.describe(), bytes_moved=bench.bytes_moved(
        shape, token_weight.element_size(), "fwd" if mode == "fwd" else "fwd+bwd"))

    if mode == "bwd":
        out = forward(input_ids, token_weight, position_weight, position_ids)

        def step():
            token_weight.grad = None
            position_weight.grad = None
            out.backward(grad_out, retain_graph=True)
            torch.cuda.synchronize()
    else:
        run = bench._step(forward, inputs, mode)

        def step():
            run()
            torch.cuda.synchronize()

    benchmark.pedantic(step, warmup_rounds=5, rounds=50, iterations=1)

"""Where a call's time goes on a GPU: host overhead against GPU time, kernel by kernel.

`tokemb-fast bench` times calls as a user makes them (events around an eager call), which at
gpt2-124M is bounded by the host: a Python call that launches several kernels can take longer
to issue than the ~20-90 us of GPU work it asks for. This script separates the two for each
implementation and mode:

- eager ms: do_bench median of the plain call (what `tokemb-fast bench` reports);
- graph ms: do_bench median of a CUDA-graph replay of the same call (GPU time alone: no Python,
  no launch gaps);
- host us: wall time per call over 200 back-to-back calls with one synchronize at the end
  (when it exceeds the graph time, the call is host-bound);
- then the CUDA kernels of one fused forward+backward, from torch.profiler.

    python bench/profile_gpu.py [--shapes gpt2-124M,big] [--dtypes fp32,bf16]
"""
import argparse
import sys
import time

import torch
import triton.testing

from tokemb_fast import bench


def host_us(step, calls=200) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def kernel_table(step, rows=14) -> str:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profile:
        step()
        torch.cuda.synchronize()
    kernels = []
    for event in profile.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0)
        if device_us > 0:
            kernels.append((device_us, event.count, event.key))
    kernels.sort(reverse=True)
    lines = [f"    {us:8.1f} us  x{count}  {name[:100]}" for us, count, name in kernels[:rows]]
    lines.append(f"    {sum(k[0] for k in kernels):8.1f} us  total GPU time of {sum(k[1] for k in kernels)} launches")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gpt2-124M")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--impls", default="fused,eager,hf-eager,hf-swapped")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    forwards = bench.implementations()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'shape':10s} {'dtype':5s} {'mode':8s} {'impl':12s} {'eager ms':>9s} {'graph ms':>9s} "
          f"{'host us':>8s} {'floor ms':>9s}")
    for shape_name in args.shapes.split(","):
        shape = bench.SHAPES[shape_name]
        for dtype_name in args.dtypes.split(","):
            dtype = bench.DTYPES[dtype_name]
            inputs = bench.make_inputs(shape, dtype, "cuda")
            for mode in bench.MODES:
                floor = median_ms(bench._floor_step(shape, dtype, "cuda", mode))
                for impl in args.impls.split(","):
                    step = bench._step(forwards[impl], inputs, mode)
                    step()
                    eager = median_ms(step)
                    # PyTorch's own embedding backward is not captured: a failed capture could
                    # leave the stream in a state that spoils the rows after it.
                    if mode == "fwd+bwd" and impl in ("eager", "hf-eager"):
                        graphed = f"{'-':>9s}"
                    else:
                        graph = bench.cuda_graph_of(step)
                        graphed = f"{median_ms(graph.replay):9.4f}"
                        del graph
                    print(f"{shape_name:10s} {dtype_name:5s} {mode:8s} {impl:12s} {eager:9.4f} {graphed} "
                          f"{host_us(step):8.1f} {floor:9.4f}", flush=True)
            print(f"  kernels of one fused forward+backward, {shape_name} {dtype_name}:")
            print(kernel_table(bench._step(forwards["fused"], inputs, "fwd+bwd")), flush=True)
            del inputs
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

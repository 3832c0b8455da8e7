"""Host (Python) time per call of the GPU path, measured without a GPU, beside eager PyTorch's.

On an H100 a gpt2-124M forward took ~0.025 ms of GPU time but ~0.14 ms per eager call
(`bench/RESULTS.md`, 2026-11-27): the call was bounded by the host. This script times that host
part on any machine: the real module, autograd path and launchers run on CPU tensors under the
stand-in Triton driver of `bench/compile_report.py`, which compiles the kernels for sm_90a and
takes each launch instead of running it. What it measures is everything but the GPU: PyTorch
dispatch, our checks and plans, Triton's launch path. Absolute figures depend on the CPU; compare
on one machine, and read the ratios to the two comparators timed in the same process:

* eager forward: ``F.embedding(ids, w) + F.embedding(arange(T), p)`` on tiny CPU tensors (4 x 8
  ids, D = 16), tables requiring grad: PyTorch's own host cost for the op this one replaces;
* eager forward+backward: the same, then ``.backward()``.

So that the figures predict a GPU host rather than this stand-in, the stand-in launcher spends
about what Triton's CUDA launcher does (``--launcher-us``, 3 us on top of its own ~1: argument
parsing, one pointer query per tensor, cuLaunchKernelEx), the id check runs its GPU protocol
(an asynchronous flag copy and an event per forward; CPU tensors and a stand-in event, each
event call charged ``--event-us``), and the backward's ``torch.sort``, which computes on a CPU but
only launches on a GPU, is a stand-in that allocates its two outputs and spends ``--sort-us`` (15
us: PyTorch's CUDA sort allocates scratch and launches a few cub kernels). These three figures are
estimates, not measurements; the rest of the host work is real. Freed memory is kept by malloc
(mallopt, glibc only) as the CUDA caching allocator keeps it: otherwise each backward would map and
unmap its V x D gradient table, about 60 us a GPU host does not spend.

    python bench/host_overhead.py --profile 2000   # where the host time goes (cProfile)

    python bench/host_overhead.py [--calls 1000] [--shape gpt2-124M] [--dtype fp32]

The last two lines are the ratios the project sets targets for (at most 2.0 each).
"""
import argparse
import ctypes
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_report import CompileOnlyDriver  # noqa: E402  (exits if TRITON_INTERPRET=1)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.runtime import driver  # noqa: E402


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed blocks, as PyTorch's CUDA caching allocator does, instead of
    returning large ones to the kernel (mmap and munmap per V x D gradient table: ~60 us a backward
    here that a GPU host does not pay). False where malloc is not glibc's."""
    try:
        libc = ctypes.CDLL(None)
        # mallopt(M_MMAP_THRESHOLD, 1 GiB), (M_TRIM_THRESHOLD, 2 GiB - 1), (M_TOP_PAD, 512 MiB): C ints
        settings = ((-3, 1 << 30), (-1, (1 << 31) - 1), (-2, 512 << 20))
        return all(libc.mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError):
        return False


def spin(microseconds: float) -> None:
    end = time.perf_counter() + microseconds * 1e-6
    while time.perf_counter() < end:
        pass


def per_call_us(fn, calls: int, repeats: int = 7) -> float:
    """Median over repeats of the mean wall time of `calls` back-to-back calls."""
    for _ in range(max(3, calls // 10)):
        fn()
    means = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(means)


class StandInEvent:
    """torch.cuda.Event's calls as the id check makes them, each charged what a CUDA call costs."""

    def __init__(self, cost_us):
        self.cost_us = cost_us

    def record(self):
        spin(self.cost_us)

    def query(self):
        spin(self.cost_us)
        return True

    def synchronize(self):
        spin(self.cost_us)


def use_gpu_id_check_protocol(event_us: float) -> None:
    """Make the CPU id guard run the CUDA protocol: a separate host copy, an event per launch."""
    from tokemb_fast import id_check

    class GpuLikeGuard(id_check._Guard):
        def __init__(self, device, stream=None):
            super().__init__(device, stream)
            self.host = torch.zeros_like(self.flag)

        def after_launch(self, wait_at_next_call):
            self.host.copy_(self.flag, non_blocking=True)
            event = StandInEvent(event_us)
            event.record()
            record = id_check._Record(self, event, wait_at_next_call)
            self.pending.append(record)
            return record

    id_check._GUARD_CLASS = GpuLikeGuard
    id_check._thread_guards().clear()
    # On a GPU the general path and the planned one see the same stream handle (PyTorch's current
    # stream, which Triton's driver reports too): one guard per thread. Here the stand-in driver
    # names its own stream for CPU tensors, so the general path must name it too.
    id_check.launch_stream = lambda device: driver.active.get_current_stream(driver.active.get_current_device())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--shape", default="gpt2-124M")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--launcher-us", type=float, default=3.0,
                        help="extra time per launch, for Triton's CUDA launcher (default 3)")
    parser.add_argument("--event-us", type=float, default=1.0,
                        help="time per CUDA event call of the id check (default 1)")
    parser.add_argument("--sort-us", type=float, default=15.0,
                        help="host time of the backward's device sort (default 15)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="instead of timing, cProfile N forward and N forward+backward calls; print the top functions")
    args = parser.parse_args(argv)
    cached_allocator = keep_freed_memory()

    fake = CompileOnlyDriver()
    launcher_cls = fake.launcher_cls

    class CostedLauncher(launcher_cls):
        def __call__(self, *launch_args):
            spin(args.launcher_us)
            return super().__call__(*launch_args)

    fake.launcher_cls = CostedLauncher
    driver.set_active(fake)
    use_gpu_id_check_protocol(args.event_us)
    from tokemb_fast import FusedInputEmbedding, functional, triton_ops

    def stand_in_sort(keys, stable=True):
        spin(args.sort_us)
        return torch.empty_like(keys), torch.empty(keys.shape, dtype=torch.int64)

    triton_ops._sort = stand_in_sort
    from tokemb_fast.bench import DTYPES, SHAPES

    # CPU tensors stand for CUDA ones here (the stand-in driver launches nothing).
    functional.resolve_backend = lambda backend, device: "triton"
    shape, dtype = SHAPES[args.shape], DTYPES[args.dtype]
    ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len))
    module = FusedInputEmbedding(shape.vocab_size, shape.context_length, shape.dim, dtype=dtype)
    grad_out = torch.ones(shape.batch, shape.seq_len, shape.dim, dtype=dtype)

    def forward():
        return module(ids)

    def inference():
        with torch.no_grad():
            module(ids)

    parameters = list(module.parameters())

    def forward_backward():
        for parameter in parameters:  # as the eager comparator does (Module.zero_grad walks the tree: ~10 us)
            parameter.grad = None
        module(ids).backward(grad_out)

    tiny_ids = torch.randint(0, 50, (4, 8))
    tiny_weights = torch.randn(50, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    tiny_grad = torch.ones(4, 8, 16)

    def eager_forward():
        return F.embedding(tiny_ids, tiny_weights[0]) + F.embedding(torch.arange(8), tiny_weights[1])

    def eager_forward_backward():
        for weight in tiny_weights:
            weight.grad = None
        eager_forward().backward(tiny_grad)

    if args.profile:
        import cProfile
        import pstats

        for name, step in (("forward", forward), ("forward+backward", forward_backward)):
            for _ in range(20):
                step()  # compile, plan and warm up outside the profile
            profiler = cProfile.Profile()
            profiler.runcall(lambda: [step() for _ in range(args.profile)])
            print(f"=== {name}, {args.profile} calls")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return 0

    # Interleaved rounds, the minimum of each: the other core's load moves all of them alike.
    results = {name: [] for name in ("forward", "inference", "both", "eager", "eager_both")}
    for _ in range(3):
        results["eager"].append(per_call_us(eager_forward, args.calls))
        results["forward"].append(per_call_us(forward, args.calls))
        results["inference"].append(per_call_us(inference, args.calls))
        results["eager_both"].append(per_call_us(eager_forward_backward, max(1, args.calls // 5)))
        results["both"].append(per_call_us(forward_backward, max(1, args.calls // 5)))
    best = {name: min(values) for name, values in results.items()}
    launches = len(fake.launches)
    print(f"{args.shape} {args.dtype}, torch {torch.__version__}, {os.cpu_count()} CPUs: host time per call "
          f"(stand-ins: launcher +{args.launcher_us:g} us, event calls {args.event_us:g} us, sort {args.sort_us:g} us, "
          f"freed memory {'kept' if cached_allocator else 'returned: not glibc'})")
    print(f"  forward           {best['forward']:8.1f} us (training: an autograd node; default check_ids)")
    print(f"  inference         {best['inference']:8.1f} us (torch.no_grad)")
    print(f"  forward+backward  {best['both']:8.1f} us")
    print(f"  eager forward     {best['eager']:8.1f} us (F.embedding + F.embedding, tiny CPU tensors)")
    print(f"  eager fwd+bwd     {best['eager_both']:8.1f} us")
    print(f"  ({launches} launches recorded)")
    print(f"forward / eager forward: {best['forward'] / best['eager']:.2f}")
    print(f"forward+backward / eager forward+backward: {best['both'] / best['eager_both']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Planned launches against Triton's own, on a machine without a GPU.

Run by tests/test_compile_sm90.py in a process of its own (it replaces Triton's active driver),
with TRITON_INTERPRET unset: python tests/compare_planned_launches.py OUT.json

Runs one sequence of calls (forward and backward, through the module and the functional op)
twice under the stand-in driver of bench/compile_report.py, which compiles the kernels for
sm_90a and records every launch (binary hash, grid, and each argument: tensors as dtype, shape,
strides and 16-byte alignment): once with plans off, so that Triton binds and specialises every
launch itself, and once with plans on, each call made twice so that the second takes its plan.
The calls vary what Triton specialises on: unaligned and strided ids and tables, int32 ids,
past_length 0, 1, 16 and 17, explicit positions, dropout, options, checks, dtypes, a forward
large enough to be autotuned, and pairs of calls that differ only in a pointer's alignment.
Writes the launches of each call and the path each launch took ("triton", "planned" for a
KernelPlan, "call" for a repeated plain eager forward's ForwardCall), and the forward's path
under each autograd and dispatch mode. (Dropping the alignment bits or
past_length's class from the plan keys makes the comparison fail: checked when it was written.)
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "bench")]

from compile_report import CompileOnlyDriver  # noqa: E402  (exits if TRITON_INTERPRET=1)
from triton.runtime.driver import driver  # noqa: E402

fake = CompileOnlyDriver(record_arguments=True)
driver.set_active(fake)

import torch  # noqa: E402

from tokemb_fast import FusedInputEmbedding, fused_input_embedding, functional, launch, triton_ops  # noqa: E402

assert not triton_ops.INTERPRETED and launch.ENABLED
functional.resolve_backend = lambda backend, device: "triton"  # CPU tensors stand for CUDA ones


def calls():
    """(label, function) pairs; each function makes one forward and backward."""
    generator = torch.Generator().manual_seed(0)

    def ids(batch, seq_len, vocab=50, dtype=torch.int64):
        return torch.randint(0, vocab, (batch, seq_len), generator=generator).to(dtype)

    def tables(vocab, positions, dim, dtype=torch.float32):
        return (torch.empty(vocab, dim, dtype=dtype).requires_grad_(),
                torch.empty(positions, dim, dtype=dtype).requires_grad_())

    def step(input_ids, token_weight, position_weight, **kwargs):
        def run():
            out = fused_input_embedding(input_ids, token_weight, position_weight, **kwargs)
            out.backward(torch.empty_like(out))
        return run

    token_weight, position_weight = tables(50, 40, 32)
    wide = torch.randint(0, 50, (4, 9), generator=generator)
    yield "plain", step(ids(4, 8), token_weight, position_weight)
    # The same shape and strides, then 8 bytes off 16-byte alignment: only the plan key's
    # alignment bit tells the two apart.
    yield "aligned ids, stride 9", step(wide[:, :8], token_weight, position_weight)
    yield "unaligned ids, stride 9", step(wide[:, 1:], token_weight, position_weight)
    yield "transposed ids", step(ids(8, 4).t(), token_weight, position_weight)
    yield "int32 ids", step(ids(4, 8, dtype=torch.int32), token_weight, position_weight)
    for past_length in (0, 1, 16, 17):
        yield f"past_length {past_length}", step(ids(2, 8), token_weight, position_weight, past_length=past_length)
    yield "position_ids [B, T]", step(ids(4, 8), token_weight, position_weight, position_ids=ids(4, 8, vocab=40))
    yield "position_ids [1, T]", step(ids(4, 8), token_weight, position_weight, position_ids=ids(1, 8, vocab=40))
    yield "dropout", step(ids(4, 8), token_weight, position_weight, dropout_p=0.25)
    yield "options", step(ids(40, 8), token_weight, position_weight, padding_idx=3, scale_grad_by_freq=True,
                          position_scale_grad_by_freq=True, check_ids=False)
    yield "sync check", step(ids(4, 8), token_weight, position_weight, check_ids="sync")
    yield "token scale", step(ids(4, 8), token_weight, position_weight, token_scale=5.0)
    storage = torch.empty(51, 32)
    yield "aligned table rows", step(ids(4, 8), storage[:50].requires_grad_(), position_weight)
    yield "table rows 4 bytes off", step(ids(4, 8), storage.view(-1)[1:1601].view(50, 32).requires_grad_(),
                                         position_weight)
    yield "odd D bf16", step(ids(3, 5), *tables(50, 40, 100, torch.bfloat16))
    yield "fp64", step(ids(3, 5), *tables(50, 40, 24, torch.float64))
    yield "frozen positions", step(ids(4, 8), token_weight, position_weight.detach())
    yield "1-D ids", step(ids(1, 8)[0], token_weight, position_weight)
    module = FusedInputEmbedding(50, 1024, 1024)  # 2^20 outputs: the autotuned forward
    big_ids = ids(1, 1024)
    yield "autotuned forward (module)", lambda: module(big_ids).sum().backward()

    def inference():
        with torch.no_grad():
            fused_input_embedding(ids(4, 8), token_weight, position_weight)
    yield "inference", inference

    def double_backward():
        out = fused_input_embedding(ids(4, 8), token_weight, position_weight)
        upstream = torch.ones_like(out, requires_grad=True)  # the gradients are linear in it
        grads = torch.autograd.grad(out, (token_weight, position_weight), upstream, create_graph=True)
        (grads[0].sum() + grads[1].sum()).backward()
    yield "double backward", double_backward


def forward_paths_by_mode():
    """{mode: the path of each forward launch}, for calls of one layout that has been called
    before: plain eager calls take their ForwardCall ("call"); calls under a dispatch mode,
    torch.func, forward-mode AD or a profiler's launch hook must not."""
    import triton
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    token_weight = torch.randn(50, 32, requires_grad=True)
    position_weight = torch.randn(40, 32, requires_grad=True)
    input_ids = torch.randint(0, 50, (4, 8))

    def call(*tables):
        return fused_input_embedding(input_ids, *(tables or (token_weight, position_weight)))

    def no_grad():
        with torch.no_grad():
            call()

    def forward_ad():
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            call(fwAD.make_dual(token_weight.detach(), torch.ones_like(token_weight)), position_weight)

    def dispatch_mode():
        with PassThrough():
            call()

    def launch_hook():
        runtime = triton.knobs.runtime
        runtime.launch_enter_hook = lambda *args: None
        try:
            call()
        finally:
            runtime.launch_enter_hook = None

    modes = {"training": lambda: call().sum().backward(), "no_grad": no_grad,
             "torch.func.grad": lambda: torch.func.grad(lambda weight: call(weight, position_weight).sum())(
                 token_weight.detach()),
             "forward AD": forward_ad, "dispatch mode": dispatch_mode, "launch hook": launch_hook,
             "1-D ids": lambda: fused_input_embedding(input_ids[0], token_weight, position_weight),
             "check_ids='sync'": lambda: fused_input_embedding(input_ids, token_weight, position_weight,
                                                               check_ids="sync")}
    result = {}
    for name, run_mode in modes.items():
        for _ in range(2):  # the first call of a layout plans it
            run_mode()
        launch.PATHS = []
        run_mode()
        result[name] = [path for kernel, path in launch.PATHS if kernel == "input_embedding_fwd_kernel"]
    return result


def _recorded(start):
    return [[item.kernel, item.hash, list(item.grid), repr(item.arguments)]
            for item in fake.launches[start:] if not item.tuning]


def run(planned: bool):
    """{label: [launches of each repetition]} and the paths the launches took."""
    launch.ENABLED = planned
    triton_ops._forward_plans.clear()
    triton_ops._grad_plans.clear()
    paths = launch.PATHS = []
    result = {}
    for label, call in calls():
        result[label] = []
        for _ in range(2 if planned else 1):
            start = len(fake.launches)
            call()
            result[label].append(_recorded(start))
    return result, [path for _name, path in paths]


def main(path):
    ordinary, ordinary_paths = run(planned=False)
    planned, planned_paths = run(planned=True)
    modes = forward_paths_by_mode()
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"ordinary": ordinary, "planned": planned, "ordinary_paths": ordinary_paths,
                   "planned_paths": planned_paths, "modes": modes}, handle)


if __name__ == "__main__":
    main(sys.argv[1])

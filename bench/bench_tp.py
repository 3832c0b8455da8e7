"""Tensor-parallel embedding: the fused op against RowwiseParallel on two nn.Embeddings.

    python bench/bench_tp.py --nproc 2 [--device cuda] [--shapes gpt2-124M] [--dtype fp32] [--json FILE]

Spawns --nproc processes (NCCL on CUDA, one GPU each; gloo on CPU). Each process builds, from
the same tables:
  fused   FusedInputEmbedding with FusedEmbeddingParallel: one fused pass per rank + one collective
  rowwise torchtitan's way: RowwiseParallel on the token nn.Embedding (a masked lookup, then the
          collective), plus the replicated position lookup and the add
for each output layout (Replicate(): all-reduce; Shard(1): reduce-scatter, sequence parallel),
checks that both give the same output, and times forward and forward+backward per call
(triton.testing.do_bench on CUDA, medians of perf_counter on CPU). Rank 0 prints the table; the
figures are rank 0's. On CPU/gloo the timings say nothing about GPUs: run it there to check the
script and the maths only.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RowwiseTwoEmbeddings(nn.Module):
    """tok_emb(ids) + pos_emb(positions) with the token table under RowwiseParallel."""

    def __init__(self, token_weight, position_weight, sequence_parallel: bool):
        super().__init__()
        self.tok_emb = nn.Embedding.from_pretrained(token_weight.clone(), freeze=False)
        self.pos_emb = nn.Embedding.from_pretrained(position_weight.clone(), freeze=False)
        self.sequence_parallel = sequence_parallel

    def forward(self, input_ids):
        tokens = self.tok_emb(input_ids)  # the rank's part of the sequence under Shard(1)
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device)
        if self.sequence_parallel:
            world, rank = dist.get_world_size(), dist.get_rank()
            positions = positions.chunk(world)[rank] if rank < len(positions.chunk(world)) else positions[:0]
        return tokens + self.pos_emb(positions)


def _time_us(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1000
    for _ in range(3):
        fn()
    samples = []
    for _ in range(15):
        dist.barrier()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def _worker(rank, world, port, args):
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    from tokemb_fast import FusedInputEmbedding
    from tokemb_fast.bench import DTYPES, SHAPES, Shape
    shapes = {**SHAPES, "tiny": Shape("tiny", 2, 8, 37, 16, 8)}  # tiny: for checking the script itself
    from tokemb_fast.parallel import FusedEmbeddingParallel

    mesh = init_device_mesh(device.type, (world,))
    dtype = DTYPES[args.dtype]
    rows = []
    for shape_name in args.shapes.split(","):
        shape = shapes[shape_name]
        generator = torch.Generator(device=device).manual_seed(0)
        token_weight = torch.randn(shape.vocab_size, shape.dim, generator=generator, device=device).to(dtype)
        position_weight = torch.randn(shape.context_length, shape.dim, generator=generator, device=device).to(dtype)
        ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len), generator=generator, device=device)
        for layout_name, layout in (("replicate", Replicate()), ("sequence", Shard(1))):
            fused = FusedInputEmbedding.from_pretrained(token_weight.clone(), position_weight.clone(), freeze=False)
            parallelize_module(fused, mesh, FusedEmbeddingParallel(output_layouts=layout))
            rowwise = RowwiseTwoEmbeddings(token_weight, position_weight, layout == Shard(1))
            parallelize_module(rowwise, mesh, {"tok_emb": RowwiseParallel(input_layouts=Replicate(),
                                                                          output_layouts=layout)})
            expected = rowwise(ids)
            got = fused(ids)
            tolerance = 0 if dtype == torch.float32 else 1e-2
            if not torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance):
                raise AssertionError(f"{shape_name} {layout_name}: the fused output differs from RowwiseParallel's "
                                     f"by {(got.float() - expected.float()).abs().max().item()}")
            grad = torch.randn(got.shape, generator=generator, device=device).to(dtype)
            for impl, module in (("fused", fused), ("rowwise", rowwise)):
                def forward(module=module):
                    return module(ids)

                def forward_backward(module=module):
                    for parameter in module.parameters():
                        parameter.grad = None
                    module(ids).backward(grad)

                rows.append({"shape": shape_name, "layout": layout_name, "impl": impl,
                             "fwd_us": _time_us(forward, device), "fwd+bwd_us": _time_us(forward_backward, device)})
    if rank == 0:
        _report(rows, world, device, args)
    dist.barrier()  # no rank tears the group down while another still reports
    dist.destroy_process_group()
    # As tests/test_distributed.py does: skip the interpreter's teardown, which rarely aborts
    # after the work ("terminate called without an active exception", seen once in CI under load).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _report(rows, world, device, args):
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{world} ranks, {name}, {args.dtype}, torch {torch.__version__}, triton {triton.__version__}; "
          f"per call, rank 0, microseconds")
    print("| shape | output | impl | fwd | fwd+bwd | fused / rowwise fwd | fused / rowwise fwd+bwd |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    by_key = {(row["shape"], row["layout"], row["impl"]): row for row in rows}
    for row in rows:
        base = by_key[(row["shape"], row["layout"], "rowwise")]
        print(f"| {row['shape']} | {row['layout']} | {row['impl']} | {row['fwd_us']:.1f} | {row['fwd+bwd_us']:.1f} | "
              f"{row['fwd_us'] / base['fwd_us']:.2f} | {row['fwd+bwd_us'] / base['fwd+bwd_us']:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"world": world, "device": name, "dtype": args.dtype, "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, handle, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="gpt2-124M", help="names from tokemb_fast.bench.SHAPES, or tiny")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        print(f"--nproc {args.nproc} needs {args.nproc} GPUs; {torch.cuda.device_count()} here", file=sys.stderr)
        return 2
    mp.spawn(_worker, args=(args.nproc, _free_port(), args), nprocs=args.nproc, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``tokemb-fast`` command line: ``demo`` (the seed's pipeline end to end) and ``bench``."""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .data import GPT2_VOCAB_SIZE, SAMPLE_TEXT_FILE, create_dataloader, gpt2_encoding, sample_text
from .functional import resolve_backend
from .module import FusedInputEmbedding
from .reference import input_embedding_reference

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def _best_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but no CUDA device is available")
    return torch.device(name)


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(max(3, repeats // 10)):  # warm-up: compilation, caches, allocator
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _path_description(device: torch.device) -> str:
    backend = resolve_backend(None, device)
    if backend == "torch":
        return "torch (plain PyTorch: F.embedding + F.embedding)"
    if device.type == "cpu":
        return "triton (Triton's CPU interpreter, TRITON_INTERPRET=1)"
    return "triton (fused kernel)"


def run_demo(args: argparse.Namespace) -> int:
    if args.text is None:
        text, source = sample_text(), f"{SAMPLE_TEXT_FILE} (bundled sample)"
    else:
        path = Path(args.text)
        if not path.is_file():
            print(f"error: --text {args.text}: no such file", file=sys.stderr)
            return 2
        text, source = path.read_text(encoding="utf-8"), str(path)
    device = _best_device(args.device)
    dtype = DTYPES[args.dtype]
    n_tokens = len(gpt2_encoding().encode(text, allowed_special={"<|endoftext|>"}))
    try:
        loader = create_dataloader(text, batch_size=args.batch_size, max_length=args.max_length,
                                   stride=args.stride, shuffle=False, drop_last=True)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.vocab_size < GPT2_VOCAB_SIZE:
        print(f"error: --vocab-size {args.vocab_size} is smaller than the GPT-2 vocabulary "
              f"({GPT2_VOCAB_SIZE}); token ids would fall outside the table", file=sys.stderr)
        return 2
    if len(loader) == 0:
        print(f"error: the text gives fewer than {args.batch_size} windows: no full batch", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    embedding = FusedInputEmbedding(args.vocab_size, args.max_length, args.embedding_dim,
                                    device=device, dtype=dtype)
    weights = (embedding.tok_emb.weight, embedding.pos_emb.weight)
    print("tokemb-fast demo")
    print(f"  text        {source}: {len(text):,} characters, {n_tokens:,} GPT-2 tokens")
    print(f"  batches     {len(loader)} of batch {args.batch_size} x max_length {args.max_length} "
          f"(stride {args.stride})")
    print(f"  device      {device} ({_path_description(device)}), {args.dtype}")

    tolerance = torch.finfo(dtype).eps  # relative: the sum of two rows is one rounding either way
    worst = worst_abs = 0.0
    first = None
    with torch.no_grad():
        for inputs, _targets in loader:
            inputs = inputs.to(device)
            fused = embedding(inputs)
            reference = input_embedding_reference(inputs, *weights)
            if first is None:
                first = (inputs, fused)
            difference = (fused.double() - reference.double()).abs()
            worst_abs = max(worst_abs, difference.max().item())
            worst = max(worst, (difference / reference.double().abs().clamp_min(1e-30)).max().item())
        inputs, fused = first
        print(f"  input ids   {list(inputs.shape)} ({inputs.dtype})")
        print(f"  embeddings  {list(fused.shape)} ({fused.dtype})")
        ok = worst <= tolerance
        print(f"  parity      max |fused - reference| = {worst_abs:.3g} (relative {worst:.3g}, tolerance "
              f"{tolerance:.3g}) over {len(loader)} batches: {'OK' if ok else 'FAILED'}")
        fused_s = _median_seconds(lambda: embedding(inputs), device, args.repeats)
        reference_s = _median_seconds(lambda: input_embedding_reference(inputs, *weights), device, args.repeats)
    print(f"  time/batch  fused {fused_s * 1e6:.1f} us, reference {reference_s * 1e6:.1f} us "
          f"(median of {args.repeats}, host clock; {reference_s / fused_s:.2f}x)")
    if device.type == "cpu" and resolve_backend(None, device) == "torch":
        print("  note        on the CPU both sides are the same plain-PyTorch code; run on a GPU to see the kernel")
    return 0 if ok else 1


def _csv(choices):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return values
    return parse


def run_bench(args: argparse.Namespace) -> int:
    from . import bench

    env = bench.environment()
    shapes = [bench.SHAPES[name] for name in args.shapes]
    failures = []  # rows that raised: reported at the end, and the exit status says so
    if torch.cuda.is_available():
        print(f"tokemb-fast bench on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['date']})")
        print("median ms of triton.testing.do_bench; floor = device copy of the bytes the op must move")
        # With --json, the file is rewritten after each shape and dtype: a run stopped by a time
        # limit still leaves what it measured.
        save_partial = (lambda rows_so_far: bench.save_json(rows_so_far, args.json, env)) if args.json else None
        rows = bench.run_cuda(shapes, args.dtypes, args.modes, args.impls, args.ids, on_group=save_partial,
                              failures=failures)
    else:
        print("No CUDA device: this measures ONLY the plain-PyTorch fallback on the CPU "
              f"({env['device']}, torch {env['torch']}). No Triton kernel, no floor and no torch.compile "
              "numbers are produced; run on a GPU for those.")
        cpu_shapes = [s for s in shapes if s.name in ("seed", "decode", "gpt2-124M")] if args.shapes_default else shapes
        rows = bench.run_cpu(cpu_shapes, args.dtypes, args.modes)
    print(bench.format_table(rows))
    if args.json:
        bench.save_json(rows, args.json, env)
        print(f"\nwrote {args.json}")
    if args.plot:
        bench.save_plot(rows, args.plot, env)
        print(f"wrote {args.plot}")
    if failures:
        print(f"\n{len(failures)} row(s) FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokemb-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="tokenize text, batch it, embed it with FusedInputEmbedding and check parity",
        description="Run the seed's pipeline: GPT-2 tokenization (offline), a sliding-window loader, "
                    "FusedInputEmbedding on the best device, parity against the plain-PyTorch "
                    "reference and time per batch. Exits 1 if parity fails, 2 on bad arguments.")
    demo.add_argument("--text", metavar="FILE", help="UTF-8 text to tokenize (default: the bundled "
                                                       "'The Verdict' by Edith Wharton)")
    demo.add_argument("--batch-size", type=int, default=8, help="windows per batch (default 8)")
    demo.add_argument("--max-length", type=int, default=4,
                      help="tokens per window, also the position table's context_length (default 4)")
    demo.add_argument("--stride", type=int, default=4, help="tokens between window starts (default 4)")
    demo.add_argument("--vocab-size", type=int, default=GPT2_VOCAB_SIZE,
                      help=f"rows of the token table, at least {GPT2_VOCAB_SIZE} (default {GPT2_VOCAB_SIZE})")
    demo.add_argument("--embedding-dim", type=int, default=256, help="embedding width D (default 256)")
    demo.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="table dtype (default float32)")
    demo.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, or cuda[:N]")
    demo.add_argument("--seed", type=int, default=123, help="torch.manual_seed for the tables (default 123)")
    demo.add_argument("--repeats", type=int, default=100, help="timed calls per side (default 100)")
    demo.set_defaults(func=run_demo)

    from .bench import (DROPOUT_IMPLS, DROPOUT_P, DTYPES as BENCH_DTYPES, HF_IMPLS, ID_DISTRIBUTIONS, IMPLS, MODES,
                        SHAPES)
    bench = sub.add_parser(
        "bench", help="time fused vs eager vs torch.compile vs the memory floor, a table per shape and dtype",
        description="Benchmark the fused op side by side with eager PyTorch, torch.compile and the "
                    "memory-traffic floor (a device copy of the same bytes), in one process on one GPU. "
                    "On a machine without CUDA it times only the plain-PyTorch fallback and says so.")
    bench.add_argument("--shapes", type=_csv(list(SHAPES)), default=None,
                       help=f"comma-separated, from {', '.join(SHAPES)} (default: all; on CPU: seed, decode, gpt2-124M)")
    bench.add_argument("--dtypes", type=_csv(list(BENCH_DTYPES)), default=["fp32", "bf16"],
                       help="comma-separated table dtypes (default fp32,bf16)")
    bench.add_argument("--modes", type=_csv(list(MODES)), default=list(MODES), help="fwd, fwd+bwd (default both)")
    bench.add_argument("--impls", type=_csv(list(IMPLS + DROPOUT_IMPLS + HF_IMPLS)), default=list(IMPLS),
                       help="implementations to time (default: " + ", ".join(IMPLS) + "; also "
                            + ", ".join(DROPOUT_IMPLS) + f", with p={DROPOUT_P}; and " + ", ".join(HF_IMPLS)
                            + ": Hugging Face GPT2Model's embedding before and after swap_input_embeddings)")
    bench.add_argument("--ids", type=_csv(list(ID_DISTRIBUTIONS)), default=["uniform"],
                       help="id distributions: uniform, zipf, equal (skewed ones time fused and eager only)")
    bench.add_argument("--json", metavar="FILE", help="also write every row and the environment as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="also plot achieved bandwidth against the floor "
                                                           "(needs matplotlib: the [bench] extra)")
    bench.set_defaults(func=run_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import SHAPES
        args.shapes_default = args.shapes is None
        args.shapes = args.shapes or list(SHAPES)
    for name in ("batch_size", "max_length", "stride", "embedding_dim", "repeats"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The tokemb-fast command: demo, bench and info.

  tokemb-fast demo     tokenize the bundled story, batch it, embed it, check it against plain PyTorch
  tokemb-fast bench    time the fused op beside eager PyTorch, torch.compile and a memory copy
  tokemb-fast info     what a bug report needs: versions, device, which path a call takes
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .data import GPT2_VOCAB_SIZE, SAMPLE_TEXT_FILE, create_dataloader, gpt2_encoding, sample_text
from ._version import __version__
from .functional import backend_name
from .module import FusedInputEmbedding
from .reference import input_embedding_reference

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def _best_device(name: str) -> Optional[torch.device]:
    """The device to run on, or None (after saying why) for one that is not there, or that the
    demo cannot run on, or whose path cannot run (TOKEMB_FAST_BACKEND)."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError) as error:
            print(f"error: --device {name!r} is not a device ({error})", file=sys.stderr)
            return None
        if device.type not in ("cpu", "cuda"):
            print(f"error: --device {name}: the demo runs on cpu or cuda (it reads the results back)", file=sys.stderr)
            return None
        if device.type == "cuda" and not torch.cuda.is_available():
            print(f"error: --device {name} asked for, but no CUDA device is available", file=sys.stderr)
            return None
    try:
        backend_name(device)
    except (RuntimeError, ValueError) as error:  # e.g. TOKEMB_FAST_BACKEND=bogus, or triton without the interpreter
        print(f"error: no path can run on {device}: {error}", file=sys.stderr)
        return None
    return device


def _writable(path: str, flag: str) -> bool:
    """Whether a file can be written at path (checked before a run that would lose its work): an
    existing writable file, or a new one in a writable directory."""
    target = Path(path)
    if not path or target.is_dir():
        ok = False
    elif target.exists():
        ok = os.access(target, os.W_OK)
    else:
        ok = target.parent.is_dir() and os.access(target.parent, os.W_OK)
    if not ok:
        print(f"error: {flag} {path!r}: cannot write a file there", file=sys.stderr)
    return ok


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


PATHS = {"torch": "plain PyTorch: F.embedding + F.embedding",
         "triton-interpreter": "Triton kernels on Triton's CPU interpreter (TRITON_INTERPRET=1)",
         "triton": "Triton kernels, compiled"}


def _path_description(device: torch.device) -> str:
    return PATHS[backend_name(device)]


def run_demo(args: argparse.Namespace) -> int:
    if args.text is None:
        text, source = sample_text(), f"{SAMPLE_TEXT_FILE} (bundled sample)"
    else:
        path = Path(args.text)
        if not path.is_file():
            print(f"error: --text {args.text}: no such file", file=sys.stderr)
            return 2
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as error:
            print(f"error: --text {args.text}: not UTF-8 text ({error})", file=sys.stderr)
            return 2
    device = _best_device(args.device)
    if device is None:
        return 2
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
        # Against what it replaces: two nn.Embedding modules on the same tables, summed, positions
        # from torch.arange as GPT code makes them (the bench's baseline too).
        from .bench import TwoEmbeddings
        plain = TwoEmbeddings(embedding.tok_emb, embedding.pos_emb)
        fused_s = _median_seconds(lambda: embedding(inputs), device, args.repeats)
        plain_s = _median_seconds(lambda: plain(inputs), device, args.repeats)
    print(f"  time/batch  fused {fused_s * 1e6:.1f} us, two nn.Embedding summed {plain_s * 1e6:.1f} us "
          f"(median of {args.repeats}, host clock; fused / nn.Embedding x2 = {fused_s / plain_s:.2f}, lower is faster)")
    if backend_name(device) == "torch":
        print("  note        on the CPU the fused module runs plain PyTorch too; run on a GPU to see the kernel")
    return 0 if ok else 1


def _csv(choices):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return values
    return parse


class Progress:
    """One status line on stderr, rewritten in place on a terminal; elsewhere (CI logs) a line per
    step. Never mixed into the table on stdout."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()

    def __call__(self, label: str) -> None:
        self.done += 1
        line = f"[{self.done}/{self.total} {time.perf_counter() - self.started:5.0f}s] {label}"
        if self.live:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()


def run_bench(args: argparse.Namespace) -> int:
    from . import bench

    if (args.json is not None and not _writable(args.json, "--json")) or \
            (args.plot is not None and not _writable(args.plot, "--plot")):
        return 2
    try:
        backend_name("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.plot:
        try:  # before any timing: a missing plotting library must not cost a whole run
            import matplotlib  # noqa: F401
        except ImportError:
            print("tokemb-fast bench: --plot needs matplotlib, which is not installed: "
                  "pip install 'tokemb-fast[bench]' (or run without --plot)", file=sys.stderr)
            return 2
        from matplotlib.backend_bases import FigureCanvasBase
        suffix = Path(args.plot).suffix[1:].lower()
        if suffix and suffix not in FigureCanvasBase.get_supported_filetypes():
            print(f"error: --plot {args.plot}: matplotlib cannot write .{suffix} files (it writes "
                  f"{', '.join(sorted(FigureCanvasBase.get_supported_filetypes()))})", file=sys.stderr)
            return 2
    env = bench.environment()
    shapes = [bench.SHAPES[name] for name in args.shapes]
    failures = []  # rows that raised: reported at the end, and the exit status says so
    if torch.cuda.is_available():
        print(f"tokemb-fast bench on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['date']})")
        print("median and quartiles of triton.testing.do_bench, ms; floor = a device copy of the bytes the op must "
              "move")
        # With --json, the file is rewritten after each shape and dtype: a run stopped by a time
        # limit still leaves what it measured.
        save_partial = (lambda rows_so_far: bench.save_json(rows_so_far, args.json, env)) if args.json else None
        # (Skewed id distributions time the fused and eager rows only.)
        rows_per_group = len(args.modes) * sum(
            1 for ids in args.ids for impl in args.impls
            if impl != "floor" and (ids == "uniform" or impl in ("fused", "eager", "fused+dropout")))
        progress = Progress(len(shapes) * len(args.dtypes) * rows_per_group)
        rows = bench.run_cuda(shapes, args.dtypes, args.modes, args.impls, args.ids, on_group=save_partial,
                              failures=failures, progress=progress)
        progress.close()
        print(bench.format_table(rows))
    else:
        print(f"No CUDA device: timing what runs on this CPU ({env['device']}, torch {env['torch']}): "
              "FusedInputEmbedding, whose CPU path is plain PyTorch, beside the two nn.Embedding modules summed "
              "that it replaces, on the same tables. No Triton kernel, floor or torch.compile numbers: run on a "
              "GPU for those. Median and quartiles of per-call ms, samples taken in alternation.")
        ignored = [flag for flag, given in (("--impls", args.impls != list(bench.IMPLS)),
                                            ("--ids", args.ids != ["uniform"])) if given]
        if ignored:  # (the CPU table has one fixed pair of implementations on uniform ids)
            print(f"Note: {' and '.join(ignored)} apply to the GPU tables only; ignored here.")
        cpu_shapes = [s for s in shapes if s.name in ("seed", "decode", "gpt2-124M")] if args.shapes_default else shapes
        progress = Progress(len(cpu_shapes) * len(args.dtypes) * len(args.modes))
        rows = bench.run_cpu(cpu_shapes, args.dtypes, args.modes, progress=progress)
        progress.close()
        print(bench.format_cpu_table(rows))
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


def _version_line() -> str:
    return f"tokemb-fast {__version__} (torch {torch.__version__})"


def run_info(args: argparse.Namespace) -> int:
    """Print what a bug report needs, in the spirit of python -m torch.utils.collect_env."""
    import platform
    lines = [("tokemb-fast", __version__), ("python", f"{platform.python_version()} ({sys.executable})"),
             ("platform", platform.platform()), ("torch", torch.__version__)]
    try:
        import triton
        lines.append(("triton", triton.__version__))
    except ImportError as error:
        lines.append(("triton", f"not importable ({error})"))
    lines.append(("numpy", _version_of("numpy")))
    lines.append(("transformers", _version_of("transformers")))
    lines.append(("CUDA (torch built with)", torch.version.cuda or "none (a CPU build)"))
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            lines.append((f"cuda:{index}", f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"))
    else:
        lines.append(("GPU", "none visible"))
    for name in ("TOKEMB_FAST_BACKEND", "TRITON_INTERPRET", "TOKEMB_FAST_CACHED_LAUNCH", "CUDA_VISIBLE_DEVICES"):
        lines.append((name, os.environ.get(name, "(unset)")))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        try:
            path = PATHS[backend_name(device)]
        except (RuntimeError, ValueError) as error:
            path = f"none: {error}"
        lines.append((f"a call on {device} takes", path))
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name:<{width}}  {value}")
    return 0


def _version_of(module_name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(module_name)
    except metadata.PackageNotFoundError:
        return "not installed"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokemb-fast", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The first layer of a GPT model, token + position embedding, fused on the GPU.",
        epilog="Run 'tokemb-fast COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="tokenize the bundled story, batch it, embed it and check it against plain PyTorch",
        description="Tokenize a text with GPT-2's tokenizer (no download), cut it into sliding windows, embed "
                    "each batch with FusedInputEmbedding on the best device, check every output against plain "
                    "PyTorch and time a batch. Exits 1 if the check fails, 2 on bad arguments.")
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
    demo.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, or cuda[:N] "
                                                        "(default auto)")
    demo.add_argument("--seed", type=int, default=123, help="torch.manual_seed for the tables (default 123)")
    demo.add_argument("--repeats", type=int, default=100, help="timed calls per side (default 100)")
    demo.set_defaults(func=run_demo)

    from .bench import (DROPOUT_IMPLS, DROPOUT_P, DTYPES as BENCH_DTYPES, HF_IMPLS, ID_DISTRIBUTIONS, IMPLS, MODES,
                        SHAPES)
    bench = sub.add_parser(
        "bench", help="time the fused op beside eager PyTorch, torch.compile and a memory copy",
        description="Time the fused op side by side with eager PyTorch, torch.compile and the memory-traffic "
                    "floor (a device copy of the bytes the op must move), in one process on one GPU: a table per "
                    "shape and dtype, each row a median with its spread. Without a GPU it times what runs on "
                    "the CPU instead: the module's plain-PyTorch path beside two nn.Embedding modules summed.")
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
                       help="id distributions: uniform, zipf, equal (skewed ones time fused and eager only; "
                            "default uniform)")
    bench.add_argument("--json", metavar="FILE", help="also write every row and the environment as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="also plot achieved bandwidth against the floor (on CPU, "
                                                           "where bandwidth says little: the median time per call "
                                                           "of each implementation; needs matplotlib: the [bench] "
                                                           "extra)")
    bench.set_defaults(func=run_bench)
    info = sub.add_parser("info", help="print versions, devices and which path a call takes (for bug reports)",
                          description="Print what a bug report needs: tokemb-fast, Python, torch, Triton, CUDA and "
                                      "transformers versions, the GPUs, the environment variables that choose a "
                                      "path, and which path a call on each device takes.")
    info.set_defaults(func=run_info)
    parser.commands = {"demo": demo, "bench": bench, "info": info}  # (main's checks: the command's own usage)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `tokemb-fast`: say what there is
        parser.print_help()
        return 0
    if args.command == "bench":
        from .bench import SHAPES
        args.shapes_default = args.shapes is None
        args.shapes = args.shapes or list(SHAPES)
    command = parser.commands[args.command]
    for name in ("batch_size", "max_length", "stride", "embedding_dim", "repeats"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            command.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2 ** 64:  # (torch.manual_seed's range)
        command.error(f"--seed must be in 0 .. 2**64 - 1, got {seed}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

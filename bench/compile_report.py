"""What the GPU compiler makes of our kernels, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks the kernels' maths on CPU tensors, but not whether
they compile for a GPU at all, nor what ptxas does with them: registers per thread (which bound
how many programs share an SM, so how many loads are in flight in a memory-bound kernel), spills
to local memory, the width of the global loads and stores (16-byte vector accesses or not), or
whether a multiply and an add were contracted into one FMA (which would round differently from
the interpreter, whose results the tests check).

Triton's NVIDIA backend and its bundled ptxas run on any x86 machine, so this script compiles
every kernel variant the launchers ask for at the benchmark shapes, for sm_90a (H100/H200),
and reports those facts. It runs the real autograd path (FusedInputEmbeddingFunction forward
and backward on CPU tensors that are never filled) under a stand-in Triton driver that names
an sm_90 target and records each launch (kernel, grid) instead of running it. A forward large
enough to be autotuned compiles all its configs: the stand-in benchmarker gives each the same
time, so the first is kept.

Run it in a process of its own (it replaces Triton's active driver) with TRITON_INTERPRET unset:

    python bench/compile_report.py [--quick] [--fresh-cache] [--json FILE] [--markdown FILE]

--fresh-cache compiles into an empty Triton cache so that the compile times it reports (per
kernel, and for the forward's autotune configs) are real rather than cache hits.

It exits non-zero if a kernel fails to compile or spills. Figures are compiler output, not
timings: they say nothing about speed that a GPU measurement would not overrule.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_report: unset TRITON_INTERPRET; the kernels must be compiled, not interpreted")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

#: H100 and H200 are both compute capability 9.0 (Triton compiles for sm_90a there).
TARGET = GPUTarget("cuda", 90, 32)
#: What Triton asks the device about when it loads a kernel (an H100 SXM's figures).
DEVICE_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                     "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                     "mem_bus_width": 5120}


@dataclass
class Launch:
    kernel: str
    hash: str
    grid: tuple
    tuning: bool  # an autotuner trial, not the launch the op keeps
    # The kernel's arguments, tensors as (dtype, shape, strides, 16-byte aligned): what a cached
    # launch must pass exactly as Triton's own launch does (tests/test_cached_launch.py).
    arguments: tuple = field(default=(), repr=False, compare=False)


def _describe_argument(value):
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), value.stride(), value.data_ptr() % 16 == 0)
    return value


class CompileOnlyDriver:
    """Triton's driver interface, enough of it to compile for TARGET and 'launch' nowhere."""

    def __init__(self, record_arguments: bool = False):
        self.launches: List[Launch] = []
        self.tuning = False
        self.record_arguments = record_arguments
        driver_self = self

        class Utils:
            def get_device_properties(self, device):
                return dict(DEVICE_PROPERTIES)

            def load_binary(self, name, kernel, shared, device):
                # module, function, n_regs, n_spills, n_max_threads: known only to a real driver;
                # ptxas reports them below instead. The module is a placeholder that is not None,
                # as a real one is: Triton reloads a binary whose module is None at each launch.
                return object(), None, 0, 0, 1024

            def unload_module(self, module):
                pass

        class Launcher:
            def __init__(self, src, metadata):
                self.name, self.hash = metadata.name, metadata.hash

            def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata,
                         enter_hook, exit_hook, *args):
                arguments = tuple(map(_describe_argument, args)) if driver_self.record_arguments else ()
                driver_self.launches.append(Launch(self.name, self.hash, (grid_x, grid_y, grid_z),
                                                   driver_self.tuning, arguments))

        self.utils = Utils()
        self.launcher_cls = Launcher

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **kwargs):
            # Every config "takes" 1 ms: the autotuner compiles each and keeps the first.
            self.tuning = True
            try:
                kernel_call()
            finally:
                self.tuning = False
            return [1.0] * len(quantiles) if quantiles else 1.0
        return bench


#: Seconds each compiled kernel (by hash) took to compile: Triton's front end, LLVM and ptxas.
COMPILE_SECONDS: Dict[str, float] = {}


def _time_compiles():
    """Wrap triton.compile (JITFunction looks it up when it first binds a kernel) to time it."""
    import triton.compiler

    original = triton.compiler.compile

    def timed(*args, **kwargs):
        started = time.perf_counter()
        compiled = original(*args, **kwargs)
        COMPILE_SECONDS[compiled.metadata.hash] = time.perf_counter() - started
        return compiled

    triton.compiler.compile = timed


@dataclass
class KernelReport:
    kernel: str
    hash: str
    specialisation: Dict[str, object]
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    load_bytes: List[int]      # distinct widths of global loads, in bytes per thread access
    store_bytes: List[int]
    fma: int                   # contracted multiply-adds (0: rounding as in the interpreter)
    compile_s: float           # 0 when it came from Triton's on-disk cache (see --fresh-cache)


@dataclass
class CaseReport:
    case: str
    batch: int = 0
    dim: int = 0
    outputs: int = 0  # B*T*D
    explicit_positions: bool = False  # position_ids given (else the default arange positions)
    int32_ids: bool = False           # int32 token ids (sorted as they are: no sort-key launch)
    sparse: bool = False              # sparse token gradient
    encoder: bool = False             # the encoder op (kernels/encoder.py)
    launches: List[dict] = field(default_factory=list)
    tuning_hashes: List[str] = field(default_factory=list)  # the forward configs the autotuner tried
    error: Optional[str] = None


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)")
_WIDTH = {"8": 1, "16": 2, "32": 4, "64": 8, "128": 16}


def access_widths(ptx: str, kind: str) -> List[int]:
    """Distinct byte widths of ld.global / st.global accesses in a PTX listing."""
    widths = set()
    for op, suffixes in _ACCESS.findall(ptx):
        if op != kind:
            continue
        parts = suffixes.split(".")
        vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v[248]", p)), 1)
        bits = next((p[1:] for p in reversed(parts) if re.fullmatch(r"[bfsu](8|16|32|64)", p)), None)
        if bits is not None:
            widths.add(vector * _WIDTH[bits])
    return sorted(widths)


def ptxas_usage(ptx: str) -> Dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        result = subprocess.run([get_ptxas(TARGET.arch).path, "-v", f"--gpu-name=sm_{TARGET.arch}a",
                                 handle.name, "-o", os.devnull], capture_output=True, text=True, check=True)
    finally:
        os.unlink(handle.name)
    text = result.stdout + result.stderr

    def number(pattern):
        match = re.search(pattern, text)
        return int(match.group(1)) if match else 0

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads")}


# Constexprs worth a column: the tile shape and the variant switches.
_SHOWN = ("BLOCK_D", "TILE", "ROWS", "BLOCK", "BLOCK_N", "CHUNK", "SHORT", "HAS_POSITION_IDS", "HAS_BOUNDS",
          "HAS_CHUNKS", "IMPLICIT_POSITIONS", "HAS_DROPOUT", "ALIGNED4", "ACC_FP64", "SCALE_BY_FREQ")


def kernel_reports(kernels_module) -> Dict[str, KernelReport]:
    reports = {}
    for jit_function in vars(kernels_module).values():
        if not isinstance(jit_function, JITFunction):
            continue
        for caches in jit_function.device_caches.values():
            for compiled in caches[0].values():
                metadata = compiled.metadata
                constants = {jit_function.arg_names[key[0]]: value for key, value in compiled.src.constants.items()
                             if len(key) == 1}
                ptx = compiled.asm["ptx"]
                shown = {name: constants[name] for name in _SHOWN if name in constants}
                shown["pointers"] = ",".join(sorted({ty[1:] for ty in compiled.src.signature.values()
                                                     if isinstance(ty, str) and ty.startswith("*")}))
                reports[metadata.hash] = KernelReport(
                    kernel=metadata.name, hash=metadata.hash, specialisation=shown,
                    num_warps=metadata.num_warps, shared_bytes=metadata.shared, **ptxas_usage(ptx),
                    load_bytes=access_widths(ptx, "ld"), store_bytes=access_widths(ptx, "st"),
                    fma=len(re.findall(r"\bfma\.rn", ptx)), compile_s=COMPILE_SECONDS.get(metadata.hash, 0.0))
    return reports


def cases(quick: bool):
    """(label, shape, dtype, options): each is one forward + backward through the autograd Function."""
    from tokemb_fast.bench import SHAPES, Shape
    from tokemb_fast.options import TokenShard

    gpt2, decode = SHAPES["gpt2-124M"], SHAPES["decode"]
    odd = Shape("odd", 4, 64, 1000, 100, 64)  # D not divisible by 16: no vector accesses
    if quick:  # one of each kernel variant family, for the test suite
        main = [("gpt2-124M", gpt2, torch.float32, {}), ("gpt2-124M", gpt2, torch.bfloat16, {"dropout_p": 0.1}),
                ("decode", decode, torch.float32, {})]
    else:
        main = [(name, shape, dtype, options) for name, shape in SHAPES.items()
                for dtype in (torch.float32, torch.bfloat16) for options in ({}, {"dropout_p": 0.1})]
        main.append(("gpt2-124M", gpt2, torch.float16, {}))
    for name, shape, dtype, options in main:
        yield f"{name} {str(dtype)[6:]}{' dropout' if options else ''}", shape, dtype, options
    # 64 batch rows: default positions' segments cover whole chunks (the chunk kernel's closed-form
    # variant); the benchmark shapes all have B < 32 or explicit positions.
    yield "B=64 default positions float32", Shape("wide", 64, 16, 1000, 768, 16), torch.float32, {}
    yield "D=100 float64", odd, torch.float64, {}
    yield "D=100 float32, int32 ids, position_ids [B, T], padding_idx, scale_grad_by_freq, token_scale", odd, \
        torch.float32, {"int32": True, "position_ids": True, "padding_idx": 0, "scale_grad_by_freq": True,
                        "token_scale": 10.0}
    yield "D=100 bfloat16 dropout, sparse token grad", odd, torch.bfloat16, {"dropout_p": 0.1, "sparse": True}
    # Tensor parallelism: a rank's shard of the vocabulary, without the position rows.
    yield "gpt2-124M float32, token shard 2 of 4", Shape("shard", 8, 1024, 12565, 768, 1024), torch.float32, \
        {"shard": TokenShard(25130, 50257, False)}
    # The encoder op (kernels/encoder.py): BERT's token types and LayerNorm, RoBERTa's positions
    # from the padding, DistilBERT without token types, and BERT-large's D = 1024.
    bert = SHAPES["bert-base"]
    yield "bert-base float32 (encoder)", bert, torch.float32, {"encoder": True}
    yield "bert-base bfloat16 dropout, RoBERTa positions (encoder)", bert, torch.bfloat16, \
        {"encoder": True, "dropout_p": 0.1, "pad_position_id": 1}
    if not quick:
        yield "bert-large float32, position_ids (encoder)", Shape("bert-large", 8, 512, 30522, 1024, 512,
                                                                  type_vocab_size=2), \
            torch.float32, {"encoder": True, "position_ids": True}
        yield "distilbert float16 (encoder, no token types)", Shape("distilbert", 32, 512, 30522, 768, 512), \
            torch.float16, {"encoder": True, "no_token_types": True}
        yield "D=100 float64 (encoder)", Shape("odd-encoder", 4, 64, 1000, 100, 64, type_vocab_size=2), \
            torch.float64, {"encoder": True}


def _explicit_positions(shape, options) -> bool:
    return shape.random_positions or options.get("position_ids", False)


def run_encoder_case(shape, dtype, options, fake: CompileOnlyDriver) -> List[Launch]:
    from tokemb_fast import EncoderOptions, FusedEncoderEmbeddingFunction, dropout_seed

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len), generator=generator)
    position_ids = torch.randint(0, shape.context_length, (shape.batch, shape.seq_len), generator=generator) \
        if options.get("position_ids") else None
    types = 0 if options.get("no_token_types") else max(shape.type_vocab_size, 2)
    word = torch.empty(shape.vocab_size, shape.dim, dtype=dtype, requires_grad=True)
    position = torch.empty(shape.context_length, shape.dim, dtype=dtype, requires_grad=True)
    token_type = torch.empty(types, shape.dim, dtype=dtype, requires_grad=True) if types else None
    token_type_ids = torch.randint(0, types, (shape.batch, shape.seq_len), generator=generator) if types else None
    ln_weight = torch.empty(shape.dim, dtype=dtype, requires_grad=True)
    ln_bias = torch.empty(shape.dim, dtype=dtype, requires_grad=True)
    dropout_p = options.get("dropout_p", 0.0)
    encoder_options = EncoderOptions(pad_position_id=options.get("pad_position_id", -1), dropout_p=dropout_p)
    start = len(fake.launches)
    out = FusedEncoderEmbeddingFunction.apply(ids, word, position, token_type, token_type_ids, position_ids,
                                              ln_weight, ln_bias, encoder_options,
                                              dropout_seed("cpu") if dropout_p > 0 else None)[0]
    out.backward(torch.empty_like(out))
    return fake.launches[start:]


def run_case(shape, dtype, options, fake: CompileOnlyDriver) -> List[Launch]:
    from tokemb_fast import FusedInputEmbeddingFunction, LookupOptions, TableOptions, dropout_seed

    if options.get("encoder"):
        return run_encoder_case(shape, dtype, options, fake)

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len), generator=generator)
    if options.get("int32"):
        ids = ids.to(torch.int32)
    position_ids = None
    if _explicit_positions(shape, options):
        position_ids = torch.randint(0, shape.context_length, (shape.batch, shape.seq_len), generator=generator)
    # Never filled: nothing runs, so only shapes, dtypes and alignment matter (and untouched
    # pages of a 2 GB table cost nothing).
    token_weight = torch.empty(shape.vocab_size, shape.dim, dtype=dtype, requires_grad=True)
    position_weight = torch.empty(shape.context_length, shape.dim, dtype=dtype, requires_grad=True)
    start = len(fake.launches)
    dropout_p = options.get("dropout_p", 0.0)
    lookup = LookupOptions(token=TableOptions(options.get("padding_idx"), options.get("scale_grad_by_freq", False),
                                              options.get("sparse", False)),
                           dropout_p=dropout_p, check_ids=options.get("check_ids", True),
                           token_scale=options.get("token_scale", 1.0), shard=options.get("shard"))
    out = FusedInputEmbeddingFunction.apply(ids, token_weight, position_weight, position_ids, lookup,
                                            dropout_seed("cpu") if dropout_p > 0 else None)
    out.backward(torch.empty_like(out))
    return fake.launches[start:]


def markdown(kernels: Dict[str, KernelReport], case_reports: List[CaseReport], env: dict) -> str:
    lines = [f"Compiled for sm_{TARGET.arch}a on {env['date']} with torch {env['torch']}, triton {env['triton']} "
             f"(no GPU: `python bench/compile_report.py`; every variant is in its `--json`).", "",
             "| kernel | variants | registers | spills (B) | ld widths (B) | st widths (B) | fma "
             "| compile s (median) |",
             "|---|---|---|---|---|---|---|---|"]
    by_name = collections.defaultdict(list)
    for report in kernels.values():
        by_name[report.kernel].append(report)
    for name, reports in sorted(by_name.items()):
        registers = [r.registers for r in reports]
        widths = {kind: sorted(set().union(*(getattr(r, kind) for r in reports)))
                  for kind in ("load_bytes", "store_bytes")}
        lines.append(f"| {name} | {len(reports)} | {min(registers)}-{max(registers)} | "
                     f"{max(r.spill_stores + r.spill_loads for r in reports)} | "
                     f"{','.join(map(str, widths['load_bytes']))} | {','.join(map(str, widths['store_bytes']))} | "
                     f"{max(r.fma for r in reports)} | {_median_compile(reports)} |")
    lines += ["", "| case (forward + backward) | Triton launches: kernel (grid) registers | forward autotune: "
              "configs, compile s |", "|---|---|---|"]
    for case in case_reports:
        if case.error:
            lines.append(f"| {case.case} | **failed**: {case.error} |")
            continue
        launches = "; ".join(f"{launch['kernel']} {tuple(launch['grid'][:2])} {kernels[launch['hash']].registers}"
                             for launch in case.launches)
        tuning = [kernels[h] for h in case.tuning_hashes]
        tuned = f"{len(tuning)}, {sum(k.compile_s for k in tuning):.1f}" if env["fresh_cache"] else f"{len(tuning)}, -"
        lines.append(f"| {case.case} | {launches} | {tuned} |")
    if env["fresh_cache"]:
        lines += ["", f"Compile times: an empty Triton cache, on this machine's {env['cpus']} CPU cores (a GPU "
                  "machine's host CPU may differ). The autotune column is the compile time of the configs the first "
                  "forward call at a new (D, dtype) tries before timing them on the GPU (a process that already "
                  "compiled the same specialisations for another D reuses them)."]
    return "\n".join(lines) + "\n"


def _median_compile(reports) -> str:
    times = sorted(r.compile_s for r in reports if r.compile_s > 0)
    return f"{times[len(times) // 2]:.2f}" if times else "cached"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one case per kernel variant family (the test suite's set)")
    parser.add_argument("--json", metavar="FILE", help="write kernels and cases as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="compile into an empty Triton cache, so compile times are real (slower)")
    args = parser.parse_args(argv)

    if args.fresh_cache:
        triton.knobs.cache.dir = tempfile.mkdtemp(prefix="tokemb-triton-cache-")
    _time_compiles()
    fake = CompileOnlyDriver()
    driver.set_active(fake)
    from tokemb_fast import kernels as kernels_module
    from tokemb_fast import triton_ops
    assert not triton_ops.INTERPRETED

    case_reports = []
    started = time.perf_counter()
    for label, shape, dtype, options in cases(args.quick):
        report = CaseReport(label, batch=shape.batch, dim=shape.dim, outputs=shape.batch * shape.seq_len * shape.dim,
                            explicit_positions=_explicit_positions(shape, options)
                            or options.get("pad_position_id", -1) >= 0,  # RoBERTa's: computed, then sorted
                            int32_ids=options.get("int32", False),
                            sparse=options.get("sparse", False), encoder=options.get("encoder", False))
        try:
            launches = run_case(shape, dtype, options, fake)
            report.launches = [{key: value for key, value in asdict(launch).items() if key != "arguments"}
                               for launch in launches if not launch.tuning]
            report.tuning_hashes = sorted({launch.hash for launch in launches if launch.tuning})
        except Exception as exc:  # a compile failure: report it and go on with the other cases
            report.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        case_reports.append(report)
        print(f"[{time.perf_counter() - started:6.1f}s] {label}: "
              f"{report.error or f'{len(report.launches)} launches'}", file=sys.stderr)
    kernels = kernel_reports(kernels_module)

    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "triton": triton.__version__,
           "target": f"sm_{TARGET.arch}a", "fresh_cache": args.fresh_cache, "cpus": os.cpu_count()}
    text = markdown(kernels, case_reports, env)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": env, "kernels": [asdict(k) for k in kernels.values()],
                       "cases": [asdict(c) for c in case_reports]}, handle, indent=1, default=str)
    failed = [c.case for c in case_reports if c.error]
    spilled = [k.kernel for k in kernels.values() if k.spill_stores or k.spill_loads]
    if failed or spilled:
        print(f"compile_report: failed cases {failed}, spilling kernels {spilled}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

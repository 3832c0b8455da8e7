"""Side-by-side measurements: fused vs eager PyTorch vs torch.compile vs the memory-traffic floor.

Every number in a table comes from one process on one device. Timings are medians of
``triton.testing.do_bench`` (which warms up, and flushes L2 between repetitions). The floor is a
device copy of the bytes the op must move:

* forward: copy B*T*D elements (read the gathered rows once, write the output once);
* forward+backward: that, plus writing the V*D and P*D gradient tables once (zero-fill) and
  reading the B*T*D upstream gradient once.

Inputs are random (never zeros), ids uniform unless a distribution is named.
"""
import datetime
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .functional import fused_input_embedding


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq_len: int
    vocab_size: int
    dim: int
    context_length: int
    random_positions: bool = False  # decode: one token per row at a random position
    #: The encoder op (BERT's embedding): token types (this many), LayerNorm; 0 for the GPT op.
    type_vocab_size: int = 0

    def describe(self) -> str:
        return f"B{self.batch} T{self.seq_len} V{self.vocab_size} D{self.dim}"


SHAPES = {
    "seed": Shape("seed", 8, 4, 50257, 256, 4),
    "gpt2-124M": Shape("gpt2-124M", 8, 1024, 50257, 768, 1024),
    "gpt2-xl": Shape("gpt2-xl", 8, 1024, 50257, 1600, 1024),
    "big": Shape("big", 4, 4096, 128256, 4096, 4096),
    "decode": Shape("decode", 64, 1, 50257, 768, 1024, random_positions=True),
    # BERT-base's embedding: word + token type + position, LayerNorm (fused_encoder_embedding).
    "bert-base": Shape("bert-base", 32, 512, 30522, 768, 512, type_vocab_size=2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwd+bwd")
#: "fused": FusedInputEmbedding as users call it (default id check: the kernel's flag, no sync);
#: "fused-unchecked": fused_input_embedding with check_ids=False (the kernel alone);
#: "fused-sync": check_ids="sync" (ids checked on the host before the launch).
IMPLS = ("fused", "fused-unchecked", "fused-sync", "eager", "compile", "floor")
#: GPT-2's embedding dropout after the sum: fused (mask regenerated in the backward) against
#: eager ``F.dropout(tok + pos)`` (which stores a B*T*D mask) and its torch.compile.
DROPOUT_IMPLS = ("fused+dropout", "eager+dropout", "compile+dropout")
DROPOUT_P = 0.1
#: What Hugging Face GPT2Model does around the embedding, before and after swap_input_embeddings:
#: drop(wte(ids) + wpe(position_ids [1, T])) against drop(zero placeholder + fused(ids, positions)).
HF_IMPLS = ("hf-eager", "hf-swapped")
#: Which rows a row is compared with in the "vs eager" and "vs compile" columns.
BASELINES = {"fused+dropout": ("eager+dropout", "compile+dropout"), "hf-swapped": ("hf-eager", None)}
ID_DISTRIBUTIONS = ("uniform", "zipf", "equal")
#: The Zipf exponent of "zipf" ids: rank r drawn with probability proportional to r ** -1.1 (natural
#: text's token frequencies are near it; before 2026-12-06 the exponent was 1.0).
ZIPF_S = 1.1


@dataclass
class Row:
    shape: str
    dtype: str
    mode: str
    impl: str
    ids: str
    ms: float
    floor_ms: float
    bytes_moved: int
    peak_extra_mb: Optional[float] = None
    extra: Dict[str, float] = field(default_factory=dict)
    #: The spread of the timings: first and third quartile, ms.
    ms_q1: Optional[float] = None
    ms_q3: Optional[float] = None

    @property
    def gbps(self) -> float:
        return self.bytes_moved / (self.ms * 1e-3) / 1e9

    @property
    def x_floor(self) -> float:
        return self.ms / self.floor_ms


def environment() -> dict:
    import triton

    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return info


def bytes_moved(shape: Shape, element_size: int, mode: str) -> int:
    n = shape.batch * shape.seq_len * shape.dim
    forward = 2 * n
    if mode == "fwd":
        return forward * element_size
    tables = shape.vocab_size + shape.context_length + shape.type_vocab_size
    return (forward + tables * shape.dim + n) * element_size


def make_inputs(shape: Shape, dtype: torch.dtype, device, ids: str = "uniform", seed: int = 0):
    # Drawn on the device itself: the big shape's 0.5 G-element table takes seconds on one CPU core.
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    n = shape.batch * shape.seq_len
    if ids == "uniform":
        input_ids = torch.randint(0, shape.vocab_size, (n,), generator=generator, device=device)
    elif ids == "zipf":
        ranks = torch.arange(1, shape.vocab_size + 1, dtype=torch.float64, device=device)
        weights = ranks ** -ZIPF_S
        ranks = torch.multinomial(weights, n, replacement=True, generator=generator)
        input_ids = torch.randperm(shape.vocab_size, generator=generator, device=device)[ranks]
    elif ids == "equal":
        token = int(torch.randint(0, shape.vocab_size, (), generator=generator, device=device))
        input_ids = torch.full((n,), token, device=device)
    else:
        raise ValueError(f"ids must be one of {ID_DISTRIBUTIONS}, got {ids!r}")
    input_ids = input_ids.reshape(shape.batch, shape.seq_len)
    position_ids = None
    if shape.random_positions:
        position_ids = torch.randint(0, shape.context_length, (shape.batch, shape.seq_len),
                                     generator=generator, device=device)

    def normal(*size):
        return torch.randn(*size, generator=generator, device=device).to(dtype)
    # Parameters, so that a module can hold these very tables (the "fused" rows call the module).
    token_weight = torch.nn.Parameter(normal(shape.vocab_size, shape.dim))
    position_weight = torch.nn.Parameter(normal(shape.context_length, shape.dim))
    grad_out = normal(shape.batch, shape.seq_len, shape.dim)
    return input_ids, position_ids, token_weight, position_weight, grad_out


def _eager(input_ids, token_weight, position_weight, position_ids):
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return F.embedding(input_ids, token_weight) + F.embedding(position_ids, position_weight)


def _eager_dropout(input_ids, token_weight, position_weight, position_ids):
    return F.dropout(_eager(input_ids, token_weight, position_weight, position_ids), DROPOUT_P, training=True)


def _hf_positions(input_ids, position_ids):
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)[None]
    return position_ids


def _hf_eager(input_ids, token_weight, position_weight, position_ids):
    position_ids = _hf_positions(input_ids, position_ids)
    hidden = F.embedding(input_ids, token_weight) + F.embedding(position_ids, position_weight)
    return F.dropout(hidden, DROPOUT_P, training=True)


def _hf_swapped(input_ids, token_weight, position_weight, position_ids):
    placeholder = token_weight.new_zeros(()).expand(*input_ids.shape, token_weight.shape[1])
    fused = fused_input_embedding(input_ids, token_weight, position_weight,
                                  position_ids=_hf_positions(input_ids, position_ids), check_ids=False,
                                  backend="triton")
    return F.dropout(placeholder + fused, DROPOUT_P, training=True)


class EncoderInputs:
    """What the encoder op takes beyond the GPT op's inputs (token types, LayerNorm), made once
    per shape; the callables below read it, so that they keep the GPT rows' signature."""

    def __init__(self, shape: Shape, dtype, device, seed: int = 1):
        generator = torch.Generator(device=device).manual_seed(seed)
        self.token_type_weight = torch.nn.Parameter(
            torch.randn(shape.type_vocab_size, shape.dim, generator=generator, device=device).to(dtype))
        self.layer_norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(shape.dim, generator=generator,
                                                                          device=device).to(dtype))
        self.layer_norm_bias = torch.nn.Parameter(0.1 * torch.randn(shape.dim, generator=generator,
                                                                    device=device).to(dtype))
        self.token_type_ids = torch.randint(0, shape.type_vocab_size, (shape.batch, shape.seq_len),
                                            generator=generator, device=device)

    def parameters(self):
        return (self.token_type_weight, self.layer_norm_weight, self.layer_norm_bias)


def encoder_implementations(extra: EncoderInputs, compiled: Optional[Callable] = None) -> Dict[str, Callable]:
    """The bert-base rows: the fused encoder op beside Hugging Face's BertEmbeddings arithmetic in
    eager PyTorch (three gathers, two adds, a LayerNorm) and its torch.compile; all with dropout
    off (eval), as forward callables of the GPT rows' signature."""
    from .encoder import fused_encoder_embedding

    def fused(ids, word, position, position_ids):
        return fused_encoder_embedding(ids, word, position, extra.token_type_weight, extra.token_type_ids,
                                       layer_norm_weight=extra.layer_norm_weight,
                                       layer_norm_bias=extra.layer_norm_bias, backend="triton")

    def eager(ids, word, position, position_ids):
        return _encoder_eager(ids, word, position, extra.token_type_weight, extra.token_type_ids,
                              extra.layer_norm_weight, extra.layer_norm_bias)

    impls = {"fused": fused, "eager": eager}
    if compiled is not None:
        impls["compile"] = lambda ids, word, position, position_ids: compiled(
            ids, word, position, extra.token_type_weight, extra.token_type_ids, extra.layer_norm_weight,
            extra.layer_norm_bias)
    return impls


def _encoder_eager(ids, word, position, token_type, token_type_ids, ln_weight, ln_bias):
    positions = torch.arange(ids.shape[-1], device=ids.device)[None]
    embeddings = F.embedding(ids, word) + F.embedding(token_type_ids, token_type)
    embeddings = embeddings + F.embedding(positions, position)
    return F.layer_norm(embeddings, (word.shape[1],), ln_weight, ln_bias, 1e-12)


ENCODER_IMPLS = ("fused", "eager", "compile", "floor")

_modules = {}


def _module_for(token_weight, position_weight):
    """A FusedInputEmbedding whose tables are exactly these Parameters (kept per pair of tables)."""
    from .module import FusedInputEmbedding

    key = (id(token_weight), id(position_weight))
    module = _modules.get(key)
    if module is None or module.tok_emb.weight is not token_weight:
        module = FusedInputEmbedding(1, 1, token_weight.shape[1], device="meta")
        module.tok_emb.weight, module.pos_emb.weight = token_weight, position_weight
        module.tok_emb.num_embeddings, module.pos_emb.num_embeddings = token_weight.shape[0], position_weight.shape[0]
        _modules.clear()
        _modules[key] = module
    return module


def implementations(compiled: Optional[Callable] = None,
                    compiled_dropout: Optional[Callable] = None) -> Dict[str, Callable]:
    """Forward callables (input_ids, token_weight, position_weight, position_ids) -> output."""
    def fused(ids, tok, pos, pids):
        return _module_for(tok, pos)(ids, position_ids=pids)

    def fused_unchecked(ids, tok, pos, pids):
        return fused_input_embedding(ids, tok, pos, position_ids=pids, check_ids=False, backend="triton")

    def fused_sync(ids, tok, pos, pids):
        return fused_input_embedding(ids, tok, pos, position_ids=pids, check_ids="sync", backend="triton")

    def fused_dropout(ids, tok, pos, pids):
        return fused_input_embedding(ids, tok, pos, position_ids=pids, dropout_p=DROPOUT_P, backend="triton")

    impls = {"fused": fused, "fused-unchecked": fused_unchecked, "fused-sync": fused_sync, "eager": _eager,
             "fused+dropout": fused_dropout, "eager+dropout": _eager_dropout,
             "hf-eager": _hf_eager, "hf-swapped": _hf_swapped}
    if compiled is not None:
        impls["compile"] = compiled
    if compiled_dropout is not None:
        impls["compile+dropout"] = compiled_dropout
    return impls


def _step(forward, inputs, mode, also_clear=()):
    input_ids, position_ids, token_weight, position_weight, grad_out = inputs
    if mode == "fwd":
        def run():
            with torch.no_grad():
                forward(input_ids, token_weight, position_weight, position_ids)
    else:
        def run():
            token_weight.grad = None
            position_weight.grad = None
            for parameter in also_clear:
                parameter.grad = None
            forward(input_ids, token_weight, position_weight, position_ids).backward(grad_out)
    return run


def _floor_step(shape: Shape, dtype, device, mode):
    n = shape.batch * shape.seq_len * shape.dim
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    if mode == "fwd":
        return lambda: dst.copy_(src)
    grad_tables = torch.empty((shape.vocab_size + shape.context_length + shape.type_vocab_size) * shape.dim,
                              device=device, dtype=dtype)
    upstream = torch.randn(n, device=device).to(dtype)

    def run():
        dst.copy_(src)
        grad_tables.zero_()
        upstream.max()  # one read of B*T*D (a reduction reads at copy speed)
    return run


def _quartiles_ms_cuda(fn):
    """(first quartile, median, third quartile) ms of do_bench's repetitions."""
    import triton.testing
    return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.25, 0.5, 0.75]))


def _median_ms_cuda(fn) -> float:
    return _quartiles_ms_cuda(fn)[1]


def _peak_extra_mb(fn, device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _measure(forward, inputs, mode, timer, device, on_cuda, also_clear=()) -> dict:
    """One row's measured fields (ms, peak_extra_mb, extra), after an untimed first call."""
    step = _step(forward, inputs, mode, also_clear)
    started = time.perf_counter()
    step()  # first call: compilation / autotuning
    if on_cuda:
        torch.cuda.synchronize(device)
    first_call_s = time.perf_counter() - started
    timed = timer(step)
    q1, ms, q3 = timed if isinstance(timed, tuple) else (None, timed, None)
    peak = _peak_extra_mb(step, device) if on_cuda else None
    return dict(ms=ms, ms_q1=q1, ms_q3=q3, peak_extra_mb=peak, extra={"first_call_s": first_call_s})


def run_cuda(shapes: List[Shape], dtypes: List[str], modes: List[str], impls: List[str], ids: List[str],
             progress: Callable[[str], None] = print, device=None, timer: Callable = None,
             on_group: Optional[Callable[[List[Row]], None]] = None,
             failures: Optional[List[str]] = None) -> List[Row]:
    """Measure on a GPU. device and timer exist so that tests can drive this on CPU tensors
    (kernels interpreted, host-clock timer, no memory statistics). on_group is called with all rows
    so far after each shape and dtype, so that a run cut short still leaves its results. With a
    failures list, a row that raises is reported there (and through progress) and the run goes on
    with the next row; without one, the error propagates."""
    device = torch.device("cuda") if device is None else torch.device(device)
    timer = _quartiles_ms_cuda if timer is None else timer
    on_cuda = device.type == "cuda"
    rows: List[Row] = []
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            # A fresh compile cache per shape and dtype: no recompile limit, no stale graphs.
            torch._dynamo.reset()
            extra = None
            if shape.type_vocab_size:  # the encoder op's shape: its own rows
                extra = EncoderInputs(shape, dtype, device)
                compiled = torch.compile(_encoder_eager, fullgraph=True, dynamic=False) if "compile" in impls \
                    else None
                forwards = encoder_implementations(extra, compiled)
            else:
                compiled = torch.compile(_eager, fullgraph=True, dynamic=False) if "compile" in impls else None
                compiled_dropout = torch.compile(_eager_dropout, fullgraph=True, dynamic=False) \
                    if "compile+dropout" in impls else None
                forwards = implementations(compiled, compiled_dropout)
            for mode in modes:
                timed = timer(_floor_step(shape, dtype, device, mode))
                floor_q1, floor_ms, floor_q3 = timed if isinstance(timed, tuple) else (None, timed, None)
                moved = bytes_moved(shape, torch.tensor([], dtype=dtype).element_size(), mode)
                if "floor" in impls:
                    rows.append(Row(shape.name, dtype_name, mode, "floor", "-", floor_ms, floor_ms, moved,
                                    ms_q1=floor_q1, ms_q3=floor_q3))
                for id_kind in ids:
                    inputs = make_inputs(shape, dtype, device, id_kind)
                    for impl in impls:
                        if impl == "floor" or (id_kind != "uniform" and impl not in ("fused", "eager",
                                                                                      "fused+dropout")):
                            continue
                        if impl not in forwards:  # (a row the shape has none of: the encoder's are fewer)
                            continue
                        progress(f"{shape.name} {dtype_name} {mode} {impl} {id_kind}")
                        try:
                            measured = _measure(forwards[impl], inputs, mode, timer, device, on_cuda,
                                                () if extra is None else extra.parameters())
                        except Exception as error:  # noqa: BLE001  (reported, and the run goes on)
                            if failures is None:
                                raise
                            first_line = (str(error).splitlines() or [""])[0]
                            message = f"{shape.name} {dtype_name} {mode} {impl} {id_kind}: " \
                                      f"{type(error).__name__}: {first_line}"
                            failures.append(message)
                            continue
                        rows.append(Row(shape.name, dtype_name, mode, impl, id_kind, floor_ms=floor_ms,
                                        bytes_moved=moved, **measured))
                    del inputs
                if on_cuda:
                    torch.cuda.empty_cache()
            if on_group is not None:
                on_group(rows)
    return rows


#: What runs on a CPU: the module as users call it (its plain-PyTorch path there), and the two
#: nn.Embedding modules summed that it replaces (positions from torch.arange, as GPT-2 code does).
CPU_IMPLS = ("fused", "nn.Embedding x2")
#: Every CPU row's implementation name (the encoder shape's comparator too).
ALL_CPU_IMPLS = CPU_IMPLS + ("BertEmbeddings eager",)


class TwoEmbeddings(torch.nn.Module):
    def __init__(self, tok_emb, pos_emb):
        super().__init__()
        self.tok_emb, self.pos_emb = tok_emb, pos_emb

    def forward(self, input_ids, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return self.tok_emb(input_ids) + self.pos_emb(position_ids)


class EagerBertEmbeddings(torch.nn.Module):
    """Hugging Face BertEmbeddings' arithmetic (dropout off) on a FusedEncoderEmbedding's own modules."""

    def __init__(self, fused):
        super().__init__()
        self.fused = fused

    def forward(self, input_ids, position_ids=None, token_type_ids=None):
        fused = self.fused
        return _encoder_eager(input_ids, fused.word_embeddings.weight, fused.position_embeddings.weight,
                              fused.token_type_embeddings.weight, token_type_ids, fused.LayerNorm.weight,
                              fused.LayerNorm.bias)


#: The CPU comparator of each kind of shape.
CPU_COMPARATOR = {False: "nn.Embedding x2", True: "BertEmbeddings eager"}


def _cpu_steps(shape: Shape, dtype: torch.dtype, mode: str) -> Dict[str, Callable[[], None]]:
    from .module import FusedEncoderEmbedding, FusedInputEmbedding

    input_ids, position_ids, token_weight, position_weight, grad_out = make_inputs(shape, dtype, "cpu")
    if shape.type_vocab_size:
        fused = FusedEncoderEmbedding(shape.vocab_size, shape.context_length, shape.dim,
                                      type_vocab_size=shape.type_vocab_size, dtype=dtype)
        fused.word_embeddings.weight, fused.position_embeddings.weight = token_weight, position_weight
        types = torch.randint(0, shape.type_vocab_size, input_ids.shape)
        eager = EagerBertEmbeddings(fused)
        modules = {"fused": lambda ids, pids: fused(ids, token_type_ids=types),
                   CPU_COMPARATOR[True]: lambda ids, pids: eager(ids, token_type_ids=types)}
        parameters = list(fused.parameters())
    else:
        fused = FusedInputEmbedding.from_pretrained(token_weight.detach(), position_weight.detach(), freeze=False)
        modules = {"fused": fused, CPU_COMPARATOR[False]: TwoEmbeddings(fused.tok_emb, fused.pos_emb)}  # one set
        parameters = list(fused.parameters())

    def step(module):
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    module(input_ids, position_ids)
        else:
            def run():
                for parameter in parameters:
                    parameter.grad = None
                module(input_ids, position_ids).backward(grad_out)
        return run
    return {name: step(module) for name, module in modules.items()}


def alternated_samples(steps: Dict[str, Callable[[], None]], samples: int, sample_s: float,
                       now: Callable[[], float] = time.perf_counter, min_calls: int = 1) -> Dict[str, List[float]]:
    """Per-call ms, ``samples`` per step, taken in alternation so that every step sees the same
    state of the machine; each sample is the mean over enough back-to-back calls to last
    ``sample_s`` (at least ``min_calls``). ``now`` reads the clock: on a GPU, one that synchronises
    first, so that a sample ends when its last call's work has."""
    calls = {}
    for name, step in steps.items():
        # Warm-up: allocator, caches, the first calls' checks; then size a sample (the loop reads the
        # plain clock: ``now`` may synchronise, which would serialise the calls being counted).
        started, n = now(), 0
        while n < 3 or time.perf_counter() - started < sample_s:
            step()
            n += 1
        calls[name] = max(min_calls, int(n * sample_s / max(now() - started, 1e-9)))
    times = {name: [] for name in steps}
    for _ in range(samples):
        for name, step in steps.items():
            started = now()
            for _ in range(calls[name]):
                step()
            times[name].append((now() - started) / calls[name] * 1e3)
    return times


def quartiles(values: List[float]):
    """(q1, median, q3); with fewer than four values (min, median, max)."""
    ordered = sorted(values)
    if len(ordered) < 4:
        return ordered[0], statistics.median(ordered), ordered[-1]
    q1, median, q3 = statistics.quantiles(ordered, n=4)
    return q1, median, q3


def cuda_graph_of(step: Callable[[], None]) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of one call of step, warmed up on a side stream first (PyTorch's recipe; the
    id check's graph flag is made by the first eager call, as a capture cannot allocate it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def run_cpu(shapes: List[Shape], dtypes: List[str], modes: List[str], samples: int = 15, sample_s: float = 0.05,
            progress: Callable[[str], None] = print) -> List[Row]:
    """What runs on a CPU: FusedInputEmbedding (plain PyTorch there) beside two nn.Embedding modules
    summed, on the same tables. No kernel, no floor and no torch.compile here."""
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for mode in modes:
                progress(f"{shape.name} {dtype_name} {mode}")
                times = alternated_samples(_cpu_steps(shape, dtype, mode), samples, sample_s)
                moved = bytes_moved(shape, torch.tensor([], dtype=dtype).element_size(), mode)
                for impl in times:
                    q1, ms, q3 = quartiles(times[impl])
                    rows.append(Row(shape.name, dtype_name, mode, impl, "uniform", ms, float("nan"), moved,
                                    ms_q1=q1, ms_q3=q3, extra={"samples": len(times[impl])}))
    return rows


def _spread(row: Row) -> str:
    return "-" if row.ms_q1 is None else f"{row.ms_q1:.4f}-{row.ms_q3:.4f}"


def format_cpu_table(rows: List[Row]) -> str:
    """One markdown table per shape and dtype for CPU rows: median, quartiles, ratio to nn.Embedding x2."""
    out = []
    for shape_name, dtype_name in dict.fromkeys((row.shape, row.dtype) for row in rows):
        shape = SHAPES.get(shape_name)
        title = f"{shape_name} ({shape.describe()}), {dtype_name}" if shape else f"{shape_name}, {dtype_name}"
        group = [r for r in rows if (r.shape, r.dtype) == (shape_name, dtype_name)]
        comparator = CPU_COMPARATOR[any(r.impl == CPU_COMPARATOR[True] for r in group)]
        out += [f"\n#### {title}, CPU\n", f"| mode | impl | median ms | quartiles ms | x {comparator} |",
                "| --- | --- | ---: | ---: | ---: |"]
        for row in group:
            baseline = next(r.ms for r in group if r.mode == row.mode and r.impl == comparator)
            out.append(f"| {row.mode} | {row.impl} | {row.ms:.4f} | {_spread(row)} | {row.ms / baseline:.2f} |")
    return "\n".join(out)


def format_table(rows: List[Row]) -> str:
    """One markdown table per shape and dtype: ms, GB/s, x floor, speedup vs eager and compile."""
    out = []
    keys = []
    for row in rows:
        if (row.shape, row.dtype) not in keys:
            keys.append((row.shape, row.dtype))
    for shape_name, dtype_name in keys:
        shape = SHAPES.get(shape_name)
        title = f"{shape_name} ({shape.describe()}), {dtype_name}" if shape else f"{shape_name}, {dtype_name}"
        out.append(f"\n#### {title}\n")
        out.append("| mode | impl | ids | median ms | quartiles ms | GB/s | x floor | vs eager | vs compile "
                   "| peak extra MiB |")
        out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        group = [r for r in rows if (r.shape, r.dtype) == (shape_name, dtype_name)]
        for row in group:
            def baseline(impl):
                for other in group:
                    if other.mode == row.mode and other.impl == impl and other.ids == row.ids:
                        return other.ms
                return None
            eager_name, compile_name = BASELINES.get(row.impl, ("eager", "compile"))
            eager = baseline(eager_name)
            compiled = baseline(compile_name) if compile_name else None
            vs_eager = f"{eager / row.ms:.2f}x" if eager else "-"
            vs_compile = f"{compiled / row.ms:.2f}x" if compiled else "-"
            x_floor = "-" if row.floor_ms != row.floor_ms else f"{row.x_floor:.2f}"
            peak = "-" if row.peak_extra_mb is None else f"{row.peak_extra_mb:.1f}"
            out.append(f"| {row.mode} | {row.impl} | {row.ids} | {row.ms:.4f} | {_spread(row)} | {row.gbps:.0f} | "
                       f"{x_floor} | {vs_eager} | {vs_compile} | {peak} |")
    return "\n".join(out)


def save_json(rows: List[Row], path: str, env: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"environment": env,
                   "rows": [dict(asdict(r), gbps=r.gbps, x_floor=r.x_floor) for r in rows]}, handle, indent=2)


def save_plot(rows: List[Row], path: str, env: dict) -> None:
    """Achieved bandwidth per shape and implementation, with the floor's bandwidth as the target."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'tokemb-fast[bench]'") from exc
    panels = [(mode, dtype) for mode in MODES for dtype in DTYPES if any(r.mode == mode and r.dtype == dtype
                                                                         for r in rows)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for ax, (mode, dtype) in zip(axes[:, 0], panels):
        sel = [r for r in rows if r.mode == mode and r.dtype == dtype and r.ids in ("uniform", "-")]
        shapes = list(dict.fromkeys(r.shape for r in sel))
        # (CPU rows share "fused" with the GPU's names: each impl once, in the tables' order.)
        impls = [i for i in dict.fromkeys(IMPLS + DROPOUT_IMPLS + HF_IMPLS + ALL_CPU_IMPLS)
                 if any(r.impl == i for r in sel)]
        width = 0.8 / max(len(impls), 1)
        on_cpu = all(r.impl in ALL_CPU_IMPLS for r in sel)  # bandwidth means nothing for the CPU fallback
        for k, impl in enumerate(impls):
            values = [next(((r.ms if on_cpu else r.gbps) for r in sel if r.shape == s and r.impl == impl), 0.0)
                      for s in shapes]
            ax.bar([i + k * width for i in range(len(shapes))], values, width, label=impl)
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(shapes))])
        ax.set_xticklabels(shapes)
        if on_cpu:
            ax.set_ylabel("median ms per call")
            ax.set_title(f"{mode}, {dtype}, CPU: lower is better")
        else:
            ax.set_ylabel("GB/s (minimal bytes / time)")
            ax.set_title(f"{mode}, {dtype}: higher is better; 'floor' = device copy of the same bytes")
        ax.legend(fontsize=8, ncol=len(impls))
    fig.suptitle(f"tokemb-fast on {env.get('device')} (torch {env.get('torch')}, triton {env.get('triton')}, "
                 f"{env.get('date')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

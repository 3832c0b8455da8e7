"""Launchers for the Triton kernels: registered as PyTorch custom ops, and callable directly.

Each launcher serves two kinds of caller with the same kernel arguments, grids and constexprs:

* ``torch.compile``, FakeTensor tracing and anything else that dispatches: the launcher is the
  body of a ``torch.library.triton_op``, and each launch goes through ``wrap_triton``, so Dynamo
  sees into it (no graph break) and Inductor sees the kernels.
* Eager calls: ``op.direct`` (plain eager callers, without the op's dispatch; tokemb_fast.autograd
  decides once per call) and the op's own eager body run the *planned* launcher, which keeps per
  key the launch layout (grids, constexprs, buffer shapes: ``_forward_layout``, ``_grad_layout``)
  and the binaries Triton chose (``tokemb_fast.launch``), so that a repeated call costs a dict
  lookup and a few microseconds per launch instead of Triton's 20-50.

Keys hold what determines the layout and Triton's specialisation: shapes, strides, dtypes,
pointer alignment, options, and past_length by its class. Arguments arrive checked by
``tokemb_fast.validation``; these functions only shape the launch.

Importing this module imports Triton and the kernels. ``TRITON_INTERPRET=1`` must be set before
that import for the kernels to run on CPU tensors (Triton decides at decoration time).
"""
import os
import threading
from typing import NamedTuple, Optional

import torch
import torch._decomp
import triton
from torch.library import custom_op, triton_op, wrap_triton
from triton.runtime.driver import driver

from .kernels import (apply_dropout_mask_kernel, embedding_grad_rows_kernel, embedding_grad_scatter_kernel,
                      input_embedding_fwd_kernel, segment_bounds_and_chunks_kernel, sort_keys_kernel)
from . import id_check, launch
from .id_check import _local as _id_local
from .launch import CachedKernel, PlanCache, aligned, current_stream, hooks_installed, int_class

#: True when the kernels were compiled for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Whether wrap_triton traces (inside torch.compile / FakeTensor tracing of a triton_op body) or
# launches straight away (triton_op's own eager body turns it off).
try:  # private (torch 2.11 to 2.13 have it)
    from torch._library.triton import is_wrap_triton_enabled
except ImportError:  # pragma: no cover
    def is_wrap_triton_enabled() -> bool:
        return True


def _tracing() -> bool:
    # The interpreter's ops are opaque custom ops whose bodies only ever see real tensors.
    return not INTERPRETED and is_wrap_triton_enabled()


def _define_op(name: str, planned, mutates_args=()):
    """Register the decorated launcher as the op ``name``; ``op.direct`` is ``planned``, the
    launcher's eager form (which the op's body also runs when not tracing)."""
    def define(launcher):
        op = (custom_op if INTERPRETED else triton_op)(name, mutates_args=mutates_args)(launcher)
        op.direct = planned
        return op
    return define


# Sorted entries are summed in pieces of CHUNK so that one frequent key cannot serialise the
# backward (see kernels/backward.py). 32 keeps a piece's tile (32 x BLOCK_D fp32) in registers.
GRAD_CHUNK = 32
# Segments up to this many entries are summed for a whole tile of rows at once (one entry per
# step); longer ones row by row, GRAD_LONG_TILE entries (or chunk partials) per load.
GRAD_SHORT = 4
GRAD_LONG_TILE = 16
# Gradient-table elements per program of the row kernel. ptxas figures for sm_90a
# (bench/compile_report.py): with 4096 and 32-entry long-path loads the kernel used 240-255
# registers and spilled in its dropout and unaligned-D variants; 2048 and 16 give 124-168
# registers at gpt2-124M and no spills in any variant.
GRAD_TILE = 2048
# At most this many table rows per program. Triton 3.6 (PyTorch 2.11's) failed to compile the row
# kernel for sm_90 with 32 or 64 rows (small D: "'tt.load' op failed to verify that mask type
# matches ptr type" in its layout pass, seen on an H100 and reproduced with Triton 3.6's compiler
# on this machine, 2026-11-27); 16 compiles (swept D = 1..4096, four dtypes, four option sets).
# D >= 256 uses 8 rows anyway.
GRAD_MAX_ROWS = 16
# How a table's gradient is written when its keys are given (token ids; explicit positions):
#   "rows"    embedding_grad_rows_kernel writes every row once, zeros included (measured on an H100:
#             about 2x its own floor at gpt2-124M, its programs waiting on dependent loads);
#   "scatter" the table is zero-filled, then embedding_grad_scatter_kernel writes the rows that were
#             looked up (not yet measured on a GPU; the same bits as "rows").
# Default positions always take the row kernel (their rows are few and all touched). A setting for
# measuring both side by side (bench/acceptance.py): TOKEMB_FAST_GRAD_KERNEL, or grad_kernel().
GRAD_KERNELS = ("rows", "scatter")
# With "scatter" on a GPU, outside torch.compile: zero-fill on a side stream while the sort runs
# (_fill_beside). TOKEMB_FAST_GRAD_FILL_BESIDE=0 keeps the fill on the current stream.
GRAD_FILL_BESIDE = os.environ.get("TOKEMB_FAST_GRAD_FILL_BESIDE", "1") != "0"
GRAD_KERNEL = os.environ.get("TOKEMB_FAST_GRAD_KERNEL", "rows")
if GRAD_KERNEL not in GRAD_KERNELS:
    raise ValueError(f"TOKEMB_FAST_GRAD_KERNEL must be one of {GRAD_KERNELS}, got {GRAD_KERNEL!r}")
# Elements of the output one forward program owns in the fixed config (the interpreter's, and
# small calls' on a GPU; larger calls are autotuned): enough 16-byte accesses per thread to keep
# memory busy, few enough for registers.
TILE = 4096
SEARCH_BLOCK = 1024
SORT_KEYS_BLOCK = 1024
# Every launch asks for no FMA contraction: a product and a sum round apart (the token scale's),
# as PyTorch and Triton's interpreter round them, so the tests' results are the GPU's. (Saying so
# also keeps Triton >= 3.9 from warning that its default will change.)
NO_FMA = {"enable_fp_fusion": False}


def _block_d(dim: int, cap: int) -> int:
    """Columns per program: the widest power of two (<= cap) that pads D by at most 1/16.

    D = 768 takes 256 (three full blocks) rather than 1024 (a quarter of the lanes idle);
    D = 1600 takes 128 (13 blocks, 4% padding) rather than 2048 (22%).
    """
    full = min(triton.next_power_of_2(max(dim, 1)), cap)
    best, best_padding = full, None
    block = full
    while block >= min(64, full):
        padding = triton.cdiv(dim, block) * block - dim
        if padding * 16 <= dim:
            return block
        if best_padding is None or padding < best_padding:
            best, best_padding = block, padding
        block //= 2
    return best


def _forward_configs():
    # Autotuned on a GPU, keyed on D (and, implicitly, the dtypes): the tile size and warps.
    # At most 32 elements per thread: 8192 elements on 4 warps (64 per thread) took 220 registers
    # with dropout and spilled for fp64 tables (bench/compile_report.py).
    return [triton.Config({"TILE": tile}, num_warps=warps) for tile in (2048, 4096, 8192) for warps in (4, 8)
            if tile // (32 * warps) <= 32]


# Below this many output elements the forward is launch-bound (a few microseconds on an H100):
# the tile choice cannot matter there, while autotuning would cost every new (D, dtype) five
# compiles and five timed runs on its first call (the decode shape, and every small test shape).
# Such calls, and all calls under the interpreter, take the fixed config.
AUTOTUNE_MIN_ELEMENTS = 1 << 20
_FIXED_FORWARD_CONFIG = {"TILE": TILE, "num_warps": 4}
_autotuned_forward = None if INTERPRETED else \
    triton.autotune(configs=_forward_configs(), key=["dim"])(input_embedding_fwd_kernel)

_FORWARD = CachedKernel(input_embedding_fwd_kernel)
_AUTOTUNED_FORWARD = None if _autotuned_forward is None else CachedKernel(_autotuned_forward)
_SORT_KEYS = CachedKernel(sort_keys_kernel)
_SEGMENTS = CachedKernel(segment_bounds_and_chunks_kernel)
_GRAD_ROWS = CachedKernel(embedding_grad_rows_kernel)
_GRAD_SCATTER = CachedKernel(embedding_grad_scatter_kernel)
_DROPOUT_MASK = CachedKernel(apply_dropout_mask_kernel)


# The backward's device sort (bench/host_overhead.py stands in for it: on a CPU it computes).
_sort = torch.sort


def _forward_launch(n_elements: int):
    """(kernel, meta-parameters the launch passes) for a forward of n_elements outputs."""
    if _autotuned_forward is None or n_elements < AUTOTUNE_MIN_ELEMENTS:
        return _FORWARD, _FIXED_FORWARD_CONFIG
    return _AUTOTUNED_FORWARD, {}


def _traced_launch(kernel: CachedKernel, grid, args, constexprs) -> None:
    wrap_triton(kernel.kernel)[grid](*args, **constexprs)


def _dropout_threshold(dropout_p, dropout_seed) -> int:
    # An element is kept when its 32 random bits are >= floor(p * 2^32).
    return 0 if dropout_seed is None else int(dropout_p * 2**32)


def _dropout_args(dropout_p, dropout_seed, dropout_scale, placeholder):
    """(seed, scale, threshold) kernel arguments. Without dropout the kernels never read them;
    any pointer will do."""
    if dropout_seed is None:
        return placeholder, placeholder, 0
    return dropout_seed, dropout_scale, _dropout_threshold(dropout_p, dropout_seed)


def _aligned4(dim: int, block_d: int) -> bool:
    # Four adjacent columns share one Philox evaluation when groups of 4 never straddle rows or blocks.
    return dim % 4 == 0 and block_d % 4 == 0


def _batch_stride(tensor: torch.Tensor) -> int:
    # A [1, T] view broadcast over the batch reads row 0 for every b.
    return 0 if tensor.shape[0] == 1 else tensor.stride(0)


# --- forward ------------------------------------------------------------------------------------

class _Layout(NamedTuple):
    kernel: CachedKernel
    grid: object       # a tuple, or for the autotuned forward a callable of the meta-parameters
    constexprs: dict


def _forward_layout(n_rows, dim, dtype, has_position_ids, has_dropout, check, has_token_scale, token_shard,
                    add_positions) -> _Layout:
    block_d = _block_d(dim, 1024)
    kernel, fixed_config = _forward_launch(n_rows * dim)

    def grid(meta):
        return (triton.cdiv(n_rows, max(1, meta["TILE"] // block_d)), triton.cdiv(dim, block_d))

    return _Layout(kernel, grid(fixed_config) if fixed_config else grid, dict(
        HAS_POSITION_IDS=has_position_ids, HAS_DROPOUT=has_dropout, CHECK_IDS=check, HAS_TOKEN_SCALE=has_token_scale,
        TOKEN_SHARD=token_shard, ADD_POSITIONS=add_positions, ALIGNED4=_aligned4(dim, block_d), ACC_FP64=dtype == torch.float64, BLOCK_D=block_d, **fixed_config,
        **NO_FMA))


def _forward_static(input_ids, token_weight, position_weight, position_ids, past_length, token_row_offset,
                    vocab_size):
    """The forward's integer arguments, grouped as ``_forward_args`` places them between the
    tensors: all fixed by the shapes, strides and past_length."""
    pos_ids = input_ids if position_ids is None else position_ids
    batch, seq_len = input_ids.shape
    return ((_batch_stride(input_ids), input_ids.stride(1)), (_batch_stride(pos_ids), pos_ids.stride(1)),
            token_weight.stride(0), position_weight.stride(0),
            (batch * seq_len, seq_len, token_weight.shape[1], token_weight.shape[0] if vocab_size < 0 else vocab_size,
             position_weight.shape[0], past_length, token_row_offset, token_weight.shape[0]))


def _forward_args(out, input_ids, token_weight, position_weight, position_ids, past_length, dropout_p, dropout_seed,
                  dropout_scale, id_flag, token_scale, token_row_offset, vocab_size):
    """The forward kernel's non-constexpr arguments in signature order (ForwardCall passes the
    same, spelled out; tests/compare_planned_launches.py compares the two). The kernel never reads
    position_ids when there are none, nor the seed, scale or flag when off: any pointer will do
    (the ids': their dtype and alignment are in every key already)."""
    ids_strides, position_strides, token_stride, position_stride, ints = _forward_static(
        input_ids, token_weight, position_weight, position_ids, past_length, token_row_offset, vocab_size)
    return (out, input_ids, *ids_strides, input_ids if position_ids is None else position_ids, *position_strides,
            token_weight, token_stride, position_weight, position_stride, *ints,
            *_dropout_args(dropout_p, dropout_seed, dropout_scale, input_ids),
            input_ids if id_flag is None else id_flag, input_ids if token_scale is None else token_scale)


_forward_plans = PlanCache()


def _forward_planned(input_ids, token_weight, position_weight, position_ids, past_length, dropout_p, dropout_seed,
                     dropout_scale, id_flag, token_scale, token_row_offset=0, vocab_size=-1, add_positions=True):
    batch, seq_len = input_ids.shape
    dim = token_weight.shape[1]
    out = torch.empty((batch, seq_len, dim), dtype=token_weight.dtype, device=token_weight.device)
    if batch * seq_len == 0 or dim == 0:
        return out
    args = _forward_args(out, input_ids, token_weight, position_weight, position_ids, past_length, dropout_p,
                         dropout_seed, dropout_scale, id_flag, token_scale, token_row_offset, vocab_size)
    device, stream = current_stream()
    plan = _forward_plans.get(_forward_key(device, input_ids, token_weight, position_weight, position_ids, past_length,
                                           dropout_p, dropout_seed, id_flag, token_scale, token_row_offset, vocab_size,
                                           add_positions))
    if plan is not None and not hooks_installed():
        plan(stream, args)
        return out
    layout = _forward_layout(batch * seq_len, dim, token_weight.dtype, position_ids is not None,
                             dropout_seed is not None, id_flag is not None, token_scale is not None, vocab_size >= 0,
                             add_positions)
    plan = layout.kernel.launch(layout.grid, args, layout.constexprs)
    if plan is not None:
        _forward_plans.add(_forward_key(device, input_ids, token_weight, position_weight, position_ids, past_length,
                                        dropout_p, dropout_seed, id_flag, token_scale, token_row_offset, vocab_size,
                                        add_positions), plan)
    return out


class ForwardCall:
    """The planned forward of one call layout with nothing left to decide but the tensors: made
    by ``forward_call`` for a caller whose own cache key fixes everything ``_forward_key`` holds
    except the current device (the caller compares ``device_index`` with ``get_device()``), so
    a call is an allocation, a launch, and the id check's bookkeeping (``check``: whether ids
    are checked, in the flag of the calling thread's ``tokemb_fast.id_check`` guard for the
    device and stream: looked up per call, as a plan serves every thread)."""

    __slots__ = ("run", "function", "packed_metadata", "grid", "constexpr_values", "name", "out_shape", "static",
                 "dropout_scale", "dropout_threshold", "token_scale", "check", "device", "device_index",
                 "get_device", "get_stream")

    def __call__(self, stream, input_ids, token_weight, position_weight, position_ids, dropout_seed,
                 wait_at_next_call):
        """(output, the id check's record or None), as autograd.run_forward returns them."""
        guard = None
        if self.check:
            # id_check.guard's common case inlined (this thread's one guard for the device, nothing
            # pending): 0.2 us of a 25 us call.
            guards = getattr(_id_local, "guards", None)
            guard = None if guards is None else guards.get((self.device, stream))
            if guard is None or len(guards) > 1:
                guard = id_check.guard(self.device, stream)
            elif guard.pending:
                guard.before_launch()
        out = token_weight.new_empty(self.out_shape)  # (0.3 us less than torch.empty with dtype and device)
        grid_x, grid_y, grid_z = self.grid
        ids_strides, position_strides, token_stride, position_stride, ints = self.static
        if guard is not None:
            guard.lock.acquire()  # (until the launch is recorded: see _Guard.after_launch)
        try:
            # KernelPlan.__call__'s launch of _forward_args's arguments, without their two frames (a
            # test compares these with Triton's own launch's: tests/compare_planned_launches.py).
            self.run(grid_x, grid_y, grid_z, stream, self.function, self.packed_metadata, None, None, None,
                     out, input_ids, *ids_strides, input_ids if position_ids is None else position_ids,
                     *position_strides, token_weight, token_stride, position_weight, position_stride, *ints,
                     input_ids if dropout_seed is None else dropout_seed,
                     input_ids if dropout_seed is None else self.dropout_scale, self.dropout_threshold,
                     input_ids if guard is None else guard.flag,
                     input_ids if self.token_scale is None else self.token_scale, *self.constexpr_values)
            record = None if guard is None else guard.after_launch(wait_at_next_call)
        finally:
            if guard is not None:
                guard.lock.release()
        if launch.PATHS is not None:
            launch.PATHS.append((self.name, "call"))
        return out, record


def forward_call(input_ids, token_weight, position_weight, position_ids, past_length, dropout_p, dropout_seed,
                 dropout_scale, check, token_scale) -> Optional[ForwardCall]:
    """The ForwardCall of a forward that ``_forward_planned`` has just launched with these
    arguments ([B, T] ids, position ids None or [B, T]) and, when ``check``, an id flag; or None
    where it made no plan (the interpreter, an empty call, a profiler's hook)."""
    device, _stream = current_stream()
    if device is None:
        return _InterpretedForwardCall(check, token_weight.device, past_length, dropout_p, dropout_scale,
                                       token_scale) if INTERPRETED else None
    # (Any flag will do for the key: only whether there is one matters, all are fresh allocations.)
    plan = _forward_plans.get(_forward_key(device, input_ids, token_weight, position_weight, position_ids, past_length,
                                           dropout_p, dropout_seed, True if check else None, token_scale, 0, -1,
                                           True))
    if plan is None:
        return None
    call = ForwardCall()
    call.run, call.function, call.packed_metadata = plan.run, plan.function, plan.packed_metadata
    call.grid, call.constexpr_values, call.name = plan.grid, plan.constexpr_values, plan.name
    call.out_shape = (*input_ids.shape, token_weight.shape[1])
    call.static = _forward_static(input_ids, token_weight, position_weight, position_ids, past_length, 0, -1)
    call.dropout_scale, call.dropout_threshold = dropout_scale, _dropout_threshold(dropout_p, dropout_seed)
    call.token_scale, call.check, call.device = token_scale, bool(check), token_weight.device
    active = driver.active
    call.device_index, call.get_device, call.get_stream = device, active.get_current_device, active.get_current_stream
    return call


class _InterpretedForwardCall:
    """ForwardCall's interface where there is no binary to plan (Triton's interpreter): each call
    launches through ``_forward_planned``, i.e. Triton's ordinary launch. So the interpreter tests
    run the planned path's Python (its keys, autograd node and id-check books) with the kernels'
    maths; on a GPU the same calls take ForwardCall."""

    device_index = None

    def __init__(self, check, device, past_length, dropout_p, dropout_scale, token_scale):
        self.check, self.device, self.past_length, self.dropout_p = check, device, past_length, dropout_p
        self.dropout_scale, self.token_scale = dropout_scale, token_scale

    @staticmethod
    def get_device():
        return None

    @staticmethod
    def get_stream(_device):
        return 0  # (no streams: any value but None)

    def __call__(self, stream, input_ids, token_weight, position_weight, position_ids, dropout_seed,
                 wait_at_next_call):
        guard = id_check.guard(self.device) if self.check else None
        arguments = (input_ids, token_weight, position_weight, position_ids, self.past_length, self.dropout_p,
                     dropout_seed, self.dropout_scale, None if guard is None else guard.flag, self.token_scale)
        if guard is None:
            return _forward_planned(*arguments), None
        return guard.launch(wait_at_next_call, _forward_planned, *arguments)


def _forward_key(device, input_ids, token_weight, position_weight, position_ids, past_length, dropout_p, dropout_seed,
                 id_flag, token_scale, token_row_offset, vocab_size, add_positions):
    # Everything Triton specialises on, given that the tables' columns have unit stride and
    # out, the seed, the scale and the flag are fresh (aligned) allocations.
    return (device, input_ids.shape, input_ids.stride(), input_ids.dtype, aligned(input_ids),
            None if position_ids is None else
            (position_ids.shape, position_ids.stride(), position_ids.dtype, aligned(position_ids)),
            token_weight.shape, token_weight.stride(0), token_weight.dtype, aligned(token_weight),
            position_weight.shape, position_weight.stride(0), aligned(position_weight),
            int_class(past_length), None if dropout_seed is None else dropout_p, id_flag is None, token_scale is None,
            None if vocab_size < 0 else (int_class(token_row_offset), int_class(vocab_size), add_positions))


@_define_op("tokemb_fast::input_embedding_forward", _forward_planned, mutates_args=("id_flag",))
def input_embedding_forward(
    input_ids: torch.Tensor,
    token_weight: torch.Tensor,
    position_weight: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    past_length: int,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    dropout_scale: Optional[torch.Tensor],
    id_flag: Optional[torch.Tensor],
    token_scale: Optional[torch.Tensor],
    token_row_offset: int = 0,
    vocab_size: int = -1,
    add_positions: bool = True,
) -> torch.Tensor:
    """[B, T] ids -> [B, T, D] = dropout(s * token_weight[ids] + position_weight[positions]).

    Dropout is on when dropout_seed (int64 [1]) is given: elements are zeroed with probability
    dropout_p and the rest multiplied by dropout_scale (fp64 [1], 1/(1-p)). With id_flag (int64
    [ID_FLAG_SIZE], see tokemb_fast.id_check), ids and positions outside their tables are
    recorded there; their output rows are NaN either way. s is token_scale (fp64 [1]), or 1 when
    None. The tables' columns must have unit stride.

    Tensor parallelism (vocab_size >= 0): token_weight holds rows token_row_offset ..
    token_row_offset + rows - 1 of a vocab_size vocabulary; ids are checked against vocab_size and
    other ids' token rows are zero. add_positions=False leaves the position rows out.
    """
    if not _tracing():
        return _forward_planned(input_ids, token_weight, position_weight, position_ids, past_length, dropout_p,
                                dropout_seed, dropout_scale, id_flag, token_scale, token_row_offset, vocab_size,
                                add_positions)
    return _traced_forward(input_ids, token_weight, position_weight, position_ids, past_length, dropout_p, dropout_seed,
                           dropout_scale, id_flag, token_scale, token_row_offset, vocab_size, add_positions)


def _traced_forward(input_ids, token_weight, position_weight, position_ids, past_length, dropout_p, dropout_seed,
                    dropout_scale, id_flag, token_scale, token_row_offset, vocab_size, add_positions):
    """The forward ops' body under torch.compile / FakeTensor tracing: launched through wrap_triton."""
    batch, seq_len = input_ids.shape
    dim = token_weight.shape[1]
    out = torch.empty((batch, seq_len, dim), dtype=token_weight.dtype, device=token_weight.device)
    if batch * seq_len == 0 or dim == 0:
        return out
    layout = _forward_layout(batch * seq_len, dim, token_weight.dtype, position_ids is not None,
                             dropout_seed is not None, id_flag is not None, token_scale is not None, vocab_size >= 0,
                             add_positions)
    _traced_launch(layout.kernel, layout.grid, _forward_args(out, input_ids, token_weight, position_weight,
                                                             position_ids, past_length, dropout_p, dropout_seed,
                                                             dropout_scale, id_flag, token_scale, token_row_offset,
                                                             vocab_size), layout.constexprs)
    return out


def _pure_forward_planned(input_ids, token_weight, position_weight, position_ids, past_length, dropout_p, dropout_seed,
                          dropout_scale, token_scale, token_row_offset=0, vocab_size=-1, add_positions=True):
    return _forward_planned(input_ids, token_weight, position_weight, position_ids, past_length, dropout_p,
                            dropout_seed, dropout_scale, None, token_scale, token_row_offset, vocab_size, add_positions)


@_define_op("tokemb_fast::input_embedding", _pure_forward_planned)
def input_embedding(
    input_ids: torch.Tensor,
    token_weight: torch.Tensor,
    position_weight: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    past_length: int,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    dropout_scale: Optional[torch.Tensor],
    token_scale: Optional[torch.Tensor],
    token_row_offset: int = 0,
    vocab_size: int = -1,
    add_positions: bool = True,
) -> torch.Tensor:
    """input_embedding_forward without an id flag: a pure function of its inputs (nothing mutated),
    which is what traced graphs get when no flag is written (check_ids=False, exported programs).
    Its decomposition (``decomposed_input_embedding``) stands in for it where a consumer of the
    graph does not know it (ONNX, ``ep.run_decompositions(tokemb_fast.export.decomposition_table())``)."""
    if not _tracing():
        return _pure_forward_planned(input_ids, token_weight, position_weight, position_ids, past_length, dropout_p,
                                     dropout_seed, dropout_scale, token_scale, token_row_offset, vocab_size,
                                     add_positions)
    return _traced_forward(input_ids, token_weight, position_weight, position_ids, past_length, dropout_p, dropout_seed,
                           dropout_scale, None, token_scale, token_row_offset, vocab_size, add_positions)


def decomposed_input_embedding(input_ids, token_weight, position_weight, position_ids, past_length, dropout_p,
                               dropout_seed, dropout_scale, token_scale, token_row_offset=0, vocab_size=-1,
                               add_positions=True):
    """``tokemb_fast::input_embedding`` in ATen ops: two embedding lookups and an add, summed in fp32
    (fp64 for fp64 tables) and rounded once as the kernel does. For consumers of exported graphs
    that do not know the op. Differences from the kernel: an id outside its table is the
    consumer's error (the lookup's), not a NaN row; dropout draws the consumer's own mask."""
    batch, seq_len = input_ids.shape
    accumulate = torch.float64 if token_weight.dtype == torch.float64 else torch.float32
    local_ids = input_ids if vocab_size < 0 else input_ids - token_row_offset
    if vocab_size >= 0:  # one rank's rows of a vocabulary split over a tensor-parallel group
        here = (local_ids >= 0) & (local_ids < token_weight.shape[0])
        local_ids = torch.where(here, local_ids, 0)
    tokens = torch.ops.aten.embedding.default(token_weight, local_ids).to(accumulate)
    if vocab_size >= 0:
        tokens = torch.where(here.unsqueeze(-1), tokens, 0.0)
    if token_scale is not None:
        tokens = tokens * token_scale.to(accumulate)
    if position_ids is None:
        position_ids = torch.arange(past_length, past_length + seq_len, device=input_ids.device).unsqueeze(0)
    out = tokens
    if add_positions:
        out = tokens + torch.ops.aten.embedding.default(position_weight, position_ids).to(accumulate)
    if dropout_seed is not None:
        out = torch.ops.aten.native_dropout.default(out, dropout_p, True)[0]
    return out.to(token_weight.dtype)


torch._decomp.register_decomposition(torch.ops.tokemb_fast.input_embedding.default)(decomposed_input_embedding)


# --- backward -----------------------------------------------------------------------------------

class _GradLayout(NamedTuple):
    sort_keys: Optional[tuple]  # (grid, constexprs) of int64 keys' cast to 32 bits, None: sorted as given
    acc_dtype: torch.dtype
    n_chunks: int
    segments: Optional[tuple]  # (grid, constexprs) of the bounds and chunk sums' launch, None: nothing to do
    rows: tuple                # the row kernel's, or with scatter the scatter kernel's
    scatter: bool              # zero-fill, then embedding_grad_scatter_kernel


class grad_kernel:
    """Within this context, tables with given keys take this gradient kernel (GRAD_KERNELS): a
    switch for measuring the two side by side, not for production use. The setting is global, not
    per thread (a backward may run on autograd's device thread): the innermost context still open,
    in whichever thread, decides; contexts may close in any order and an instance may be re-entered.
    torch.compile reads the setting when it traces: a compiled graph keeps the kernel it was traced
    with."""

    _open: list = []          # the instances, in the order entered (one may be there twice)
    _before = None            # GRAD_KERNEL when the first of them opened
    _lock = threading.Lock()

    def __init__(self, name: str):
        if name not in GRAD_KERNELS:
            raise ValueError(f"grad_kernel must be one of {GRAD_KERNELS}, got {name!r}")
        self.name = name

    def __enter__(self):
        global GRAD_KERNEL
        with grad_kernel._lock:
            if not grad_kernel._open:
                grad_kernel._before = GRAD_KERNEL
            grad_kernel._open.append(self)
            GRAD_KERNEL = self.name
        return self

    def __exit__(self, *exc):
        global GRAD_KERNEL
        with grad_kernel._lock:
            opened = grad_kernel._open
            # This instance's latest entry (an instance re-entered closes innermost first).
            del opened[max(i for i, instance in enumerate(opened) if instance is self)]
            GRAD_KERNEL = opened[-1].name if opened else grad_kernel._before


def _grad_layout(batch, seq_len, dim, num_rows, implicit, scale_grad_by_freq, has_dropout, has_grad_scale,
                 dtype, variant: str = "rows", int64_keys: bool = True) -> _GradLayout:
    n_entries = batch * seq_len
    # 32-bit keys halve the radix sort's passes; int32 keys are sorted as they are.
    sort_keys = None
    if not implicit and int64_keys and num_rows <= torch.iinfo(torch.int32).max and n_entries > 0:
        sort_keys = ((triton.cdiv(n_entries, SORT_KEYS_BLOCK),), dict(BLOCK=SORT_KEYS_BLOCK, num_warps=4, **NO_FMA))
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    n_chunks = n_entries // GRAD_CHUNK
    if implicit and batch < GRAD_CHUNK:
        # Default positions' segments are B entries long, so none covers a whole chunk: the chunk
        # sums would find nothing to sum, and their launch is skipped (the row kernel reads no partial).
        n_chunks = 0
    common = dict(IMPLICIT_POSITIONS=implicit, ACC_FP64=acc_dtype == torch.float64, CHUNK=GRAD_CHUNK,
                  HAS_DROPOUT=has_dropout)
    # One launch for the segment bounds (explicit keys: default positions' are known in closed form)
    # and the chunk sums: the search's programs first, then one per chunk (and block of columns).
    has_bounds, has_chunks = not implicit, n_chunks > 0
    segments = None
    if has_bounds or has_chunks:
        chunk_block_d = _block_d(dim, 256)
        grid = ((triton.cdiv(num_rows + 1, SEARCH_BLOCK) if has_bounds else 0) + n_chunks,
                triton.cdiv(dim, chunk_block_d) if has_chunks else 1)
        segments = (grid, dict(HAS_BOUNDS=has_bounds, HAS_CHUNKS=has_chunks, SEARCH_BLOCK=SEARCH_BLOCK,
                               BLOCK_D=chunk_block_d, ALIGNED4=_aligned4(dim, chunk_block_d), num_warps=4, **common,
                               **NO_FMA))
    block_d = _block_d(dim, 256)
    # Triton vectorises only what it can prove aligned, i.e. when the integer D is divisible by 16.
    # Otherwise every element is read with its own 64-bit address: half the tile keeps those in
    # registers (ptxas spilled at D=100 otherwise).
    tile = GRAD_TILE if dim % 16 == 0 else GRAD_TILE // 2
    rows_per_program = min(GRAD_MAX_ROWS, max(1, tile // block_d))
    scatter = variant == "scatter" and not implicit
    if scatter:
        common.pop("IMPLICIT_POSITIONS")
        rows = ((triton.cdiv(n_entries, rows_per_program), triton.cdiv(dim, block_d)), dict(
            SCALE_BY_FREQ=scale_grad_by_freq, HAS_GRAD_SCALE=has_grad_scale, SHORT=GRAD_SHORT,
            LONG_TILE=GRAD_LONG_TILE, ENTRIES=rows_per_program, BLOCK_D=block_d, ALIGNED4=_aligned4(dim, block_d),
            num_warps=4, **common, **NO_FMA))
    else:
        rows = ((triton.cdiv(num_rows, rows_per_program), triton.cdiv(dim, block_d)), dict(
            SCALE_BY_FREQ=scale_grad_by_freq, HAS_GRAD_SCALE=has_grad_scale, SHORT=GRAD_SHORT,
            LONG_TILE=GRAD_LONG_TILE, ROWS=rows_per_program, BLOCK_D=block_d, ALIGNED4=_aligned4(dim, block_d),
            num_warps=4, **common, **NO_FMA))
    return _GradLayout(sort_keys, acc_dtype, n_chunks, segments, rows, scatter)


class _GradPlans:
    """The layout of one backward key and the binaries of its launches."""

    __slots__ = ("layout", "sort_keys", "segments", "rows")

    def __init__(self, layout):
        self.layout = layout
        self.sort_keys = self.segments = self.rows = None


_grad_plans = PlanCache()


def _planned_launch(plans: _GradPlans, slot: str, kernel: CachedKernel, stream, args) -> None:
    plan = getattr(plans, slot)
    if plan is not None and not hooks_installed():
        plan(stream, args)
    else:
        grid, constexprs = getattr(plans.layout, slot)
        setattr(plans, slot, kernel.launch(grid, args, constexprs))


_fill_streams: dict = {}


def _fill_beside(grad_table: torch.Tensor):
    """Zero-fill grad_table on a side stream, forked from the current one; returns the join.

    The scatter backward's fill is pure write bandwidth (the V x D table), while the sort and the
    bounds and chunk sums' launch that precede the scatter are latency-bound on a few thousand
    keys: on one stream they run one after the other, on two they can share the GPU. The table is
    allocated on the current stream, and that stream waits for the fill before its first use (the
    scatter), so every later use and the table's release are ordered after the fill (no
    record_stream needed).
    Fork and join are event waits, which CUDA graph capture records as graph edges. One side
    stream per current stream, not per device: a thread's fill then never waits on another
    thread's work, nor lands in a graph another thread is capturing."""
    device = grad_table.device
    main = torch.cuda.current_stream(device)
    key = (device, main.cuda_stream)
    side = _fill_streams.get(key)
    if side is None:
        side = _fill_streams.setdefault(key, torch.cuda.Stream(device))
    side.wait_stream(main)
    with torch.cuda.stream(side):
        grad_table.zero_()
    return lambda: main.wait_stream(side)


def _dense_grad(grad_out, keys, num_rows, past_length, padding_idx, scale_grad_by_freq, count_divisor, dropout_p,
                dropout_seed, dropout_scale, grad_scale, layout, launch, side_stream_fill=False):
    """The body both forms share: ``launch(slot, kernel, args)`` launches one kernel.
    side_stream_fill (CUDA, not traced): the scatter layout's fill overlaps the sort (_fill_beside)."""
    batch, seq_len, dim = grad_out.shape
    n_entries = batch * seq_len
    fill_beside = layout.scatter and side_stream_fill and num_rows > 0 and dim > 0 and n_entries > 0
    grad_table = (torch.zeros if layout.scatter and not fill_beside else torch.empty)(
        (num_rows, dim), dtype=grad_out.dtype, device=grad_out.device)
    if num_rows == 0 or dim == 0:
        return grad_table
    strides = (grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    dropout = _dropout_args(dropout_p, dropout_seed, dropout_scale, grad_table)
    join_fill = _fill_beside(grad_table) if fill_beside else None
    # Joined however the launches in between end: a failed one sends the table's memory back to the
    # current stream's pool, which must not hand it out again while the side fill may still write it.
    try:
        if keys is None:
            # Never read: the sorted order of default positions is computed in the kernel.
            sorted_keys = order = bounds = grad_table
        else:
            if layout.sort_keys is not None:
                sort_input = torch.empty(n_entries, dtype=torch.int32, device=grad_out.device)
                launch("sort_keys", _SORT_KEYS, (sort_input, keys, keys.stride(0), keys.stride(1), n_entries, seq_len,
                                                 num_rows))
            else:
                sort_input = keys.reshape(-1)
            # Stable, so equal keys keep (b, t) order and the summation order is reproducible.
            sorted_keys, order = _sort(sort_input, stable=True)
            bounds = torch.empty(num_rows + 1, dtype=torch.int64, device=grad_out.device)
        chunk_sums = torch.empty((max(layout.n_chunks, 1), dim), dtype=layout.acc_dtype, device=grad_out.device)
        if layout.segments is not None:
            launch("segments", _SEGMENTS, (bounds, chunk_sums, grad_out, *strides, sorted_keys, order, n_entries,
                                           num_rows, dim, batch, seq_len, past_length, *dropout))
    finally:
        if join_fill is not None:
            join_fill()
    scale = grad_table if grad_scale is None else grad_scale
    if layout.scatter:
        if n_entries > 0:
            launch("rows", _GRAD_SCATTER, (grad_table, grad_table.stride(0), grad_out, *strides, sorted_keys, order,
                                           bounds, chunk_sums, n_entries, num_rows, dim, batch, seq_len, padding_idx,
                                           count_divisor, *dropout, scale))
        return grad_table
    launch("rows", _GRAD_ROWS, (grad_table, grad_table.stride(0), grad_out, *strides, sorted_keys, order, bounds,
                                chunk_sums, num_rows, dim, batch, seq_len, past_length, padding_idx, count_divisor,
                                *dropout, scale))
    return grad_table


def _dense_grad_planned(grad_out, keys, num_rows, past_length, padding_idx, scale_grad_by_freq, count_divisor,
                        dropout_p, dropout_seed, dropout_scale, grad_scale):
    device, stream = current_stream()
    # With shapes, strides and dtypes fixed, every integer argument but past_length is too; the
    # buffers are fresh allocations except grad_out (alignment) and keys (sorted into fresh ones).
    key = (device, grad_out.shape, grad_out.stride(), grad_out.dtype, aligned(grad_out), num_rows,
           int_class(past_length), padding_idx, scale_grad_by_freq, count_divisor,
           None if keys is None else (keys.dtype, keys.stride(), aligned(keys)),
           None if dropout_seed is None else dropout_p, grad_scale is None, GRAD_KERNEL)
    plans = _grad_plans.get(key)
    if plans is None:
        batch, seq_len, dim = grad_out.shape
        plans = _grad_plans.add(key, _GradPlans(_grad_layout(
            batch, seq_len, dim, num_rows, keys is None, scale_grad_by_freq, dropout_seed is not None,
            grad_scale is not None, grad_out.dtype, GRAD_KERNEL, keys is not None and keys.dtype == torch.int64)))
    return _dense_grad(grad_out, keys, num_rows, past_length, padding_idx, scale_grad_by_freq, count_divisor,
                       dropout_p, dropout_seed, dropout_scale, grad_scale, plans.layout,
                       lambda slot, kernel, args: _planned_launch(plans, slot, kernel, stream, args),
                       side_stream_fill=grad_out.is_cuda and GRAD_FILL_BESIDE)


@_define_op("tokemb_fast::embedding_dense_grad", _dense_grad_planned, mutates_args=())
def embedding_dense_grad(
    grad_out: torch.Tensor,
    keys: Optional[torch.Tensor],
    num_rows: int,
    past_length: int,
    padding_idx: int,
    scale_grad_by_freq: bool,
    count_divisor: int,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    dropout_scale: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """Gradient of a [num_rows, D] table from grad_out [B, T, D] (any strides).

    keys [B, T] names the table row each (b, t) read (token ids, or position ids); None means
    the default positions arange(T) + past_length for every batch row. padding_idx (-1: none)
    gets a zero row; scale_grad_by_freq divides each row by its count / count_divisor. With
    dropout_seed, each grad element is first multiplied by the forward's regenerated mask and scale.
    With grad_scale (fp64 [1]: the forward's token scale), every row is multiplied by it.
    """
    if not _tracing():
        return _dense_grad_planned(grad_out, keys, num_rows, past_length, padding_idx, scale_grad_by_freq,
                                   count_divisor, dropout_p, dropout_seed, dropout_scale, grad_scale)
    batch, seq_len, dim = grad_out.shape
    layout = _grad_layout(batch, seq_len, dim, num_rows, keys is None, scale_grad_by_freq, dropout_seed is not None,
                          grad_scale is not None, grad_out.dtype, GRAD_KERNEL,
                          keys is not None and keys.dtype == torch.int64)
    return _dense_grad(grad_out, keys, num_rows, past_length, padding_idx, scale_grad_by_freq, count_divisor,
                       dropout_p, dropout_seed, dropout_scale, grad_scale, layout,
                       lambda slot, kernel, args: _traced_launch(kernel, getattr(layout, slot)[0], args,
                                                                 getattr(layout, slot)[1]))


# --- the sparse gradient's masked rows -----------------------------------------------------------

def _dropout_mask_layout(n_rows, dim):
    block_d = _block_d(dim, 1024)
    block_n = max(1, TILE // block_d)
    return ((triton.cdiv(n_rows, block_n), triton.cdiv(dim, block_d)),
            dict(BLOCK_N=block_n, BLOCK_D=block_d, ALIGNED4=_aligned4(dim, block_d), num_warps=4, **NO_FMA))


def _masked_grad(grad_out, dropout_p, dropout_seed, dropout_scale, launch, mask_seq_len=-1, mask_seq_offset=0):
    batch, seq_len, dim = grad_out.shape
    out = torch.empty((batch, seq_len, dim), dtype=grad_out.dtype, device=grad_out.device)
    n_rows = batch * seq_len
    if n_rows == 0 or dim == 0:
        return out
    grid, constexprs = _dropout_mask_layout(n_rows, dim)
    launch(_DROPOUT_MASK, grid, (out, grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), n_rows,
                                 seq_len, dim, seq_len if mask_seq_len < 0 else mask_seq_len, mask_seq_offset,
                                 *_dropout_args(dropout_p, dropout_seed, dropout_scale, grad_out)),
           constexprs)
    return out


def _masked_grad_eager(grad_out, dropout_p, dropout_seed, dropout_scale, mask_seq_len=-1, mask_seq_offset=0):
    # Rare (sparse gradients with dropout, tensor parallelism's dropout): Triton's ordinary launch, no plan.
    return _masked_grad(grad_out, dropout_p, dropout_seed, dropout_scale,
                        lambda kernel, grid, args, constexprs: kernel.launch(grid, args, constexprs),
                        mask_seq_len, mask_seq_offset)


@_define_op("tokemb_fast::dropout_masked_grad", _masked_grad_eager, mutates_args=())
def dropout_masked_grad(
    grad_out: torch.Tensor,
    dropout_p: float,
    dropout_seed: torch.Tensor,
    dropout_scale: torch.Tensor,
    mask_seq_len: int = -1,
    mask_seq_offset: int = 0,
) -> torch.Tensor:
    """grad_out [B, T, D] (any strides) times the forward's regenerated dropout mask and scale,
    contiguous. Only the sparse-gradient path and tensor parallelism need it materialised. With
    mask_seq_len >= 0, step t takes the mask of step mask_seq_offset + t of a mask_seq_len-long
    sequence (a rank's part of a sequence-parallel output)."""
    return _masked_grad(grad_out, dropout_p, dropout_seed, dropout_scale,
                        _traced_launch if _tracing() else
                        lambda kernel, grid, args, constexprs: kernel.launch(grid, args, constexprs),
                        mask_seq_len, mask_seq_offset)


if INTERPRETED:
    # Output shapes for tracing (FakeTensors); see _define_op above.
    def _fake_forward(input_ids, token_weight, *_rest, **_keywords):
        # (Both forward ops: the output's shape depends on these two alone.)
        return token_weight.new_empty((*input_ids.shape, token_weight.shape[1]))

    input_embedding_forward.register_fake(_fake_forward)
    input_embedding.register_fake(_fake_forward)

    @embedding_dense_grad.register_fake
    def _(grad_out, keys, num_rows, past_length, padding_idx, scale_grad_by_freq, count_divisor, dropout_p,
          dropout_seed, dropout_scale, grad_scale):
        return grad_out.new_empty((num_rows, grad_out.shape[2]))

    @dropout_masked_grad.register_fake
    def _(grad_out, dropout_p, dropout_seed, dropout_scale, mask_seq_len=-1, mask_seq_offset=0):
        return grad_out.new_empty(grad_out.shape)

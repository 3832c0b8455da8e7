"""Launchers for the Triton kernels, registered as PyTorch custom ops.

Each launcher is a ``torch.library.triton_op`` whose body launches through ``wrap_triton``, so
``torch.compile`` can see into it (no graph break, the kernels stay visible to Inductor) and
FakeTensor tracing runs the same body without launching anything. Arguments arrive already
checked by ``tokemb_fast.validation``; these functions only shape the launch.

Importing this module imports Triton and the kernels. ``TRITON_INTERPRET=1`` must be set before
that import for the kernels to run on CPU tensors (Triton decides at decoration time).
"""
import functools
import os
from typing import Optional

import torch
import triton
from torch.library import custom_op, triton_op, wrap_triton
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .kernels import (apply_dropout_mask_kernel, embedding_grad_rows_kernel, input_embedding_fwd_kernel,
                      segment_bounds_kernel, segment_chunk_sums_kernel)

#: True when the kernels were compiled for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# On a GPU the ops are triton_ops: torch.compile traces their bodies (wrap_triton turns each
# launch into a graph node) and Inductor sees the kernels. The interpreter launches even on
# FakeTensors, so there the ops are opaque custom ops with explicit fake impls (end of file):
# torch.compile then still traces the model around them, which is what CPU tests can check.
#
# Outside any tracing, calling a triton_op still pays PyTorch's dispatch (autograd key, backend
# lookup, a disabled-Dynamo frame) before the launcher body runs. In plain eager mode (not
# compiling, no dispatch mode such as FakeTensor or make_fx active, plain tensors) the body runs
# directly, exactly as the op's own eager implementation runs it: with wrap_triton switched off,
# so each launch goes straight to Triton (with wrap_triton on, every launch went through its
# tracing operator: 4x slower per call on the H100, 2026-11-27). Autograd is unaffected: the ops
# are only called inside FusedInputEmbeddingFunction, which provides the backward.
try:  # private (torch 2.13 has it); where it is missing, every call takes the op
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # pragma: no cover
    _set_wrap_triton_enabled = None


def _plain_eager(args) -> bool:
    if _set_wrap_triton_enabled is None or torch.compiler.is_compiling() \
            or _get_current_dispatch_mode() is not None:
        return False
    for arg in args:
        if isinstance(arg, torch.Tensor) and (type(arg) not in (torch.Tensor, torch.nn.Parameter)
                                              or torch._C._functorch.is_functorch_wrapped_tensor(arg)):
            return False
    return True


def _define_op(name: str, mutates_args=()):
    def define(launcher):
        op = (custom_op if INTERPRETED else triton_op)(name, mutates_args=mutates_args)(launcher)

        @functools.wraps(launcher)
        def call(*args):
            if not _plain_eager(args):
                return op(*args)
            with _set_wrap_triton_enabled(False):
                return launcher(*args)
        call.op = op
        call.register_fake = op.register_fake
        return call
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
# Elements of the output one forward program owns in the fixed config (the interpreter's, and
# small calls' on a GPU; larger calls are autotuned): enough 16-byte accesses per thread to keep
# memory busy, few enough for registers.
TILE = 4096
SEARCH_BLOCK = 1024


def _block_d(dim: int, cap: int) -> int:
    """Columns per program: the widest power of two (<= cap) that pads D by at most 1/16.

    D = 768 takes 256 (three full blocks) rather than 1024 (a quarter of the lanes idle);
    D = 1600 takes 128 (13 blocks, 4% padding) rather than 2048 (22%).
    """
    # Memoised for plain ints: computing it was ~10% of a forward call's host time (measured with
    # bench/host_overhead.py). Under torch.compile with dynamic shapes D is a SymInt, which a
    # cache cannot hash (lru_cache failed opcheck's dynamic-shape test on the H100).
    if type(dim) is int and type(cap) is int:
        return _block_d_cached(dim, cap)
    return _block_d_uncached(dim, cap)


def _block_d_uncached(dim: int, cap: int) -> int:
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


_block_d_cached = functools.lru_cache(maxsize=256)(_block_d_uncached)


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


def _forward_launch(n_elements: int):
    """(kernel, meta-parameters the launch passes) for a forward of n_elements outputs."""
    if _autotuned_forward is None or n_elements < AUTOTUNE_MIN_ELEMENTS:
        return input_embedding_fwd_kernel, _FIXED_FORWARD_CONFIG
    return _autotuned_forward, {}


def _dropout_args(dropout_p, dropout_seed, dropout_scale, placeholder):
    """(seed, scale, threshold) kernel arguments: an element is kept when its 32 random bits are
    >= floor(p * 2^32). Without dropout the kernels never read them; any pointer will do."""
    if dropout_seed is None:
        return placeholder, placeholder, 0
    return dropout_seed, dropout_scale, int(dropout_p * 2**32)


def _aligned4(dim: int, block_d: int) -> bool:
    # Four adjacent columns share one Philox evaluation when groups of 4 never straddle rows or blocks.
    return dim % 4 == 0 and block_d % 4 == 0


def _batch_stride(tensor: torch.Tensor) -> int:
    # A [1, T] view broadcast over the batch reads row 0 for every b.
    return 0 if tensor.shape[0] == 1 else tensor.stride(0)


@_define_op("tokemb_fast::input_embedding_forward", mutates_args=())
def input_embedding_forward(
    input_ids: torch.Tensor,
    token_weight: torch.Tensor,
    position_weight: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    past_length: int,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    dropout_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """[B, T] ids -> [B, T, D] = dropout(token_weight[ids] + position_weight[positions]).

    Dropout is on when dropout_seed (int64 [1]) is given: elements are zeroed with probability
    dropout_p and the rest multiplied by dropout_scale (fp64 [1], 1/(1-p)).
    """
    batch, seq_len = input_ids.shape
    dim = token_weight.shape[1]
    out = torch.empty((batch, seq_len, dim), dtype=token_weight.dtype, device=token_weight.device)
    n_rows = batch * seq_len
    if n_rows == 0 or dim == 0:
        return out
    has_position_ids = position_ids is not None
    # The kernel never reads position_ids when has_position_ids is False; any pointer will do.
    pos_ids = position_ids if has_position_ids else input_ids
    block_d = _block_d(dim, 1024)
    kernel, fixed_config = _forward_launch(n_rows * dim)

    def grid(meta):
        return (triton.cdiv(n_rows, max(1, meta["TILE"] // block_d)), triton.cdiv(dim, block_d))

    wrap_triton(kernel)[grid](
        out,
        input_ids, _batch_stride(input_ids), input_ids.stride(1),
        pos_ids, _batch_stride(pos_ids), pos_ids.stride(1),
        token_weight, token_weight.stride(0),
        position_weight, position_weight.stride(0),
        n_rows, seq_len, dim, token_weight.shape[0], position_weight.shape[0], past_length,
        *_dropout_args(dropout_p, dropout_seed, dropout_scale, input_ids),
        HAS_POSITION_IDS=has_position_ids,
        HAS_DROPOUT=dropout_seed is not None,
        ALIGNED4=_aligned4(dim, block_d),
        ACC_FP64=token_weight.dtype == torch.float64,
        BLOCK_D=block_d,
        **fixed_config,
    )
    return out


@_define_op("tokemb_fast::embedding_dense_grad", mutates_args=())
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
) -> torch.Tensor:
    """Gradient of a [num_rows, D] table from grad_out [B, T, D] (any strides).

    keys [B, T] names the table row each (b, t) read (token ids, or position ids); None means
    the default positions arange(T) + past_length for every batch row. padding_idx (-1: none)
    gets a zero row; scale_grad_by_freq divides each row by its count / count_divisor. With
    dropout_seed, each grad element is first multiplied by the forward's regenerated mask and scale.
    """
    batch, seq_len, dim = grad_out.shape
    grad_table = torch.empty((num_rows, dim), dtype=grad_out.dtype, device=grad_out.device)
    if num_rows == 0 or dim == 0:
        return grad_table
    implicit = keys is None
    n_entries = batch * seq_len
    if implicit:
        # Never read: the sorted order of default positions is computed in the kernel.
        sorted_keys = order = bounds = grad_table
    else:
        # 32-bit keys halve the radix-sort passes. Stable, so equal keys keep (b, t) order and
        # the summation order is reproducible.
        flat_keys = keys.reshape(-1)
        if num_rows <= torch.iinfo(torch.int32).max:
            flat_keys = flat_keys.to(torch.int32)
        sorted_keys, order = torch.sort(flat_keys, stable=True)
        bounds = torch.empty(num_rows + 1, dtype=torch.int64, device=grad_out.device)
        wrap_triton(segment_bounds_kernel)[(triton.cdiv(num_rows + 1, SEARCH_BLOCK),)](
            bounds, sorted_keys, n_entries, num_rows, BLOCK=SEARCH_BLOCK, num_warps=4)
    acc_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    n_chunks = n_entries // GRAD_CHUNK
    if implicit and batch < GRAD_CHUNK:
        # Default positions' segments are B entries long, so none covers a whole chunk: the
        # chunk kernel would find nothing to sum. Skip its launch (the row kernel reads no partial).
        n_chunks = 0
    chunk_sums = torch.empty((max(n_chunks, 1), dim), dtype=acc_dtype, device=grad_out.device)
    strides = (grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    dropout = _dropout_args(dropout_p, dropout_seed, dropout_scale, grad_table)
    common = dict(IMPLICIT_POSITIONS=implicit, ACC_FP64=acc_dtype == torch.float64, CHUNK=GRAD_CHUNK,
                  HAS_DROPOUT=dropout_seed is not None)
    if n_chunks > 0:
        chunk_block_d = _block_d(dim, 256)
        wrap_triton(segment_chunk_sums_kernel)[(n_chunks, triton.cdiv(dim, chunk_block_d))](
            chunk_sums, grad_out, *strides, sorted_keys, order,
            n_entries, dim, batch, seq_len, past_length, *dropout,
            BLOCK_D=chunk_block_d, ALIGNED4=_aligned4(dim, chunk_block_d), num_warps=4, **common,
        )
    block_d = _block_d(dim, 256)
    # Triton vectorises only what it can prove aligned, i.e. when the integer D is divisible by 16.
    # Otherwise every element is read with its own 64-bit address: half the tile keeps those in
    # registers (ptxas spilled at D=100 otherwise).
    tile = GRAD_TILE if dim % 16 == 0 else GRAD_TILE // 2
    rows_per_program = min(GRAD_MAX_ROWS, max(1, tile // block_d))
    wrap_triton(embedding_grad_rows_kernel)[(triton.cdiv(num_rows, rows_per_program), triton.cdiv(dim, block_d))](
        grad_table, grad_table.stride(0), grad_out, *strides, sorted_keys, order, bounds, chunk_sums,
        num_rows, dim, batch, seq_len, past_length, padding_idx, count_divisor, *dropout,
        SCALE_BY_FREQ=scale_grad_by_freq, SHORT=GRAD_SHORT, LONG_TILE=GRAD_LONG_TILE, ROWS=rows_per_program,
        BLOCK_D=block_d,
        ALIGNED4=_aligned4(dim, block_d), num_warps=4, **common,
    )
    return grad_table


@_define_op("tokemb_fast::dropout_masked_grad", mutates_args=())
def dropout_masked_grad(
    grad_out: torch.Tensor,
    dropout_p: float,
    dropout_seed: torch.Tensor,
    dropout_scale: torch.Tensor,
) -> torch.Tensor:
    """grad_out [B, T, D] (any strides) times the forward's regenerated dropout mask and scale,
    contiguous. Only the sparse-gradient path needs it materialised."""
    batch, seq_len, dim = grad_out.shape
    out = torch.empty((batch, seq_len, dim), dtype=grad_out.dtype, device=grad_out.device)
    n_rows = batch * seq_len
    if n_rows == 0 or dim == 0:
        return out
    block_d = _block_d(dim, 1024)
    block_n = max(1, TILE // block_d)
    wrap_triton(apply_dropout_mask_kernel)[(triton.cdiv(n_rows, block_n), triton.cdiv(dim, block_d))](
        out, grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), n_rows, seq_len, dim,
        *_dropout_args(dropout_p, dropout_seed, dropout_scale, grad_out), BLOCK_N=block_n, BLOCK_D=block_d,
        ALIGNED4=_aligned4(dim, block_d), num_warps=4)
    return out


if INTERPRETED:
    # Output shapes for tracing (FakeTensors); see _define_op above.
    @input_embedding_forward.register_fake
    def _(input_ids, token_weight, position_weight, position_ids, past_length, dropout_p, dropout_seed, dropout_scale):
        return token_weight.new_empty((*input_ids.shape, token_weight.shape[1]))

    @embedding_dense_grad.register_fake
    def _(grad_out, keys, num_rows, past_length, padding_idx, scale_grad_by_freq, count_divisor, dropout_p,
          dropout_seed, dropout_scale):
        return grad_out.new_empty((num_rows, grad_out.shape[2]))

    @dropout_masked_grad.register_fake
    def _(grad_out, dropout_p, dropout_seed, dropout_scale):
        return grad_out.new_empty(grad_out.shape)

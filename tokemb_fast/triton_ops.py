"""Launchers for the Triton kernels, registered as PyTorch custom ops.

Each launcher is a ``torch.library.triton_op`` whose body launches through ``wrap_triton``, so
``torch.compile`` can see into it (no graph break, the kernels stay visible to Inductor) and
FakeTensor tracing runs the same body without launching anything. Arguments arrive already
checked by ``tokemb_fast.validation``; these functions only shape the launch.

Importing this module imports Triton and the kernels. ``TRITON_INTERPRET=1`` must be set before
that import for the kernels to run on CPU tensors (Triton decides at decoration time).
"""
import os
from typing import Optional

import torch
import triton
from torch.library import custom_op, triton_op, wrap_triton

from .kernels import embedding_grad_rows_kernel, input_embedding_fwd_kernel, segment_chunk_sums_kernel

#: True when the kernels were compiled for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# On a GPU the ops are triton_ops: torch.compile traces their bodies (wrap_triton turns each
# launch into a graph node) and Inductor sees the kernels. The interpreter launches even on
# FakeTensors, so there the ops are opaque custom ops with explicit fake impls (end of file):
# torch.compile then still traces the model around them, which is what CPU tests can check.
_define_op = custom_op if INTERPRETED else triton_op

# Sorted entries are summed in pieces of CHUNK so that one frequent key cannot serialise the
# backward (see kernels/backward.py). 32 keeps a piece's tile (32 x BLOCK_D fp32) in registers.
GRAD_CHUNK = 32
# Table rows per backward program: the binary search and the loop bounds are shared by a tile.
GRAD_ROWS = 4


def _forward_blocks(dim: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(dim), 1024)
    block_n = max(1, 4096 // block_d)
    return block_n, block_d


def _grad_block_d(dim: int) -> int:
    return min(triton.next_power_of_2(dim), 256)


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
) -> torch.Tensor:
    """[B, T] ids -> [B, T, D] = token_weight[ids] + position_weight[positions]."""
    batch, seq_len = input_ids.shape
    dim = token_weight.shape[1]
    out = torch.empty((batch, seq_len, dim), dtype=token_weight.dtype, device=token_weight.device)
    n_rows = batch * seq_len
    if n_rows == 0 or dim == 0:
        return out
    has_position_ids = position_ids is not None
    # The kernel never reads position_ids when has_position_ids is False; any pointer will do.
    pos_ids = position_ids if has_position_ids else input_ids
    block_n, block_d = _forward_blocks(dim)
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(dim, block_d))
    wrap_triton(input_embedding_fwd_kernel)[grid](
        out,
        input_ids, _batch_stride(input_ids), input_ids.stride(1),
        pos_ids, _batch_stride(pos_ids), pos_ids.stride(1),
        token_weight, token_weight.stride(0),
        position_weight, position_weight.stride(0),
        n_rows, seq_len, dim, token_weight.shape[0], position_weight.shape[0], past_length,
        HAS_POSITION_IDS=has_position_ids,
        ACC_FP64=token_weight.dtype == torch.float64,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out


@_define_op("tokemb_fast::embedding_dense_grad", mutates_args=())
def embedding_dense_grad(
    grad_out: torch.Tensor,
    keys: Optional[torch.Tensor],
    num_rows: int,
    past_length: int,
) -> torch.Tensor:
    """Gradient of a [num_rows, D] table from grad_out [B, T, D] (any strides).

    keys [B, T] names the table row each (b, t) read (token ids, or position ids); None means
    the default positions arange(T) + past_length for every batch row.
    """
    batch, seq_len, dim = grad_out.shape
    grad_table = torch.empty((num_rows, dim), dtype=grad_out.dtype, device=grad_out.device)
    if num_rows == 0 or dim == 0:
        return grad_table
    implicit = keys is None
    n_entries = batch * seq_len
    if implicit:
        # Never read: the sorted order of default positions is computed in the kernel.
        sorted_keys = order = grad_table
    else:
        # Stable, so equal keys keep (b, t) order and the summation order is reproducible.
        sorted_keys, order = torch.sort(keys.reshape(-1), stable=True)
    acc_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    n_chunks = n_entries // GRAD_CHUNK
    chunk_sums = torch.empty((max(n_chunks, 1), dim), dtype=acc_dtype, device=grad_out.device)
    block_d = _grad_block_d(dim)
    d_blocks = triton.cdiv(dim, block_d)
    strides = (grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    common = dict(IMPLICIT_POSITIONS=implicit, ACC_FP64=acc_dtype == torch.float64, CHUNK=GRAD_CHUNK,
                  BLOCK_D=block_d)
    if n_chunks > 0:
        wrap_triton(segment_chunk_sums_kernel)[(n_chunks, d_blocks)](
            chunk_sums, grad_out, *strides, sorted_keys, order,
            n_entries, dim, batch, seq_len, past_length,
            num_warps=4, **common,
        )
    wrap_triton(embedding_grad_rows_kernel)[(triton.cdiv(num_rows, GRAD_ROWS), d_blocks)](
        grad_table, grad_table.stride(0), grad_out, *strides, sorted_keys, order, chunk_sums,
        n_entries, num_rows, dim, batch, seq_len, past_length,
        ROWS=GRAD_ROWS, num_warps=4, **common,
    )
    return grad_table


if INTERPRETED:
    # Output shapes for tracing (FakeTensors); see _define_op above.
    @input_embedding_forward.register_fake
    def _(input_ids, token_weight, position_weight, position_ids, past_length):
        return token_weight.new_empty((*input_ids.shape, token_weight.shape[1]))

    @embedding_dense_grad.register_fake
    def _(grad_out, keys, num_rows, past_length):
        return grad_out.new_empty((num_rows, grad_out.shape[2]))

"""Launchers of the encoder embedding's kernels (kernels/encoder.py), as PyTorch custom ops.

The same pattern as tokemb_fast.triton_ops: a ``triton_op`` (a plain ``custom_op`` under the
interpreter) whose body launches through ``wrap_triton`` when traced and through
``CachedKernel``'s planned launch otherwise. Arguments arrive checked by tokemb_fast.encoder.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch._decomp
import triton

from .kernels import encoder_embedding_bwd_kernel, encoder_embedding_fwd_kernel
from .launch import CachedKernel, PlanCache, aligned, current_stream, hooks_installed
from .triton_ops import (INTERPRETED, NO_FMA, _aligned4, _batch_stride, _define_op, _dropout_args, _traced_launch,
                         _tracing)

_FORWARD = CachedKernel(encoder_embedding_fwd_kernel)
_BACKWARD = CachedKernel(encoder_embedding_bwd_kernel)

# Elements of the [rows, D] tile a forward program holds (LayerNorm needs whole rows): 4 rows of
# BERT-base's 768 (padded to 1024) columns.
ENCODER_TILE = 4096
# Steps of the ids a program loads at once when it counts non-pad ids (RoBERTa's positions).
BLOCK_T = 128
# Backward programs at most: each keeps its LayerNorm weight/bias sums in registers and writes
# them once, so the partial sums to reduce are at most this many rows of D.
MAX_BACKWARD_PROGRAMS = 512


class _Layout(NamedTuple):
    grid: tuple
    constexprs: dict


def _encoder_constexprs(dim, dtype, has_position_ids, from_padding, has_type_table, has_type_ids, layer_norm,
                        has_ln_weight, has_dropout):
    block_d = triton.next_power_of_2(max(dim, 1))
    block_n = max(1, min(16, ENCODER_TILE // block_d))
    return block_n, dict(
        HAS_POSITION_IDS=has_position_ids, POSITIONS_FROM_PADDING=from_padding, HAS_TYPE_TABLE=has_type_table,
        HAS_TYPE_IDS=has_type_ids, HAS_LAYER_NORM=layer_norm, HAS_LN_WEIGHT=has_ln_weight, HAS_DROPOUT=has_dropout,
        ALIGNED4=_aligned4(dim, block_d), ACC_FP64=dtype == torch.float64, BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_T=BLOCK_T, num_warps=8 if block_n * block_d > 2048 else 4, **NO_FMA)


def _ids_strides(tensor, like):
    """(pointer tensor, batch stride, step stride) of [B, T] or [1, T] ids; the ids themselves
    (never read) where there are none."""
    if tensor is None:
        return like, 0, 0
    return tensor, _batch_stride(tensor), tensor.stride(1)


_forward_plans = PlanCache()
_backward_plans = PlanCache()


def _launch(kernel, plans, key, grid, args, constexprs, traced):
    if traced:
        _traced_launch(kernel, grid, args, constexprs)
        return
    device, stream = current_stream()
    plan = plans.get((device, key)) if device is not None else None
    if plan is not None and not hooks_installed():
        plan(stream, args)
        return
    plan = kernel.launch(grid, args, constexprs)
    if plan is not None:
        plans.add((device, key), plan)


def _key(*tensors):
    # What Triton specialises a launch on beyond the constexprs and integer classes, which the
    # caller's key holds: dtypes, and the alignment of each pointer.
    return tuple(None if tensor is None else (tensor.dtype, aligned(tensor)) for tensor in tensors)


def _forward(input_ids, word_weight, position_weight, type_weight, position_ids, type_ids, ln_weight, ln_bias, eps,
             past_length, pad_id, positions_from_padding, layer_norm, save_stats, dropout_p, dropout_seed,
             dropout_scale, id_flag, traced):
    batch, seq_len = input_ids.shape
    dim = word_weight.shape[1]
    n_rows = batch * seq_len
    accumulate = torch.float64 if word_weight.dtype == torch.float64 else torch.float32
    out = torch.empty((batch, seq_len, dim), dtype=word_weight.dtype, device=word_weight.device)
    stats = n_rows if (layer_norm and save_stats) else 0
    mean = torch.empty(stats, dtype=accumulate, device=word_weight.device)
    rstd = torch.empty(stats, dtype=accumulate, device=word_weight.device)
    if n_rows == 0 or dim == 0:
        return out, mean, rstd
    block_n, constexprs = _encoder_constexprs(
        dim, word_weight.dtype, position_ids is not None, positions_from_padding, type_weight is not None,
        type_ids is not None, layer_norm, ln_weight is not None, dropout_seed is not None)
    constexprs = dict(constexprs, HAS_LN_BIAS=ln_bias is not None, CHECK_IDS=id_flag is not None,
                      SAVE_STATS=bool(stats))
    placeholder = input_ids
    positions, position_b, position_t = _ids_strides(position_ids, placeholder)
    types, type_b, type_t = _ids_strides(type_ids, placeholder)
    type_table = word_weight if type_weight is None else type_weight
    args = (out, mean if stats else out, rstd if stats else out, input_ids, _batch_stride(input_ids), input_ids.stride(1),
            positions, position_b, position_t, types, type_b, type_t,
            word_weight, word_weight.stride(0), position_weight, position_weight.stride(0),
            type_table, type_table.stride(0),
            word_weight if ln_weight is None else ln_weight, word_weight if ln_bias is None else ln_bias,
            word_weight if eps is None else eps,
            n_rows, seq_len, dim, word_weight.shape[0], position_weight.shape[0],
            1 if type_weight is None else type_weight.shape[0], past_length, pad_id,
            *_dropout_args(dropout_p, dropout_seed, dropout_scale, placeholder),
            placeholder if id_flag is None else id_flag)
    key = (tuple(sorted((name, value) for name, value in constexprs.items())), input_ids.shape, word_weight.shape,
           position_weight.shape, None if type_weight is None else type_weight.shape, input_ids.stride(),
           word_weight.stride(0), position_weight.stride(0), type_table.stride(0),
           None if position_ids is None else position_ids.stride(), None if type_ids is None else type_ids.stride(),
           past_length, pad_id, None if dropout_seed is None else dropout_p,
           _key(input_ids, position_ids, type_ids, word_weight, position_weight, type_weight, ln_weight, ln_bias))
    _launch(_FORWARD, _forward_plans, key, (triton.cdiv(n_rows, block_n),), args, constexprs, traced)
    return out, mean, rstd


def _forward_eager(*args):
    return _forward(*args, traced=False)


@_define_op("tokemb_fast::encoder_embedding_forward", _forward_eager, mutates_args=("id_flag",))
def encoder_embedding_forward(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_weight: torch.Tensor,
    type_weight: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    type_ids: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: Optional[torch.Tensor],
    past_length: int,
    pad_id: int,
    positions_from_padding: bool,
    layer_norm: bool,
    save_stats: bool,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    dropout_scale: Optional[torch.Tensor],
    id_flag: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T] ids -> (out [B, T, D], mean [B*T], rstd [B*T]): out = dropout(LayerNorm(word[ids] +
    type[type_ids] + position[positions])), mean and 1/std of each row's sum when layer_norm and
    save_stats (else empty). position_ids and type_ids are [B, T] or [1, T] or None (positions
    past_length + t, or made from the padding with positions_from_padding and pad_id; types 0).
    eps is an fp64 [1] tensor. With id_flag (int64 [9]), ids outside their tables are recorded;
    their rows are NaN either way."""
    return _forward(input_ids, word_weight, position_weight, type_weight, position_ids, type_ids, ln_weight, ln_bias,
                    eps, past_length, pad_id, positions_from_padding, layer_norm, save_stats, dropout_p, dropout_seed,
                    dropout_scale, id_flag, traced=_tracing())


def _pure_forward_eager(input_ids, word_weight, position_weight, type_weight, position_ids, type_ids, ln_weight,
                        ln_bias, eps, past_length, pad_id, positions_from_padding, layer_norm, save_stats, dropout_p,
                        dropout_seed, dropout_scale):
    return _forward(input_ids, word_weight, position_weight, type_weight, position_ids, type_ids, ln_weight, ln_bias,
                    eps, past_length, pad_id, positions_from_padding, layer_norm, save_stats, dropout_p, dropout_seed,
                    dropout_scale, None, traced=False)


@_define_op("tokemb_fast::encoder_embedding", _pure_forward_eager)
def encoder_embedding(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_weight: torch.Tensor,
    type_weight: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    type_ids: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: Optional[torch.Tensor],
    past_length: int,
    pad_id: int,
    positions_from_padding: bool,
    layer_norm: bool,
    save_stats: bool,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    dropout_scale: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """encoder_embedding_forward without an id flag: a pure function, what traced graphs hold when
    no flag is written (check_ids=False, exported programs); ``decomposed_encoder_embedding`` is
    its decomposition for consumers that do not know it."""
    return _forward(input_ids, word_weight, position_weight, type_weight, position_ids, type_ids, ln_weight, ln_bias,
                    eps, past_length, pad_id, positions_from_padding, layer_norm, save_stats, dropout_p, dropout_seed,
                    dropout_scale, None, traced=_tracing())


def decomposed_encoder_embedding(input_ids, word_weight, position_weight, type_weight, position_ids, type_ids, ln_weight,
                                 ln_bias, eps, past_length, pad_id, positions_from_padding, layer_norm, save_stats,
                                 dropout_p, dropout_seed, dropout_scale):
    """``tokemb_fast::encoder_embedding`` in ATen ops: the lookups, adds and LayerNorm in fp32 (fp64
    for fp64 tables), rounded once; as for the GPT op's decomposition, a bad id is the consumer's
    error and dropout draws the consumer's own mask."""
    accumulate = torch.float64 if word_weight.dtype == torch.float64 else torch.float32
    batch, seq_len = input_ids.shape
    if position_ids is None:
        if positions_from_padding:
            not_pad = input_ids.ne(pad_id).int()
            position_ids = ((torch.cumsum(not_pad, dim=1).type_as(not_pad) + past_length) * not_pad).long() + pad_id
        else:
            position_ids = torch.arange(past_length, past_length + seq_len, device=input_ids.device).unsqueeze(0)
    x = torch.ops.aten.embedding.default(word_weight, input_ids).to(accumulate)
    if type_weight is not None:
        types = torch.zeros_like(input_ids) if type_ids is None else type_ids
        x = x + torch.ops.aten.embedding.default(type_weight, types).to(accumulate)
    x = x + torch.ops.aten.embedding.default(position_weight, position_ids).to(accumulate)
    mean = rstd = x.new_empty(0)
    if layer_norm:
        variance, row_mean = torch.var_mean(x, dim=-1, correction=0)
        rstd_rows = torch.rsqrt(variance + eps.to(accumulate))
        x = (x - row_mean.unsqueeze(-1)) * rstd_rows.unsqueeze(-1)
        if ln_weight is not None:
            x = x * ln_weight.to(accumulate)
        if ln_bias is not None:
            x = x + ln_bias.to(accumulate)
        if save_stats:
            mean, rstd = row_mean.reshape(-1), rstd_rows.reshape(-1)
    if dropout_seed is not None:
        x = torch.ops.aten.native_dropout.default(x, dropout_p, True)[0]
    return x.to(word_weight.dtype), mean, rstd


torch._decomp.register_decomposition(torch.ops.tokemb_fast.encoder_embedding.default)(decomposed_encoder_embedding)


def _backward(grad_out, mean, rstd, input_ids, word_weight, position_weight, type_weight, position_ids, type_ids,
              ln_weight, past_length, pad_id, positions_from_padding, layer_norm, dropout_p, dropout_seed,
              dropout_scale, traced):
    batch, seq_len, dim = grad_out.shape
    n_rows = batch * seq_len
    accumulate = torch.float64 if word_weight.dtype == torch.float64 else torch.float32
    grad_sum = torch.empty((batch, seq_len, dim), dtype=grad_out.dtype, device=grad_out.device)
    block_n, constexprs = _encoder_constexprs(
        dim, word_weight.dtype, position_ids is not None, positions_from_padding, type_weight is not None,
        type_ids is not None, layer_norm, ln_weight is not None, dropout_seed is not None)
    programs = max(1, min(triton.cdiv(n_rows, block_n), MAX_BACKWARD_PROGRAMS))
    partial_weight = torch.empty((programs if layer_norm else 0, dim), dtype=accumulate, device=grad_out.device)
    partial_bias = torch.empty((programs if layer_norm else 0, dim), dtype=accumulate, device=grad_out.device)
    if n_rows == 0 or dim == 0:
        zeros = torch.zeros(dim if layer_norm else 0, dtype=accumulate, device=grad_out.device)
        return grad_sum, zeros, zeros.clone()
    placeholder = input_ids
    positions, position_b, position_t = _ids_strides(position_ids, placeholder)
    types, type_b, type_t = _ids_strides(type_ids, placeholder)
    type_table = word_weight if type_weight is None else type_weight
    args = (grad_sum, partial_weight if layer_norm else grad_sum, partial_bias if layer_norm else grad_sum,
            grad_out, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            mean if layer_norm else grad_sum, rstd if layer_norm else grad_sum,
            input_ids, _batch_stride(input_ids), input_ids.stride(1),
            positions, position_b, position_t, types, type_b, type_t,
            word_weight, word_weight.stride(0), position_weight, position_weight.stride(0),
            type_table, type_table.stride(0), word_weight if ln_weight is None else ln_weight,
            n_rows, seq_len, dim, word_weight.shape[0], position_weight.shape[0],
            1 if type_weight is None else type_weight.shape[0], past_length, pad_id,
            *_dropout_args(dropout_p, dropout_seed, dropout_scale, placeholder))
    key = (tuple(sorted(constexprs.items())), grad_out.shape, grad_out.stride(), input_ids.shape, word_weight.shape,
           position_weight.shape, None if type_weight is None else type_weight.shape, input_ids.stride(),
           word_weight.stride(0), position_weight.stride(0), type_table.stride(0),
           None if position_ids is None else position_ids.stride(), None if type_ids is None else type_ids.stride(),
           past_length, pad_id, None if dropout_seed is None else dropout_p,
           _key(grad_out, input_ids, position_ids, type_ids, word_weight, position_weight, type_weight, ln_weight))
    _launch(_BACKWARD, _backward_plans, key, (programs,), args, constexprs, traced)
    if not layer_norm:
        empty = torch.zeros(0, dtype=accumulate, device=grad_out.device)
        return grad_sum, empty, empty.clone()
    # The programs' partial sums, summed in a fixed order (no atomics): deterministic.
    return grad_sum, partial_weight.sum(0), partial_bias.sum(0)


def _backward_eager(*args):
    return _backward(*args, traced=False)


@_define_op("tokemb_fast::encoder_embedding_backward", _backward_eager)
def encoder_embedding_backward(
    grad_out: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_weight: torch.Tensor,
    type_weight: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    type_ids: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    past_length: int,
    pad_id: int,
    positions_from_padding: bool,
    layer_norm: bool,
    dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
    dropout_scale: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gradient of the rows' sum [B, T, D] in grad_out's dtype, LayerNorm weight gradient [D],
    bias gradient [D] in the accumulator dtype; both [0] without layer_norm), from the upstream
    gradient and the forward's row statistics; the sum is recomputed from the tables."""
    return _backward(grad_out, mean, rstd, input_ids, word_weight, position_weight, type_weight, position_ids,
                     type_ids, ln_weight, past_length, pad_id, positions_from_padding, layer_norm, dropout_p,
                     dropout_seed, dropout_scale, traced=_tracing())


if INTERPRETED:
    def _fake_forward(input_ids, word_weight, position_weight, type_weight, position_ids, type_ids, ln_weight, ln_bias,
                      eps, past_length, pad_id, positions_from_padding, layer_norm, save_stats, *_rest, **_keywords):
        # (Both forward ops; the rest: dropout's arguments, and the flag of the one that has it.)
        accumulate = torch.float64 if word_weight.dtype == torch.float64 else torch.float32
        stats = input_ids.numel() if (layer_norm and save_stats) else 0
        return (word_weight.new_empty((*input_ids.shape, word_weight.shape[1])),
                word_weight.new_empty(stats, dtype=accumulate), word_weight.new_empty(stats, dtype=accumulate))

    encoder_embedding_forward.register_fake(_fake_forward)
    encoder_embedding.register_fake(_fake_forward)

    @encoder_embedding_backward.register_fake
    def _(grad_out, mean, rstd, input_ids, word_weight, position_weight, type_weight, position_ids, type_ids,
          ln_weight, past_length, pad_id, positions_from_padding, layer_norm, dropout_p, dropout_seed, dropout_scale):
        accumulate = torch.float64 if word_weight.dtype == torch.float64 else torch.float32
        dim = grad_out.shape[2] if layer_norm else 0
        return (grad_out.new_empty(grad_out.shape), grad_out.new_empty(dim, dtype=accumulate),
                grad_out.new_empty(dim, dtype=accumulate))

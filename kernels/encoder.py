"""The encoder families' embedding (BERT, RoBERTa, DistilBERT, ELECTRA, XLM-RoBERTa), fused:

    out[b, t, :] = dropout(LayerNorm(word[ids] + token_type[type_ids] + position[positions]))

in one pass: each program owns BLOCK_N flattened (b, t) rows and all D columns (LayerNorm needs
the whole row), gathers the rows of the three tables, sums them in fp32 (fp64 for fp64 tables)
in Hugging Face's order, normalises with fp32 statistics and rounds once. In eager PyTorch this
is three gathers, two adds, a LayerNorm and a dropout, each a full pass over B*T*D; here it is
one read of the rows and one write. The row statistics (mean, 1/std) are written for the
backward, which recomputes the sum from the tables instead of keeping a B*T*D copy.

Positions are given ([B, T] or [1, T] ids), or past_length + t, or made from the padding as
RoBERTa makes them (POSITIONS_FROM_PADDING): (number of non-pad ids in ids[b, :t+1] + past_length)
if ids[b, t] is not the pad id, else the pad id. The count is taken here, from the ids the
program's rows share, so there is no separate pass for it.

The backward (encoder_embedding_bwd_kernel) turns the upstream gradient into the gradient of the
sum, which the table-gradient kernels of backward.py then reduce per table, and into per-program
partial sums of the LayerNorm weight and bias gradients, summed in a fixed order by the caller:
no atomics anywhere, so every gradient is the same bit for bit from run to run.
"""
import triton
import triton.language as tl

from .dropout import dropout_keep


@triton.jit
def _rows_and_ids(rows, row_ok, ids_ptr, stride_ids_b, stride_ids_t, position_ids_ptr, stride_pos_b, stride_pos_t,
                  type_ids_ptr, stride_type_b, stride_type_t, seq_len, past_length, pad_id,
                  HAS_POSITION_IDS: tl.constexpr, POSITIONS_FROM_PADDING: tl.constexpr, HAS_TYPE_TABLE: tl.constexpr,
                  HAS_TYPE_IDS: tl.constexpr, BLOCK_T: tl.constexpr):
    """(word id, position, token type id) of each of the rows."""
    batch = rows // seq_len
    step = rows - batch * seq_len
    token = tl.load(ids_ptr + batch * stride_ids_b + step * stride_ids_t, mask=row_ok, other=0).to(tl.int64)
    if HAS_POSITION_IDS:
        position = tl.load(position_ids_ptr + batch * stride_pos_b + step * stride_pos_t,
                           mask=row_ok, other=0).to(tl.int64)
    elif POSITIONS_FROM_PADDING:
        # Non-pad ids among ids[b, 0..t], BLOCK_T at a time (the rows of a program share them, so
        # they come from cache after the first row).
        count = tl.zeros_like(step)
        for start in range(0, seq_len, BLOCK_T):
            steps = start + tl.arange(0, BLOCK_T)
            window = row_ok[:, None] & (steps[None, :] <= step[:, None])
            seen = tl.load(ids_ptr + batch[:, None] * stride_ids_b + steps[None, :] * stride_ids_t,
                           mask=window, other=0).to(tl.int64)
            count += tl.sum((window & (seen != pad_id)).to(tl.int64), axis=1)
        not_pad = (token != pad_id).to(tl.int64)
        position = (count + past_length) * not_pad + pad_id
    else:
        position = step + past_length
    if HAS_TYPE_TABLE and HAS_TYPE_IDS:
        token_type = tl.load(type_ids_ptr + batch * stride_type_b + step * stride_type_t,
                             mask=row_ok, other=0).to(tl.int64)
    else:
        token_type = tl.zeros_like(step)
    return batch, step, token, position, token_type


@triton.jit
def _row_sum(token, position, token_type, ok, cols, col_ok, word_ptr, stride_word, position_ptr, stride_position,
             type_ptr, stride_type, HAS_TYPE_TABLE: tl.constexpr, ACC_FP64: tl.constexpr):
    """word[token] + token_type[type] + position[position] in the accumulator dtype, in Hugging
    Face's order; rows not ok are never read (their sum is 0 here)."""
    mask = ok[:, None] & col_ok[None, :]
    x = tl.load(word_ptr + token[:, None] * stride_word + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float64) if ACC_FP64 else x.to(tl.float32)
    if HAS_TYPE_TABLE:
        typed = tl.load(type_ptr + token_type[:, None] * stride_type + cols[None, :], mask=mask, other=0.0)
        x = x + (typed.to(tl.float64) if ACC_FP64 else typed.to(tl.float32))
    placed = tl.load(position_ptr + position[:, None] * stride_position + cols[None, :], mask=mask, other=0.0)
    return x + (placed.to(tl.float64) if ACC_FP64 else placed.to(tl.float32))


@triton.jit
def _report(id_flag_ptr, slot, limit_slot, bad, value, limit):
    """Record the lowest negative and the highest too-large of the bad values in slot and slot + 1,
    and the limit in limit_slot (the flag's layout: tokemb_fast/id_check.py)."""
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        tl.atomic_min(id_flag_ptr + slot, tl.min(tl.where(bad & (value < 0), value, 0), axis=0))
        tl.atomic_max(id_flag_ptr + slot + 1, tl.max(tl.where(bad & (value >= 0), value, 0), axis=0))
        tl.atomic_xchg(id_flag_ptr + limit_slot, tl.zeros([], dtype=tl.int64) + limit)


@triton.jit
def encoder_embedding_fwd_kernel(
    out_ptr,                     # [B*T, D], contiguous, table dtype
    mean_ptr, rstd_ptr,          # [B*T] accumulator dtype, written when SAVE_STATS
    ids_ptr, stride_ids_b, stride_ids_t,
    position_ids_ptr, stride_pos_b, stride_pos_t,  # unused unless HAS_POSITION_IDS
    type_ids_ptr, stride_type_b, stride_type_t,    # unused unless HAS_TYPE_IDS (else every type is 0)
    word_ptr, stride_word, position_ptr, stride_position, type_ptr, stride_type,
    ln_weight_ptr, ln_bias_ptr, eps_ptr,           # [D], [D], fp64 [1]
    n_rows, seq_len, dim, vocab_size, num_positions, num_types, past_length, pad_id,
    dropout_seed_ptr, dropout_scale_ptr, dropout_threshold,
    id_flag_ptr,                 # int64 [9], unused unless CHECK_IDS (layout: tokemb_fast/id_check.py)
    HAS_POSITION_IDS: tl.constexpr, POSITIONS_FROM_PADDING: tl.constexpr, HAS_TYPE_TABLE: tl.constexpr,
    HAS_TYPE_IDS: tl.constexpr, HAS_LAYER_NORM: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr,
    HAS_LN_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, CHECK_IDS: tl.constexpr, SAVE_STATS: tl.constexpr,
    ALIGNED4: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < dim
    batch, step, token, position, token_type = _rows_and_ids(
        rows, row_ok, ids_ptr, stride_ids_b, stride_ids_t, position_ids_ptr, stride_pos_b, stride_pos_t,
        type_ids_ptr, stride_type_b, stride_type_t, seq_len, past_length, pad_id,
        HAS_POSITION_IDS, POSITIONS_FROM_PADDING, HAS_TYPE_TABLE, HAS_TYPE_IDS, BLOCK_T)
    token_ok = (token >= 0) & (token < vocab_size)
    position_ok = (position >= 0) & (position < num_positions)
    type_ok = (token_type >= 0) & (token_type < num_types)
    ok = row_ok & token_ok & position_ok & type_ok
    if CHECK_IDS:
        _report(id_flag_ptr, 0, 4, row_ok & ~token_ok, token, vocab_size)
        _report(id_flag_ptr, 2, 5, row_ok & ~position_ok, position, num_positions)
        _report(id_flag_ptr, 6, 8, row_ok & ~type_ok, token_type, num_types)
    x = _row_sum(token, position, token_type, ok, cols, col_ok, word_ptr, stride_word, position_ptr,
                 stride_position, type_ptr, stride_type, HAS_TYPE_TABLE, ACC_FP64)
    if HAS_LAYER_NORM:
        mean = tl.sum(x, axis=1) / dim
        centred = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
        variance = tl.sum(centred * centred, axis=1) / dim
        rstd = 1.0 / tl.sqrt(variance + tl.load(eps_ptr).to(x.dtype))
        y = centred * rstd[:, None]
        if HAS_LN_WEIGHT:
            weight = tl.load(ln_weight_ptr + cols, mask=col_ok, other=0.0)
            y = y * (weight.to(tl.float64) if ACC_FP64 else weight.to(tl.float32))[None, :]
        if HAS_LN_BIAS:
            bias = tl.load(ln_bias_ptr + cols, mask=col_ok, other=0.0)
            y = y + (bias.to(tl.float64) if ACC_FP64 else bias.to(tl.float32))[None, :]
        if SAVE_STATS:
            tl.store(mean_ptr + rows, mean, mask=row_ok)
            tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    else:
        y = x
    # A row with an id outside its table is never read, and is NaN, as in the GPT forward.
    y = tl.where(ok[:, None], y, float("nan"))
    if HAS_DROPOUT:
        keep = dropout_keep(dropout_seed_ptr, rows, 0, dim, dropout_threshold, BLOCK_D, ALIGNED4)
        y = tl.where(keep, y * tl.load(dropout_scale_ptr).to(y.dtype), 0.0)
    tl.store(out_ptr + rows[:, None] * dim + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def encoder_embedding_bwd_kernel(
    grad_sum_ptr,                # [B*T, D], contiguous, gradient dtype: d loss / d (the three rows' sum)
    partial_weight_ptr, partial_bias_ptr,  # [programs, D] accumulator dtype, when HAS_LAYER_NORM
    grad_out_ptr, stride_grad_b, stride_grad_t, stride_grad_d,
    mean_ptr, rstd_ptr,
    ids_ptr, stride_ids_b, stride_ids_t,
    position_ids_ptr, stride_pos_b, stride_pos_t,
    type_ids_ptr, stride_type_b, stride_type_t,
    word_ptr, stride_word, position_ptr, stride_position, type_ptr, stride_type,
    ln_weight_ptr,
    n_rows, seq_len, dim, vocab_size, num_positions, num_types, past_length, pad_id,
    dropout_seed_ptr, dropout_scale_ptr, dropout_threshold,
    HAS_POSITION_IDS: tl.constexpr, POSITIONS_FROM_PADDING: tl.constexpr, HAS_TYPE_TABLE: tl.constexpr,
    HAS_TYPE_IDS: tl.constexpr, HAS_LAYER_NORM: tl.constexpr, HAS_LN_WEIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ALIGNED4: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Each program takes row blocks pid, pid + programs, ... and keeps its LayerNorm weight and
    bias gradient sums in registers, written once to its row of the partial sums."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    if ACC_FP64:
        weight_sum = tl.zeros([BLOCK_D], dtype=tl.float64)
        bias_sum = tl.zeros([BLOCK_D], dtype=tl.float64)
    else:
        weight_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        bias_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_LN_WEIGHT:
        weight = tl.load(ln_weight_ptr + cols, mask=col_ok, other=0.0)
        weight = weight.to(tl.float64) if ACC_FP64 else weight.to(tl.float32)
    for block in range(pid, tl.cdiv(n_rows, BLOCK_N), programs):
        rows = tl.arange(0, BLOCK_N).to(tl.int64) + block * BLOCK_N  # (block: an int32 loop counter)
        row_ok = rows < n_rows
        batch, step, token, position, token_type = _rows_and_ids(
            rows, row_ok, ids_ptr, stride_ids_b, stride_ids_t, position_ids_ptr, stride_pos_b, stride_pos_t,
            type_ids_ptr, stride_type_b, stride_type_t, seq_len, past_length, pad_id,
            HAS_POSITION_IDS, POSITIONS_FROM_PADDING, HAS_TYPE_TABLE, HAS_TYPE_IDS, BLOCK_T)
        # Rows with a bad id (check_ids=False) add nothing to any gradient, as in the GPT backward.
        ok = row_ok & (token >= 0) & (token < vocab_size) & (position >= 0) & (position < num_positions) & \
            (token_type >= 0) & (token_type < num_types)
        mask = ok[:, None] & col_ok[None, :]
        grad = tl.load(grad_out_ptr + (batch * stride_grad_b + step * stride_grad_t)[:, None] +
                       cols[None, :] * stride_grad_d, mask=mask, other=0.0)
        grad = grad.to(tl.float64) if ACC_FP64 else grad.to(tl.float32)
        if HAS_DROPOUT:
            keep = dropout_keep(dropout_seed_ptr, rows, 0, dim, dropout_threshold, BLOCK_D, ALIGNED4)
            grad = tl.where(keep, grad * tl.load(dropout_scale_ptr).to(grad.dtype), 0.0)
        if HAS_LAYER_NORM:
            x = _row_sum(token, position, token_type, ok, cols, col_ok, word_ptr, stride_word, position_ptr,
                         stride_position, type_ptr, stride_type, HAS_TYPE_TABLE, ACC_FP64)
            mean = tl.load(mean_ptr + rows, mask=ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=ok, other=0.0)
            normed = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            weight_sum += tl.sum(grad * normed, axis=0)
            bias_sum += tl.sum(grad, axis=0)
            scaled = grad * weight[None, :] if HAS_LN_WEIGHT else grad
            # d x = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g the gradient of x_hat.
            mean_scaled = tl.sum(scaled, axis=1) / dim
            mean_projection = tl.sum(scaled * normed, axis=1) / dim
            grad_sum = (scaled - mean_scaled[:, None] - normed * mean_projection[:, None]) * rstd[:, None]
            grad_sum = tl.where(mask, grad_sum, 0.0)
        else:
            grad_sum = grad
        tl.store(grad_sum_ptr + rows[:, None] * dim + cols[None, :], grad_sum.to(grad_sum_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
    if HAS_LAYER_NORM:
        tl.store(partial_weight_ptr + pid * dim + cols, weight_sum, mask=col_ok)
        tl.store(partial_bias_ptr + pid * dim + cols, bias_sum, mask=col_ok)

"""Forward kernel: out[b, t, :] = dropout(s * token_weight[ids[b, t], :] + position_weight[pos[b, t], :]),
with s = 1 unless a token scale is given (BioGPT's sqrt(D)).

One launch. Each program owns a tile of BLOCK_N flattened (b, t) rows by BLOCK_D columns, so
every output element is written by exactly one program and the output needs no zero-fill.
The op moves B*T*D table elements in and B*T*D out; anything else (ids, positions) is noise.
"""
import triton
import triton.language as tl

from .dropout import dropout_keep


@triton.jit
def input_embedding_fwd_kernel(
    out_ptr,                     # [B*T, D], contiguous, table dtype
    ids_ptr, stride_ids_b, stride_ids_t,
    position_ids_ptr, stride_pos_b, stride_pos_t,   # unused unless HAS_POSITION_IDS
    token_weight_ptr, stride_token_row,
    position_weight_ptr, stride_position_row,
    n_rows, seq_len, dim, vocab_size, num_positions, past_length,
    token_row_offset, token_rows,  # unused unless TOKEN_SHARD: the table holds rows [offset, offset + rows)
    dropout_seed_ptr, dropout_scale_ptr, dropout_threshold,   # unused unless HAS_DROPOUT
    id_flag_ptr,                 # int64 [9], unused unless CHECK_IDS (layout: tokemb_fast/id_check.py)
    token_scale_ptr,             # fp64 [1], unused unless HAS_TOKEN_SCALE: out = scale * tok + pos
    HAS_POSITION_IDS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    CHECK_IDS: tl.constexpr,
    HAS_TOKEN_SCALE: tl.constexpr,
    TOKEN_SHARD: tl.constexpr,   # tensor parallelism: ids of other ranks' rows contribute zero here
    ADD_POSITIONS: tl.constexpr,  # False on all but one rank of a tensor-parallel group
    ALIGNED4: tl.constexpr,      # D % 4 == 0: one Philox evaluation per 4 columns (see dropout.py)
    ACC_FP64: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,          # output elements per program; BLOCK_N = TILE // BLOCK_D rows
):
    BLOCK_N: tl.constexpr = TILE // BLOCK_D  # the launcher keeps BLOCK_D <= TILE
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    # int64 from the start: B*T*D and V*D may exceed 2^31 elements.
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_start = pid_d.to(tl.int64) * BLOCK_D
    cols = col_start + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < dim

    # ids may be a strided view ([T] ids arrive as B=1 with stride_ids_b=0), so index by (b, t)
    # instead of asking the caller for a contiguous copy.
    batch = rows // seq_len
    step = rows - batch * seq_len
    token = tl.load(ids_ptr + batch * stride_ids_b + step * stride_ids_t, mask=row_ok, other=0).to(tl.int64)
    if HAS_POSITION_IDS:
        position = tl.load(position_ids_ptr + batch * stride_pos_b + step * stride_pos_t,
                           mask=row_ok, other=0).to(tl.int64)
    else:
        position = step + past_length

    # An id outside its table is never dereferenced, and its output row becomes NaN so the
    # mistake is loud. With CHECK_IDS the host is also told, through the flag, without waiting
    # for this kernel: it raises later (tokemb_fast/id_check.py).
    token_ok = (token >= 0) & (token < vocab_size)
    position_ok = (position >= 0) & (position < num_positions)
    both_ok = token_ok & position_ok
    if CHECK_IDS:
        # One D-block of programs reports (the others see the same ids); only programs that
        # saw a bad id touch the flag, so a correct call costs two reductions per program.
        # Atomics throughout: concurrent programs agree on the lowest and highest bad id.
        if pid_d == 0:
            bad_token = row_ok & ~token_ok
            if tl.max(bad_token.to(tl.int32), axis=0) > 0:
                tl.atomic_min(id_flag_ptr + 0, tl.min(tl.where(bad_token & (token < 0), token, 0), axis=0))
                tl.atomic_max(id_flag_ptr + 1, tl.max(tl.where(bad_token & (token >= 0), token, 0), axis=0))
                tl.atomic_xchg(id_flag_ptr + 4, tl.zeros([], dtype=tl.int64) + vocab_size)
            if HAS_POSITION_IDS:  # default positions were checked on the host (past_length + T)
                bad_position = row_ok & ~position_ok
                if tl.max(bad_position.to(tl.int32), axis=0) > 0:
                    tl.atomic_min(id_flag_ptr + 2,
                                  tl.min(tl.where(bad_position & (position < 0), position, 0), axis=0))
                    tl.atomic_max(id_flag_ptr + 3,
                                  tl.max(tl.where(bad_position & (position >= 0), position, 0), axis=0))
                    tl.atomic_xchg(id_flag_ptr + 5, tl.zeros([], dtype=tl.int64) + num_positions)

    mask = row_ok[:, None] & col_ok[None, :]
    load_mask = mask & both_ok[:, None]
    if TOKEN_SHARD:
        # Ids are checked against the whole vocabulary (vocab_size) on every rank, so each rank
        # reports the same bad id; only this rank's rows are read. The group's sum adds each
        # token row once, from the rank that holds it.
        token = token - token_row_offset
        token_mask = load_mask & ((token >= 0) & (token < token_rows))[:, None]
    else:
        token_mask = load_mask
    tok = tl.load(token_weight_ptr + token[:, None] * stride_token_row + cols[None, :], mask=token_mask, other=0.0)
    if ADD_POSITIONS:
        pos = tl.load(position_weight_ptr + position[:, None] * stride_position_row + cols[None, :],
                      mask=load_mask, other=0.0)
    else:
        pos = tl.zeros_like(tok)
    # Sum in fp32 (fp64 for fp64 tables) and round once, as torch does for a half-precision add.
    if ACC_FP64:
        tok = tok.to(tl.float64)
        pos = pos.to(tl.float64)
    else:
        tok = tok.to(tl.float32)
        pos = pos.to(tl.float32)
    if HAS_TOKEN_SCALE:
        # Launched without FMA contraction (NO_FMA in triton_ops.py): the product is rounded, then
        # the sum, in the accumulator dtype, as PyTorch and the interpreter round them.
        tok = tok * tl.load(token_scale_ptr).to(tok.dtype)
    acc = tok + pos
    acc = tl.where(both_ok[:, None], acc, float("nan"))
    out_offsets = rows[:, None] * dim + cols[None, :]
    if HAS_DROPOUT:
        # Scaled in the accumulator dtype and rounded once; the mask is never stored: the
        # backward regenerates it from the same (seed, element index).
        keep = dropout_keep(dropout_seed_ptr, rows, col_start, dim, dropout_threshold, BLOCK_D, ALIGNED4)
        acc = tl.where(keep, acc * tl.load(dropout_scale_ptr).to(acc.dtype), 0.0)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)

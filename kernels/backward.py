"""Backward kernels: a deterministic, single-write embedding gradient.

grad_table[r, :] = sum of grad_out[b, t, :] over every (b, t) whose key (token id, or position)
is r. The same kernels serve the token table and the position table.

Why not atomic_add: float atomics make the summation order depend on scheduling, so the
gradient changes in its last bits from run to run; they also need an fp32 scratch table for
bf16/fp16 (no native half-precision atomics at this width) and a zero-fill pass first.

Instead the caller sorts the keys once (a stable device sort, no host sync; int64 ids as the
32-bit keys of sort_keys_kernel where the table allows), so the entries of each table row form one
contiguous *segment* of the sorted order. segment_bounds_and_chunks_kernel finds where each row's
segment starts (one binary search per row, all in parallel). Each program of
embedding_grad_rows_kernel then owns a tile of table rows, sums the grad rows of each segment in a
fixed order in fp32 registers, and writes every table row exactly once (untouched rows get zeros).

One very frequent key (all ids equal, or Zipf's head) must not serialise a whole batch in one
program. So the sorted order is also cut into CHUNK-sized pieces, and the same launch sums each
piece that lies inside a single segment, in parallel. In the row kernel, short segments are
summed for all the tile's rows at once, one entry per step; a long one is summed by its row with
LONG_TILE-wide tile loads of its leading entries, of the partial sums of the pieces it covers, and
of its trailing entries: a few dependent steps whatever the distribution. The summation order
depends only on the sorted order, which is deterministic.

Default positions (arange(T) + past_length, shared by every batch row) need no sort: the sorted
order is known in closed form, which the IMPLICIT_POSITIONS variant computes instead of loading.
"""
import triton
import triton.language as tl

from .dropout import dropout_keep


@triton.jit
def _sorted_entry(j, keys_ptr, order_ptr, mask, batch, seq_len, past_length,
                  IMPLICIT_POSITIONS: tl.constexpr):
    """Key and (b, t) source of the j-th entry of the sorted order."""
    if IMPLICIT_POSITIONS:
        # Sorted by position, batch rows in order: entry j is (b, t) = (j % B, j // B).
        step = j // batch
        b = j - step * batch
        key = step + past_length
    else:
        key = tl.load(keys_ptr + j, mask=mask, other=-1).to(tl.int64)
        flat = tl.load(order_ptr + j, mask=mask, other=0).to(tl.int64)
        b = flat // seq_len
        step = flat - b * seq_len
    return key, b, step


@triton.jit
def _load_grad(grad_out_ptr, b, step, col_start, mask, stride_grad_b, stride_grad_t, stride_grad_d, seq_len, dim,
               dropout_seed_ptr, dropout_scale_ptr, dropout_threshold,
               BLOCK_D: tl.constexpr, HAS_DROPOUT: tl.constexpr, ALIGNED4: tl.constexpr):
    """grad_out[b, step, col_start:col_start + BLOCK_D] as a [len(b), BLOCK_D] tile, times the
    forward's dropout mask and scale (regenerated from the seed) when the forward had dropout."""
    cols = col_start + tl.arange(0, BLOCK_D)
    src = grad_out_ptr + (b * stride_grad_b + step * stride_grad_t)[:, None] + cols[None, :] * stride_grad_d
    grad = tl.load(src, mask=mask, other=0.0)
    if HAS_DROPOUT:
        keep = dropout_keep(dropout_seed_ptr, b * seq_len + step, col_start, dim, dropout_threshold, BLOCK_D,
                            ALIGNED4)
        if grad.dtype != tl.float64:
            grad = grad.to(tl.float32)
        grad = tl.where(keep, grad * tl.load(dropout_scale_ptr).to(grad.dtype), 0.0)
    return grad


@triton.jit
def sort_keys_kernel(
    sort_keys_ptr,               # [B * T] int32, contiguous: what the backward sorts
    keys_ptr, stride_keys_b, stride_keys_t,  # [B, T] int64 ids (or position ids), any strides
    n_entries, seq_len, num_rows,
    BLOCK: tl.constexpr,
):
    # The radix sort takes half the passes on 32-bit keys, but a plain cast would wrap an unchecked
    # bad id (check_ids=False: 2^32 + 3 becomes 3) onto a real row, which would then receive its
    # gradient. Clamped to -1 or num_rows first, every bad id stays outside 0 .. num_rows - 1, where
    # no row's segment looks. Reading [B, T] with its strides also spares the flattening copy of
    # expanded position ids.
    entries = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = entries < n_entries
    b = entries // seq_len
    step = entries - b * seq_len
    key = tl.load(keys_ptr + b * stride_keys_b + step * stride_keys_t, mask=live, other=0).to(tl.int64)
    key = tl.minimum(tl.maximum(key, -1), num_rows)
    tl.store(sort_keys_ptr + entries, key.to(tl.int32), mask=live)


@triton.jit
def _lower_bounds(bounds_ptr, sorted_keys_ptr, n_entries, num_rows, block, BLOCK: tl.constexpr):
    """bounds[r] = first sorted index with key >= r, for rows r of this block: a vector lower_bound,
    one lane per table row. Done once for all rows, fully parallel, rather than in the row kernel,
    where each program would wait on a chain of dependent loads."""
    target = block * BLOCK + tl.arange(0, BLOCK)
    lo = tl.zeros_like(target)
    hi = tl.zeros_like(target) + n_entries
    # Each halving leaves at most half of [lo, hi), so bit_length(n) steps empty any range [0, n];
    # the loop counts them in integers (a float log2 would bring multiply-adds into a kernel that
    # must have none: the chunk sums). Extra steps with lo == hi load nothing. (Built from a
    # tensor: Triton turns an integer argument equal to 1 into a constexpr.)
    remaining = tl.max(hi, axis=0)
    search_steps = 0
    while remaining > 0:
        remaining = remaining // 2
        search_steps += 1
    for _ in range(search_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        key = tl.load(sorted_keys_ptr + mid, mask=active, other=0).to(tl.int64)
        hi = tl.where(active & (key >= target), mid, hi)
        lo = tl.where(active & (key < target), mid + 1, lo)
    tl.store(bounds_ptr + target, lo, mask=target <= num_rows)


@triton.jit
def _segment_bounds(rows, row_ok, bounds_ptr, batch, seq_len, past_length, IMPLICIT_POSITIONS: tl.constexpr):
    """[start, end) of each row's segment in the sorted order."""
    if IMPLICIT_POSITIONS:
        step = tl.minimum(tl.maximum(rows - past_length, 0), seq_len)
        start = step * batch
        end = tl.minimum(step + 1, seq_len) * batch
        end = tl.where((rows >= past_length) & (rows < past_length + seq_len), end, start)
    else:
        start = tl.load(bounds_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        end = tl.load(bounds_ptr + rows + 1, mask=row_ok, other=0).to(tl.int64)
    return start, end


@triton.jit
def _chunk_sum(chunk_sums_ptr, chunk, col_start, grad_out_ptr, stride_grad_b, stride_grad_t, stride_grad_d,
               keys_ptr, order_ptr, n_entries, dim, batch, seq_len, past_length,
               dropout_seed_ptr, dropout_scale_ptr, dropout_threshold, IMPLICIT_POSITIONS: tl.constexpr,
               ACC_FP64: tl.constexpr, HAS_DROPOUT: tl.constexpr, ALIGNED4: tl.constexpr, CHUNK: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """chunk_sums[chunk, cols] = the sum of the chunk's CHUNK sorted entries, if they share a key."""
    cols = col_start + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    first = chunk * CHUNK
    last = first + CHUNK - 1
    key_first, _b0, _t0 = _sorted_entry(first, keys_ptr, order_ptr, first < n_entries, batch, seq_len, past_length,
                                        IMPLICIT_POSITIONS)
    key_last, _b1, _t1 = _sorted_entry(last, keys_ptr, order_ptr, last < n_entries, batch, seq_len, past_length,
                                       IMPLICIT_POSITIONS)
    # Only a chunk inside one segment is ever read back (see the row kernel), so the others do
    # nothing. Only full chunks get here, so both ends above are in range.
    if key_first == key_last:
        entries = first + tl.arange(0, CHUNK)
        _key, b, step = _sorted_entry(entries, keys_ptr, order_ptr, entries < n_entries, batch, seq_len,
                                      past_length, IMPLICIT_POSITIONS)
        tile = _load_grad(grad_out_ptr, b, step, col_start, (entries < n_entries)[:, None] & col_ok[None, :],
                          stride_grad_b, stride_grad_t, stride_grad_d, seq_len, dim,
                          dropout_seed_ptr, dropout_scale_ptr, dropout_threshold, BLOCK_D, HAS_DROPOUT, ALIGNED4)
        if ACC_FP64:
            total = tl.sum(tile.to(tl.float64), axis=0)
        else:
            total = tl.sum(tile.to(tl.float32), axis=0)
        tl.store(chunk_sums_ptr + chunk * dim + cols, total, mask=col_ok)


@triton.jit
def segment_bounds_and_chunks_kernel(
    bounds_ptr,                  # [num_rows + 1]: bounds[r] = first sorted index with key >= r
    chunk_sums_ptr,              # [n_entries // CHUNK, D], accumulator dtype
    grad_out_ptr, stride_grad_b, stride_grad_t, stride_grad_d,
    keys_ptr, order_ptr,
    n_entries, num_rows, dim, batch, seq_len, past_length,
    dropout_seed_ptr, dropout_scale_ptr, dropout_threshold,
    HAS_BOUNDS: tl.constexpr,
    HAS_CHUNKS: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    IMPLICIT_POSITIONS: tl.constexpr,
    ACC_FP64: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ALIGNED4: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The two preparations of the row kernel's inputs need the sort but not each other's results,
    # so they share one launch (one fewer kernel per table: host time per call, and the
    # latency-bound search overlaps the chunk sums on the GPU). The first
    # cdiv(num_rows + 1, SEARCH_BLOCK) programs of the first grid column search a block of rows
    # each; the programs after them sum one chunk's columns each.
    program = tl.program_id(0).to(tl.int64)
    col_block = tl.program_id(1)
    chunk = program
    if HAS_BOUNDS:
        # cdiv(num_rows + 1, SEARCH_BLOCK) without the + 1: num_rows may be an int32 near its limit.
        search_programs = num_rows // SEARCH_BLOCK + 1
        chunk = program - search_programs
        if program < search_programs:
            if col_block == 0:
                _lower_bounds(bounds_ptr, keys_ptr, n_entries, num_rows, program, SEARCH_BLOCK)
    if HAS_CHUNKS:
        if (chunk >= 0) & (chunk < n_entries // CHUNK):
            _chunk_sum(chunk_sums_ptr, chunk, col_block.to(tl.int64) * BLOCK_D, grad_out_ptr, stride_grad_b,
                       stride_grad_t, stride_grad_d, keys_ptr, order_ptr, n_entries, dim, batch, seq_len,
                       past_length, dropout_seed_ptr, dropout_scale_ptr, dropout_threshold, IMPLICIT_POSITIONS,
                       ACC_FP64, HAS_DROPOUT, ALIGNED4, CHUNK, BLOCK_D)


@triton.jit
def _add_entries(acc, first, last, col_start, col_ok, grad_out_ptr, stride_grad_b, stride_grad_t, stride_grad_d,
                 keys_ptr, order_ptr, batch, seq_len, past_length, dim, dropout_seed_ptr, dropout_scale_ptr,
                 dropout_threshold, IMPLICIT_POSITIONS: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, ALIGNED4: tl.constexpr):
    """acc[r] += the grad rows of sorted entries first[r] .. last[r] - 1, one entry per step, in order."""
    for i in range(0, tl.max(last - first, axis=0)):
        entry = first + i
        live = entry < last
        _key, b, step = _sorted_entry(entry, keys_ptr, order_ptr, live, batch, seq_len, past_length,
                                      IMPLICIT_POSITIONS)
        acc += _load_grad(grad_out_ptr, b, step, col_start, live[:, None] & col_ok[None, :], stride_grad_b,
                          stride_grad_t, stride_grad_d, seq_len, dim, dropout_seed_ptr, dropout_scale_ptr,
                          dropout_threshold, BLOCK_D, HAS_DROPOUT, ALIGNED4).to(acc.dtype)
    return acc


@triton.jit
def _sum_entry_tiles(first, last, col_start, col_ok, grad_out_ptr, stride_grad_b, stride_grad_t, stride_grad_d,
                     keys_ptr, order_ptr, batch, seq_len, past_length, dim, dropout_seed_ptr, dropout_scale_ptr,
                     dropout_threshold, IMPLICIT_POSITIONS: tl.constexpr, ACC_FP64: tl.constexpr,
                     TILE_ENTRIES: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     ALIGNED4: tl.constexpr):
    """Sum of the grad rows of sorted entries first .. last - 1 (scalars), TILE_ENTRIES rows per
    load: the loads of a tile are in flight together, so a segment costs a few dependent steps."""
    if ACC_FP64:
        total = tl.zeros([BLOCK_D], dtype=tl.float64)
    else:
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for tile_start in range(first, last, TILE_ENTRIES):
        entries = tile_start + tl.arange(0, TILE_ENTRIES)
        live = entries < last
        _key, b, step = _sorted_entry(entries, keys_ptr, order_ptr, live, batch, seq_len, past_length,
                                      IMPLICIT_POSITIONS)
        tile = _load_grad(grad_out_ptr, b, step, col_start, live[:, None] & col_ok[None, :], stride_grad_b,
                          stride_grad_t, stride_grad_d, seq_len, dim, dropout_seed_ptr, dropout_scale_ptr,
                          dropout_threshold, BLOCK_D, HAS_DROPOUT, ALIGNED4)
        total += tl.sum(tile.to(total.dtype), axis=0)
    return total


@triton.jit
def _sum_chunk_tiles(first_chunk, n_chunks, cols, col_ok, chunk_sums_ptr, dim, TILE_ENTRIES: tl.constexpr):
    """Sum of the partial sums of chunks first_chunk .. first_chunk + n_chunks - 1, TILE_ENTRIES per load."""
    total = tl.zeros(cols.shape, dtype=chunk_sums_ptr.dtype.element_ty)
    for offset in range(0, n_chunks, TILE_ENTRIES):
        lanes = offset + tl.arange(0, TILE_ENTRIES)
        src = chunk_sums_ptr + (first_chunk + lanes)[:, None] * dim + cols[None, :]
        total += tl.sum(tl.load(src, mask=(lanes < n_chunks)[:, None] & col_ok[None, :], other=0.0), axis=0)
    return total


@triton.jit
def _add_long_segments(acc, start, end, col_start, cols, col_ok, grad_out_ptr, stride_grad_b, stride_grad_t,
                       stride_grad_d, keys_ptr, order_ptr, chunk_sums_ptr, batch, seq_len, past_length, dim,
                       dropout_seed_ptr, dropout_scale_ptr, dropout_threshold, IMPLICIT_POSITIONS: tl.constexpr,
                       ACC_FP64: tl.constexpr, HAS_DROPOUT: tl.constexpr, ALIGNED4: tl.constexpr,
                       CHUNK: tl.constexpr, LONG_TILE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """acc[r] += the sum of sorted entries start[r] .. end[r] - 1 for each lane r with a non-empty
    range (the long segments; the caller empties the others), lane by lane: head entries, then the
    chunk partials the range covers, then tail entries, LONG_TILE per load."""
    if tl.max(end - start, axis=0) > 0:
        lanes = tl.arange(0, ROWS)
        for r in range(0, ROWS):
            row_start = tl.sum(tl.where(lanes == r, start, 0), axis=0)
            row_end = tl.sum(tl.where(lanes == r, end, 0), axis=0)
            if row_end > row_start:
                first_chunk = (row_start + CHUNK - 1) // CHUNK
                end_chunk = row_end // CHUNK
                has_chunks = end_chunk > first_chunk
                head_end = tl.where(has_chunks, first_chunk * CHUNK, row_end)
                tail_start = tl.where(has_chunks, end_chunk * CHUNK, row_end)
                total = _sum_entry_tiles(row_start, head_end, col_start, col_ok, grad_out_ptr, stride_grad_b,
                                         stride_grad_t, stride_grad_d, keys_ptr, order_ptr, batch, seq_len,
                                         past_length, dim, dropout_seed_ptr, dropout_scale_ptr, dropout_threshold,
                                         IMPLICIT_POSITIONS, ACC_FP64, LONG_TILE, BLOCK_D, HAS_DROPOUT, ALIGNED4)
                total += _sum_chunk_tiles(first_chunk, tl.where(has_chunks, end_chunk - first_chunk, 0), cols,
                                          col_ok, chunk_sums_ptr, dim, LONG_TILE).to(total.dtype)
                total += _sum_entry_tiles(tail_start, row_end, col_start, col_ok, grad_out_ptr, stride_grad_b,
                                          stride_grad_t, stride_grad_d, keys_ptr, order_ptr, batch, seq_len,
                                          past_length, dim, dropout_seed_ptr, dropout_scale_ptr, dropout_threshold,
                                          IMPLICIT_POSITIONS, ACC_FP64, LONG_TILE, BLOCK_D, HAS_DROPOUT, ALIGNED4)
                acc += tl.where((lanes == r)[:, None], total[None, :], 0.0)
    return acc


@triton.jit
def embedding_grad_rows_kernel(
    grad_table_ptr, stride_grad_table_row,     # [num_rows, D], table dtype; every row written
    grad_out_ptr, stride_grad_b, stride_grad_t, stride_grad_d,
    keys_ptr, order_ptr, bounds_ptr, chunk_sums_ptr,
    num_rows, dim, batch, seq_len, past_length,
    padding_idx,                 # this row's gradient is zero (nn.Embedding's padding_idx); -1: none
    count_divisor,               # SCALE_BY_FREQ: entries per occurrence (B when positions are shared)
    dropout_seed_ptr, dropout_scale_ptr, dropout_threshold,
    grad_scale_ptr,              # fp64 [1], unused unless HAS_GRAD_SCALE: every row times it (the token scale)
    IMPLICIT_POSITIONS: tl.constexpr,
    ACC_FP64: tl.constexpr,
    SCALE_BY_FREQ: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ALIGNED4: tl.constexpr,
    CHUNK: tl.constexpr,
    SHORT: tl.constexpr,         # segments up to this long are summed across the tile's rows at once
    LONG_TILE: tl.constexpr,     # entries (or chunk partials) per load when a row sums a longer one
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col_start = tl.program_id(1).to(tl.int64) * BLOCK_D
    cols = col_start + tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    col_ok = cols < dim

    start, end = _segment_bounds(rows, row_ok, bounds_ptr, batch, seq_len, past_length, IMPLICIT_POSITIONS)
    # nn.Embedding's scale_grad_by_freq divides by the id's count in the looked-up tensor. With
    # positions shared by the batch, that tensor has T entries while the segment has B per
    # occurrence, hence count_divisor.
    occurrences = (end - start) // count_divisor
    # The padding row's gradient is zero: treat its segment as empty (often the longest one).
    end = tl.where(rows == padding_idx, start, end)
    if ACC_FP64:
        acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float64)
    else:
        acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)

    # Most segments are short (uniform ids over a large vocabulary: 0, 1 or 2 entries). Those are
    # summed for all the tile's rows at once, one entry per step.
    short = end - start <= SHORT
    acc = _add_entries(acc, start, tl.where(short, end, start), col_start, col_ok, grad_out_ptr, stride_grad_b,
                       stride_grad_t, stride_grad_d, keys_ptr, order_ptr, batch, seq_len, past_length, dim,
                       dropout_seed_ptr, dropout_scale_ptr, dropout_threshold, IMPLICIT_POSITIONS, BLOCK_D,
                       HAS_DROPOUT, ALIGNED4)
    # A longer segment is summed by its row alone, LONG_TILE entries per load: its entries before
    # the first whole chunk (head), the chunk sums' partials of the whole chunks it covers,
    # its entries after the last whole chunk (tail). Fixed order, so the result is deterministic,
    # and about 2*CHUNK/LONG_TILE + n/(CHUNK*LONG_TILE) dependent steps for n entries, whatever the
    # id distribution.
    acc = _add_long_segments(acc, start, tl.where(short, start, end), col_start, cols, col_ok, grad_out_ptr,
                             stride_grad_b, stride_grad_t, stride_grad_d, keys_ptr, order_ptr, chunk_sums_ptr,
                             batch, seq_len, past_length, dim, dropout_seed_ptr, dropout_scale_ptr,
                             dropout_threshold, IMPLICIT_POSITIONS, ACC_FP64, HAS_DROPOUT, ALIGNED4, CHUNK,
                             LONG_TILE, ROWS, BLOCK_D)

    if HAS_GRAD_SCALE:
        acc = acc * tl.load(grad_scale_ptr).to(acc.dtype)
    if SCALE_BY_FREQ:
        acc = acc / tl.maximum(occurrences, 1).to(acc.dtype)[:, None]
    dst = grad_table_ptr + rows[:, None] * stride_grad_table_row + cols[None, :]
    tl.store(dst, acc.to(grad_table_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def embedding_grad_scatter_kernel(
    grad_table_ptr, stride_grad_table_row,     # [num_rows, D], table dtype, zero-filled before this launch
    grad_out_ptr, stride_grad_b, stride_grad_t, stride_grad_d,
    keys_ptr, order_ptr, bounds_ptr, chunk_sums_ptr,
    n_entries, num_rows, dim, batch, seq_len,
    padding_idx,                 # as embedding_grad_rows_kernel's
    count_divisor,
    dropout_seed_ptr, dropout_scale_ptr, dropout_threshold,
    grad_scale_ptr,
    ACC_FP64: tl.constexpr,
    SCALE_BY_FREQ: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ALIGNED4: tl.constexpr,
    CHUNK: tl.constexpr,
    SHORT: tl.constexpr,         # a power of two: the entries looked ahead to find a short segment's end
    LONG_TILE: tl.constexpr,
    ENTRIES: tl.constexpr,       # sorted entries per program
    BLOCK_D: tl.constexpr,
):
    """The same gradient as embedding_grad_rows_kernel, organised by sorted entry instead of by
    table row, for a table that was zero-filled first: a program owns ENTRIES consecutive sorted
    entries, and each entry that starts a segment (its key differs from the previous entry's) sums
    that segment, in the same order as the row kernel, and writes its row. Rows nobody looked up
    keep the fill's zeros, so this kernel's work scales with B*T, not with the table: the fill runs
    at the device's write bandwidth with no dependent loads, where the row kernel's programs each
    wait on bounds -> order -> gradient loads before their first store (at gpt2-124M, 18,849
    programs of 8 rows, mostly untouched ones). Every row is still written by one program only, in a
    fixed order: deterministic."""
    entries = tl.program_id(0).to(tl.int64) * ENTRIES + tl.arange(0, ENTRIES)
    col_start = tl.program_id(1).to(tl.int64) * BLOCK_D
    cols = col_start + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    live = entries < n_entries
    key = tl.load(keys_ptr + entries, mask=live, other=-1).to(tl.int64)
    previous = tl.load(keys_ptr + entries - 1, mask=live & (entries > 0), other=-1).to(tl.int64)
    # Unchecked bad ids (check_ids=False) sort before row 0 or after the last row: they add nothing
    # and, above all, are never used as a row to write or a bound to read.
    head = live & ((entries == 0) | (previous != key)) & (key >= 0) & (key < num_rows)
    # A short segment's end from the next SHORT keys, loaded beside the key (no dependent load):
    # sorted keys, so the entries equal to this one come right after it.
    ahead = entries[:, None] + 1 + tl.arange(0, SHORT)[None, :]
    equal_ahead = tl.sum((tl.load(keys_ptr + ahead, mask=ahead < n_entries, other=-1).to(tl.int64)
                          == key[:, None]).to(tl.int32), axis=1)
    short = equal_ahead < SHORT
    # Only a longer one reads its end from the bounds.
    long_end = tl.load(bounds_ptr + key + 1, mask=head & ~short, other=0).to(tl.int64)
    end = tl.where(short, entries + 1 + equal_ahead, long_end)
    occurrences = (end - entries) // count_divisor
    # Heads of the padding row sum nothing and write nothing (its gradient stays the fill's zero).
    write = head & (key != padding_idx)
    end = tl.where(write, end, entries)
    if ACC_FP64:
        acc = tl.zeros([ENTRIES, BLOCK_D], dtype=tl.float64)
    else:
        acc = tl.zeros([ENTRIES, BLOCK_D], dtype=tl.float32)
    acc = _add_entries(acc, entries, tl.where(short, end, entries), col_start, col_ok, grad_out_ptr,
                       stride_grad_b, stride_grad_t, stride_grad_d, keys_ptr, order_ptr, batch, seq_len, 0, dim,
                       dropout_seed_ptr, dropout_scale_ptr, dropout_threshold, False, BLOCK_D, HAS_DROPOUT,
                       ALIGNED4)
    acc = _add_long_segments(acc, entries, tl.where(short, entries, end), col_start, cols, col_ok, grad_out_ptr,
                             stride_grad_b, stride_grad_t, stride_grad_d, keys_ptr, order_ptr, chunk_sums_ptr,
                             batch, seq_len, 0, dim, dropout_seed_ptr, dropout_scale_ptr, dropout_threshold, False,
                             ACC_FP64, HAS_DROPOUT, ALIGNED4, CHUNK, LONG_TILE, ENTRIES, BLOCK_D)
    if HAS_GRAD_SCALE:
        acc = acc * tl.load(grad_scale_ptr).to(acc.dtype)
    if SCALE_BY_FREQ:
        acc = acc / tl.maximum(occurrences, 1).to(acc.dtype)[:, None]
    dst = grad_table_ptr + tl.where(write, key, 0)[:, None] * stride_grad_table_row + cols[None, :]
    tl.store(dst, acc.to(grad_table_ptr.dtype.element_ty), mask=write[:, None] & col_ok[None, :])

"""Dropout masks regenerated from a seed instead of stored.

Element i of the [B*T, D] output (i = (b*T + t)*D + d) gets 32 random bits: word i % 4 of
Philox4x32-10 at counter i // 4 under the call's seed. It is kept when those bits are >=
floor(p * 2^32) (probability 1 - p), then multiplied by 1/(1-p). Forward and backward kernels
evaluate the same function of (seed, i), so they agree bit for bit and no B*T*D mask exists.

One Philox evaluation yields four words. When D is a multiple of 4, four adjacent columns share
one evaluation (ALIGNED4): a quarter of the integer work, which matters because this op is
memory-bound and a Philox per element would cost about as much as moving the element.

The seed is a 1-element int64 device tensor and the scale a 1-element fp64 one: drawing the seed
on the device needs no host sync (and a CUDA graph replays fresh seeds), and Triton would pass a
Python float scale as fp32, making fp64 tables' dropout inexact.
"""
import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed_ptr, rows, col_start, dim, threshold, BLOCK_D: tl.constexpr, ALIGNED4: tl.constexpr):
    """Keep-mask of the [len(rows), BLOCK_D] tile of elements (rows, col_start + arange(BLOCK_D)),
    rows being flat (b*T + t) indices. ALIGNED4 needs dim and col_start divisible by 4."""
    seed = tl.load(seed_ptr)
    if ALIGNED4:
        groups = rows[:, None] * (dim // 4) + (col_start // 4 + tl.arange(0, BLOCK_D // 4))[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, groups)
        # Interleave so that column c takes word c % 4 of its group (join stacks on a new last axis).
        bits = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [rows.shape[0], BLOCK_D])
    else:
        element = rows[:, None] * dim + (col_start + tl.arange(0, BLOCK_D))[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, element // 4)
        lane = element % 4
        bits = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return bits.to(tl.int64) >= threshold


@triton.jit
def apply_dropout_mask_kernel(
    out_ptr,                     # [B*T, D], contiguous: grad * keep * scale
    grad_ptr, stride_grad_b, stride_grad_t, stride_grad_d,
    n_rows, seq_len, dim,
    mask_seq_len, mask_seq_offset,  # the mask of step t is that of step mask_seq_offset + t in a mask_seq_len sequence
    dropout_seed_ptr, dropout_scale_ptr, dropout_threshold,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGNED4: tl.constexpr,
):
    """grad times the mask and scale: the masked upstream gradient for the sparse gradient path
    (whose values are B*T*D rows anyway; the dense path applies the mask inside the reduction
    kernels instead), and tensor parallelism's dropout after the reduction, where a rank holds
    steps mask_seq_offset .. of each sequence (sequence parallel) and must draw their mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_start = tl.program_id(1).to(tl.int64) * BLOCK_D
    cols = col_start + tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]
    batch = rows // seq_len
    step = rows - batch * seq_len
    src = grad_ptr + (batch * stride_grad_b + step * stride_grad_t)[:, None] + cols[None, :] * stride_grad_d
    grad = tl.load(src, mask=mask, other=0.0)
    if grad.dtype != tl.float64:
        grad = grad.to(tl.float32)
    keep = dropout_keep(dropout_seed_ptr, batch * mask_seq_len + mask_seq_offset + step, col_start, dim,
                        dropout_threshold, BLOCK_D, ALIGNED4)
    grad = tl.where(keep, grad * tl.load(dropout_scale_ptr).to(grad.dtype), 0.0)
    tl.store(out_ptr + rows[:, None] * dim + cols[None, :], grad.to(out_ptr.dtype.element_ty), mask=mask)

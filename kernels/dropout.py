"""Dropout masks regenerated from a seed instead of stored.

Element i of the [B*T, D] output (i = (b*T + t)*D + d) is kept when the Philox uniform drawn
for counter i under the call's seed is >= p, and then multiplied by 1/(1-p). The scale comes
from a 1-element fp64 tensor, not a kernel argument: Triton passes Python floats as fp32, which
would make fp64 tables' dropout inexact. Forward and backward kernels call the same
function on the same (seed, i), so they agree bit for bit and no B*T*D mask ever exists.
"""
import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed_ptr, element_index, p):
    # The seed is a 1-element int64 device tensor (drawn by torch.randint from the default
    # generator), so choosing it needs no host sync and a CUDA graph replays fresh masks.
    seed = tl.load(seed_ptr)
    return tl.rand(seed, element_index) >= p


@triton.jit
def apply_dropout_mask_kernel(
    out_ptr,                     # [B*T, D], contiguous: grad * keep * scale
    grad_ptr, stride_grad_b, stride_grad_t, stride_grad_d,
    n_rows, seq_len, dim,
    dropout_seed_ptr, dropout_scale_ptr, dropout_p,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The masked upstream gradient, for the sparse gradient path (whose values are B*T*D rows
    anyway); the dense path applies the mask inside the reduction kernels instead."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]
    batch = rows // seq_len
    step = rows - batch * seq_len
    src = grad_ptr + (batch * stride_grad_b + step * stride_grad_t)[:, None] + cols[None, :] * stride_grad_d
    grad = tl.load(src, mask=mask, other=0.0)
    if grad.dtype != tl.float64:
        grad = grad.to(tl.float32)
    offsets = rows[:, None] * dim + cols[None, :]
    scale = tl.load(dropout_scale_ptr).to(grad.dtype)
    grad = tl.where(dropout_keep(dropout_seed_ptr, offsets, dropout_p), grad * scale, 0.0)
    tl.store(out_ptr + offsets, grad.to(out_ptr.dtype.element_ty), mask=mask)

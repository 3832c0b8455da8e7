"""Triton kernels of tokemb-fast (installed as ``tokemb_fast.kernels``).

Only ``@triton.jit`` functions live here: no shapes are checked and nothing is launched. The
launchers, with their argument checks, are in ``tokemb_fast.triton_ops``.
"""
from .backward import (embedding_grad_rows_kernel, embedding_grad_scatter_kernel, segment_bounds_and_chunks_kernel,
                       sort_keys_kernel)
from .dropout import apply_dropout_mask_kernel
from .encoder import encoder_embedding_bwd_kernel, encoder_embedding_fwd_kernel
from .forward import input_embedding_fwd_kernel

__all__ = [
    "apply_dropout_mask_kernel",
    "encoder_embedding_bwd_kernel",
    "encoder_embedding_fwd_kernel",
    "input_embedding_fwd_kernel",
    "segment_bounds_and_chunks_kernel",
    "embedding_grad_rows_kernel",
    "embedding_grad_scatter_kernel",
    "sort_keys_kernel",
]

"""The op: ``fused_input_embedding`` and its autograd Function.

Data flow: FusedInputEmbedding (module) -> fused_input_embedding (this file: checks, picks a
path) -> FusedInputEmbeddingFunction -> tokemb_fast::* custom ops (triton_ops.py) -> kernels/.
On the plain-PyTorch path the reference sum runs instead and PyTorch's autograd differentiates it.
"""
import os
from typing import Optional

import torch

from .reference import default_position_ids, input_embedding_reference
from .validation import check_dropout, check_id_ranges, check_inputs, check_table_options

try:
    from . import triton_ops
    _TRITON_IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # Triton missing: the plain-PyTorch path still works everywhere.
    triton_ops = None
    _TRITON_IMPORT_ERROR = exc

BACKENDS = ("auto", "triton", "torch")


def _resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """'triton' or 'torch' for this call. Read per call, so the env var can change at run time."""
    choice = backend if backend is not None else os.environ.get("TOKEMB_FAST_BACKEND", "auto")
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (argument or TOKEMB_FAST_BACKEND), got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_ops is not None else "torch"
    if triton_ops is None:
        raise RuntimeError(f"backend 'triton' was asked for but Triton cannot be imported: {_TRITON_IMPORT_ERROR}")
    if device.type == "cpu" and not triton_ops.INTERPRETED:
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before importing tokemb_fast")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend 'triton' supports CUDA tensors (or CPU under TRITON_INTERPRET=1), not {device.type}")
    return "triton"


class FusedInputEmbeddingFunction(torch.autograd.Function):
    """Autograd for the fused op (Triton path)::

        FusedInputEmbeddingFunction.apply(input_ids, token_weight, position_weight, position_ids=None,
                                          past_length=0, check_ids=True, padding_idx=None,
                                          scale_grad_by_freq=False, sparse=False, position_padding_idx=None,
                                          position_scale_grad_by_freq=False, position_sparse=False,
                                          dropout_p=0.0)

    Saves only the ids (and position ids, if given) for the backward: the gradient of a gather
    needs to know where each row came from, never the tables' values or the output. With dropout
    it also saves the call's seed and scale (one element each), never a mask. Arguments are
    checked as in ``fused_input_embedding`` (``check_ids=None`` means the caller already did).
    ``max_norm`` is not an argument: it renormalises the tables before the lookup, outside autograd.
    """

    @staticmethod
    def forward(ctx, input_ids, token_weight, position_weight, position_ids=None, past_length=0, check_ids=True,
                padding_idx=None, scale_grad_by_freq=False, sparse=False, position_padding_idx=None,
                position_scale_grad_by_freq=False, position_sparse=False, dropout_p=0.0):
        if check_ids is not None:
            dropout_p = check_dropout(dropout_p)
            position_ids = check_inputs(input_ids, token_weight, position_weight, position_ids, past_length,
                                        check_ids)
            padding_idx = check_table_options("token", token_weight.shape[0], padding_idx, None, 2.0)
            position_padding_idx = check_table_options("position", position_weight.shape[0], position_padding_idx,
                                                       None, 2.0)
        ids_2d = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
        positions_2d = None
        if position_ids is not None:
            positions_2d = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        # Only a row stride is passed to the kernels; a table with a strided last dim is rare
        # (a transposed view) and gets a contiguous copy rather than a wrong answer.
        seed = scale = None
        if dropout_p > 0:
            seed, scale = _dropout_state(dropout_p, token_weight.device)
        out = triton_ops.input_embedding_forward(
            ids_2d, _unit_column_stride(token_weight), _unit_column_stride(position_weight),
            positions_2d, past_length, dropout_p, seed, scale)
        ctx.save_for_backward(ids_2d, positions_2d, seed, scale)
        ctx.dropout_p = dropout_p
        ctx.past_length = past_length
        ctx.vocab_size = token_weight.shape[0]
        ctx.num_positions = position_weight.shape[0]
        ctx.one_dim = input_ids.dim() == 1
        ctx.token_options = (padding_idx, scale_grad_by_freq, sparse)
        ctx.position_options = (position_padding_idx, position_scale_grad_by_freq, position_sparse)
        return out[0] if ctx.one_dim else out

    @staticmethod
    def backward(ctx, grad_out):
        ids_2d, positions_2d, seed, scale = ctx.saved_tensors
        dropout = (ctx.dropout_p, seed, scale)
        if ctx.one_dim:
            grad_out = grad_out.unsqueeze(0)
        batch, seq_len = grad_out.shape[:2]
        grad_token = grad_position = None
        if ctx.needs_input_grad[1]:
            grad_token = _table_grad(grad_out, ids_2d, ctx.vocab_size, 0, 1, *ctx.token_options, dropout)
        if ctx.needs_input_grad[2]:
            # The position ids nn.Embedding would have looked up: [T] (shared by the batch) or [B, T].
            shared = positions_2d is None or (positions_2d.shape[0] == 1 and batch != 1)
            if positions_2d is not None and shared:
                positions_2d = positions_2d.expand(batch, -1)
            grad_position = _table_grad(grad_out, positions_2d, ctx.num_positions, ctx.past_length,
                                        max(batch, 1) if shared else 1, *ctx.position_options, dropout)
        return (None, grad_token, grad_position) + (None,) * 10


def _dropout_state(dropout_p: float, device: torch.device):
    """This call's dropout seed and scale, as 1-element device tensors.

    Drawn from the device's default generator by a device op: torch.manual_seed reproduces a run,
    consecutive calls get fresh masks, no host sync happens and a captured CUDA graph draws a
    fresh seed at each replay.
    """
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    scale = torch.full((1,), 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0, dtype=torch.float64, device=device)
    return seed, scale


def _table_grad(grad_out, keys, num_rows, past_length, count_divisor, padding_idx, scale_grad_by_freq, sparse,
                dropout):
    dropout_p, seed, scale = dropout
    if sparse:
        if seed is not None:
            grad_out = triton_ops.dropout_masked_grad(grad_out, dropout_p, seed, scale)
        # A sparse gradient is the upstream rows themselves, indexed by id: no reduction, so
        # nothing to fuse. Built by the function nn.Embedding uses, so it is the same tensor.
        # Positions shared by the batch were looked up once, as [T]; their rows sum over the batch.
        if keys is None:
            grad_out, keys = grad_out.sum(0), default_position_ids(grad_out.shape[1], past_length, grad_out.device)
        elif count_divisor != 1:
            grad_out, keys = grad_out.sum(0), keys[0]
        return torch.ops.aten.embedding_backward(grad_out, keys, num_rows, -1 if padding_idx is None else padding_idx,
                                                 scale_grad_by_freq, True)
    return triton_ops.embedding_dense_grad(grad_out, keys, num_rows, past_length,
                                           -1 if padding_idx is None else padding_idx, scale_grad_by_freq,
                                           count_divisor, dropout_p, seed, scale)


def _unit_column_stride(weight: torch.Tensor) -> torch.Tensor:
    return weight if weight.stride(1) == 1 or weight.shape[1] <= 1 else weight.contiguous()


def fused_input_embedding(
    input_ids: torch.Tensor,
    token_weight: torch.Tensor,
    position_weight: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    past_length: int = 0,
    *,
    padding_idx: Optional[int] = None,
    max_norm: Optional[float] = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
    position_padding_idx: Optional[int] = None,
    position_max_norm: Optional[float] = None,
    position_norm_type: float = 2.0,
    position_scale_grad_by_freq: bool = False,
    position_sparse: bool = False,
    dropout_p: float = 0.0,
    training: bool = True,
    check_ids: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``dropout(token_weight[input_ids] + position_weight[positions])`` in one pass.

    Args:
        input_ids: int64 or int32 token ids, [T] or [B, T].
        token_weight: [vocab_size, D] table.
        position_weight: [context_length, D] table, same dtype and device.
        position_ids: optional [T], [1, T] or [B, T] positions (e.g. left-padded batches);
            default ``past_length + arange(T)``.
        past_length: first position when position_ids is None (KV-cache decoding).
        padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse: ``F.embedding``'s options for
            the token table, with the same meaning; ``position_*``: the same for the position table.
        dropout_p, training: ``F.dropout`` of the sum, fused (the mask is regenerated from a seed
            in the backward, never stored). Off unless training and dropout_p > 0.
        check_ids: check that every id and position is inside its table (one host sync on a GPU).
            With False an out-of-range id is never dereferenced; its output row is NaN.
        backend: 'auto' (Triton for CUDA tensors, PyTorch otherwise), 'triton' or 'torch';
            default from TOKEMB_FAST_BACKEND, else 'auto'.

    Returns:
        [T, D] or [B, T, D] in the tables' dtype.
    """
    if not isinstance(token_weight, torch.Tensor):
        raise TypeError(f"token_weight must be a torch.Tensor, got {type(token_weight).__name__}")
    use_triton = _resolve_backend(backend, token_weight.device) == "triton"
    # On the CPU, F.embedding bounds-checks every id itself, so the range check (a reduction per
    # call, about as costly as the lookup at small sizes) can wait for its IndexError, unless
    # max_norm would renormalise a table before the lookup fails.
    check_later = check_ids and not use_triton and token_weight.device.type == "cpu" and \
        max_norm is None and position_max_norm is None
    # Every check runs before max_norm touches a table, so a rejected call changes nothing.
    position_ids = check_inputs(input_ids, token_weight, position_weight, position_ids, past_length,
                                check_ids and not check_later)
    padding_idx = check_table_options("token", token_weight.shape[0], padding_idx, max_norm, norm_type)
    position_padding_idx = check_table_options("position", position_weight.shape[0], position_padding_idx,
                                               position_max_norm, position_norm_type)
    dropout_p = check_dropout(dropout_p) if training else 0.0
    if not use_triton:
        try:
            out = input_embedding_reference(
                input_ids, token_weight, position_weight, position_ids, past_length,
                padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, position_padding_idx=position_padding_idx,
                position_max_norm=position_max_norm, position_norm_type=position_norm_type,
                position_scale_grad_by_freq=position_scale_grad_by_freq, position_sparse=position_sparse)
        except IndexError:
            if check_later:  # raise ours, naming the bad id and the limit
                check_id_ranges(input_ids, token_weight.shape[0], position_ids, position_weight.shape[0])
            raise
        # A different random stream from the kernels' (PyTorch's CPU/CUDA generator vs Philox in Triton).
        return torch.nn.functional.dropout(out, dropout_p, training=True) if dropout_p > 0 else out
    # max_norm: rows looked up in this call are renormalised in place first, by the same function
    # F.embedding uses, so the same rows change by the same amounts.
    if max_norm is not None:
        _renorm_rows(token_weight, input_ids, max_norm, norm_type)
    if position_max_norm is not None:
        looked_up = position_ids if position_ids is not None else \
            default_position_ids(input_ids.shape[-1], past_length, input_ids.device)
        _renorm_rows(position_weight, looked_up, position_max_norm, position_norm_type)
    return FusedInputEmbeddingFunction.apply(
        input_ids, token_weight, position_weight, position_ids, past_length, None, padding_idx,
        scale_grad_by_freq, sparse, position_padding_idx, position_scale_grad_by_freq, position_sparse, dropout_p)


def _renorm_rows(weight: torch.Tensor, ids: torch.Tensor, max_norm: float, norm_type: float) -> None:
    if ids.numel() == 0:  # nothing to renormalise, and PyTorch's CUDA kernel rejects an empty index
        return
    with torch.no_grad():
        torch.embedding_renorm_(weight, ids.contiguous(), max_norm, norm_type)

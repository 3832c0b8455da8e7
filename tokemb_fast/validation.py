"""Argument checks shared by both paths (Triton and plain PyTorch).

Everything that can be checked from shapes, dtypes and devices is always checked; it costs no
device work, and callers cache the outcome per shapes/dtypes/devices/options key, so a repeated
call pays a dict lookup. Checking ids against the tables means reading them: ``check_id_ranges``
does it on the host (``check_ids="sync"``: one host sync per call on a GPU); the default has the
forward kernel record bad ids instead (``tokemb_fast.id_check``). Either way the kernels never
read outside a table (an out-of-range id yields a NaN row).
"""
from typing import Optional

import torch

from .id_check import position_error, token_error, token_type_error
from .options import LookupOptions, TableOptions, TokenShard, check_mode

ID_DTYPES = (torch.int32, torch.int64)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _check_table(name: str, weight) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    check_dense(name, weight)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_rows, embedding_dim], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {weight.dtype}")


def check_dense(name: str, tensor: torch.Tensor) -> None:
    # Sparse (COO, CSR, ...), mkldnn and nested tensors have no rows to read by stride.
    if tensor.layout != torch.strided or tensor.is_nested:
        found = "a nested tensor (pad it: .to_padded_tensor())" if tensor.is_nested else \
            f"layout {tensor.layout} (convert it: .to_dense())"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {found}")


def _check_id_tensor(name: str, ids, device: torch.device) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token indices, got {type(ids).__name__}")
    check_dense(name, ids)
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (torch.int64 or torch.int32), got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the embedding tables are on {device}")


def check_inputs(
    input_ids: torch.Tensor,
    token_weight: torch.Tensor,
    position_weight: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    past_length: int,
    default_positions: bool = True,
) -> Optional[torch.Tensor]:
    """Raise a clear exception for any bad argument (ids' values aside: ``check_id_ranges``);
    return position_ids as [T] (for [T] ids) or [T] / [1, T] / [B, T]. default_positions=False:
    positions not given are not past_length + arange(T) (the encoder op's RoBERTa positions),
    so past_length + T is not checked against the table."""
    _check_table("token_weight", token_weight)
    _check_table("position_weight", position_weight)
    if token_weight.device != position_weight.device:
        raise ValueError(
            f"token_weight is on {token_weight.device} but position_weight is on {position_weight.device}; "
            "both tables must be on one device")
    if token_weight.dtype != position_weight.dtype:
        raise ValueError(
            f"token_weight is {token_weight.dtype} but position_weight is {position_weight.dtype}; "
            "both tables must have one dtype")
    if token_weight.shape[1] != position_weight.shape[1]:
        raise ValueError(
            f"token_weight has embedding_dim {token_weight.shape[1]} but position_weight has "
            f"{position_weight.shape[1]}; both tables must have the same embedding_dim")
    device = token_weight.device
    _check_id_tensor("input_ids", input_ids, device)
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must be [T] or [B, T], got shape {tuple(input_ids.shape)}")
    if token_weight.shape[0] == 0 and input_ids.numel() > 0:
        raise IndexError(f"the token table has no rows (vocab size 0), so none of the {input_ids.numel()} "
                         "token ids can be looked up")

    if isinstance(past_length, bool) or not isinstance(past_length, int):
        raise TypeError(f"past_length must be an int, got {type(past_length).__name__}")
    if past_length < 0:
        raise ValueError(f"past_length must be >= 0, got {past_length}")
    seq_len = input_ids.shape[-1]
    num_positions = position_weight.shape[0]

    if position_ids is not None:
        if past_length != 0:
            raise ValueError("pass either position_ids or past_length, not both "
                             "(position_ids already say where each token sits)")
        position_ids = check_ids_like_positions("position_ids", position_ids, input_ids)
    elif default_positions and past_length + seq_len > num_positions:
        raise IndexError(
            f"positions {past_length}..{past_length + seq_len - 1} (past_length={past_length}, T={seq_len}) "
            f"run past the position table: context_length is {num_positions}, so "
            f"past_length + T must be <= {num_positions}")
    return position_ids


def check_ids_like_positions(name: str, ids: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Check ids that go with input_ids per step (position ids, token-type ids): integer, on
    input_ids' device, [T], [1, T] or input_ids' [B, T]. Returned as [T] for [T] input_ids."""
    _check_id_tensor(name, ids, input_ids.device)
    seq_len = input_ids.shape[-1]
    shape = tuple(ids.shape)
    if ids.dim() == 2 and shape[0] == 1:
        ids = ids[0] if input_ids.dim() == 1 else ids
    allowed = [(seq_len,), (1, seq_len)]
    if input_ids.dim() == 2 and input_ids.shape[0] != 1:
        allowed.append(tuple(input_ids.shape))
    # Element by element rather than `shape not in allowed`: under torch.compile with automatic
    # dynamic shapes, Dynamo answered that containment test wrongly for tuples of symbolic
    # sizes (the CUDA Inductor test's 4th call, 2026-11-27), and took this raise branch.
    if not any(len(shape) == len(option) and all(a == b for a, b in zip(shape, option)) for option in allowed):
        raise ValueError(
            f"{name} must have shape {' or '.join(str(list(s)) for s in allowed)} "
            f"to match input_ids {list(input_ids.shape)}, got {list(shape)}")
    return ids


def check_lookup_options(options, vocab_size: int, num_positions: int) -> None:
    """Check a LookupOptions as FusedInputEmbeddingFunction takes it (padding rows already >= 0)."""
    if not isinstance(options, LookupOptions):
        raise TypeError(f"options must be a tokemb_fast.LookupOptions, got {type(options).__name__}")
    for table, table_options, num_rows in (("token", options.token, vocab_size),
                                           ("position", options.position, num_positions)):
        if not isinstance(table_options, TableOptions):
            raise TypeError(f"options.{table} must be a tokemb_fast.TableOptions, got {type(table_options).__name__}")
        padding_idx = table_options.padding_idx
        if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)
                                        or not 0 <= padding_idx < num_rows):
            raise ValueError(f"options.{table}.padding_idx must be a row of the {table} table (0..{num_rows - 1}; "
                             f"fused_input_embedding also takes negative values), got {padding_idx!r}")
    check_dropout(options.dropout_p)
    check_mode(options.check_ids)
    check_token_scale(options.token_scale)
    shard = options.shard
    if shard is not None:
        if not isinstance(shard, TokenShard):
            raise TypeError(f"options.shard must be a tokemb_fast.options.TokenShard or None, got {type(shard).__name__}")
        row_offset, total, add_positions = shard
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in (row_offset, total)) or \
                not 0 <= row_offset <= row_offset + vocab_size <= total or not isinstance(add_positions, bool):
            raise ValueError(f"options.shard must place the {vocab_size}-row token table inside the vocabulary "
                             f"(0 <= row_offset, row_offset + rows <= vocab_size), got {shard!r}")
        if options.token.sparse:
            raise ValueError("a sharded token table takes dense gradients (options.token.sparse=False)")


def check_token_scale(token_scale) -> float:
    """The token scale as a finite float."""
    # (Comparisons rather than math.isfinite, which torch.compile cannot trace.)
    if isinstance(token_scale, bool) or not isinstance(token_scale, (int, float)) or \
            not -float("inf") < token_scale < float("inf"):
        raise ValueError(f"token_scale must be a finite number (a Python int or float), got {token_scale!r}")
    return float(token_scale)


def check_table_options(table: str, num_rows: int, padding_idx, max_norm, norm_type) -> Optional[int]:
    """Check one table's nn.Embedding options; return padding_idx as a row index (or None)."""
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
            raise TypeError(f"{table} padding_idx must be an int or None, got {type(padding_idx).__name__}")
        if not -num_rows <= padding_idx < num_rows:
            raise ValueError(f"{table} padding_idx {padding_idx} is outside the {table} table of {num_rows} rows "
                             f"(valid: {-num_rows}..{num_rows - 1}, negative values count from the end)")
        if padding_idx < 0:
            padding_idx += num_rows
    if max_norm is not None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
            raise ValueError(f"{table} max_norm must be a number > 0 or None, got {max_norm!r}")
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
        raise ValueError(f"{table} norm_type must be a number > 0 (the p of the p-norm), got {norm_type!r}")
    return padding_idx


def check_pad_position_id(pad_position_id) -> None:
    """RoBERTa's pad token id, from which the encoder op makes positions, or None (no such positions)."""
    if pad_position_id is None:
        return
    if isinstance(pad_position_id, bool) or not isinstance(pad_position_id, int):
        raise TypeError(f"pad_position_id must be an int (the pad token id) or None, got "
                        f"{type(pad_position_id).__name__}")
    if pad_position_id < 0:
        raise ValueError(f"pad_position_id must be the pad token id (>= 0) or None, got {pad_position_id}")


def check_dropout(dropout_p, name: str = "dropout_p") -> float:
    """Dropout probability as a float in [0, 1] (name: the argument's, for the message)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {dropout_p}")
    return float(dropout_p)


def _readable(tensor: torch.Tensor) -> torch.Tensor:
    """The values under any torch.func wrappers (ids batched by vmap: every batch's), which a
    wrapper cannot hand to the host itself."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor) or functorch.is_batchedtensor(tensor):
        tensor = functorch.get_unwrapped(tensor)
    return tensor


def check_id_ranges(input_ids, vocab_size, position_ids, num_positions, token_type_ids=None, num_types=0) -> None:
    """Raise IndexError for the first kind of id outside its table (token ids, positions, token
    types): one reduction per tensor and a single device->host copy for all of them."""
    checked = [(ids, num_rows, error) for ids, num_rows, error in (
        (input_ids, vocab_size, token_error), (position_ids, num_positions, position_error),
        (token_type_ids, num_types, token_type_error)) if ids is not None and ids.numel() > 0]
    if not checked or input_ids.device.type == "meta":
        return  # (meta tensors have no values to check, nor does nn.Embedding check them there)
    with torch._C._DisableFuncTorch():
        bounds = torch.stack([part.to(torch.int64) for ids, _, _ in checked
                              for part in torch.aminmax(_readable(ids))]).tolist()
    for (_, num_rows, error), low, high in zip(checked, bounds[0::2], bounds[1::2]):
        if low < 0 or high >= num_rows:
            raise IndexError(error(low if low < 0 else high, num_rows))

"""The plain-PyTorch definition of the op: the CPU fallback and the test oracle.

Kept deliberately naive (two ``F.embedding`` calls and an add) so that it is obviously right.
Arguments are checked by the caller (``tokemb_fast.functional``), not here.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def default_position_ids(seq_len: int, past_length: int, device: torch.device) -> torch.Tensor:
    """Positions past_length .. past_length + seq_len - 1, as GPT-2 numbers them."""
    return torch.arange(past_length, past_length + seq_len, device=device)


def input_embedding_reference(
    input_ids: torch.Tensor,
    token_weight: torch.Tensor,
    position_weight: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    past_length: int = 0,
) -> torch.Tensor:
    """``F.embedding(ids, token_weight) + F.embedding(positions, position_weight)``.

    position_ids is [T] or [B, T] (or None for ``arange(T) + past_length``); the position rows
    broadcast over the batch.
    """
    if position_ids is None:
        position_ids = default_position_ids(input_ids.shape[-1], past_length, input_ids.device)
    return F.embedding(input_ids, token_weight) + F.embedding(position_ids, position_weight)

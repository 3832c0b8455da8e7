"""The plain-PyTorch definition of the op: the CPU fallback and the test oracle.

Kept deliberately naive (two ``F.embedding`` calls and an add) so that it is obviously right,
and so that every nn.Embedding option means exactly what it means there. Arguments are checked
by the caller (``tokemb_fast.functional``), not here.
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
    token_scale: float = 1.0,
) -> torch.Tensor:
    """``F.embedding(ids, token_weight, ...) * token_scale + F.embedding(positions, position_weight, ...)``.

    position_ids is [T] or [B, T] (or None for ``arange(T) + past_length``, looked up once as a
    [T] tensor like GPT-2's ``pos_emb(arange(T))``); the position rows broadcast over the batch.
    The keyword options are nn.Embedding's, for the token table and (``position_*``) the
    position table; token_scale multiplies the token rows (as BioGPT's scaled word embedding does).
    """
    if position_ids is None:
        position_ids = default_position_ids(input_ids.shape[-1], past_length, input_ids.device)
    max_norm, scale_grad_by_freq = _options_with_lookups(input_ids, max_norm, scale_grad_by_freq)
    position_max_norm, position_scale_grad_by_freq = _options_with_lookups(
        position_ids, position_max_norm, position_scale_grad_by_freq)
    tokens = F.embedding(input_ids, token_weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    positions = F.embedding(position_ids, position_weight, position_padding_idx, position_max_norm,
                            position_norm_type, position_scale_grad_by_freq, position_sparse)
    if token_scale != 1.0:
        tokens = tokens * token_scale
    return tokens + positions


def _options_with_lookups(ids: torch.Tensor, max_norm: Optional[float], scale_grad_by_freq: bool):
    """max_norm and scale_grad_by_freq, or no-ops when ``ids`` is empty.

    With nothing looked up neither has anything to do, and PyTorch's CUDA kernels for both
    (embedding_renorm_, the scaled dense backward) fail with "CUDA error: invalid argument" on an
    empty index tensor (torch 2.11 on an H100, 2026-11-27)."""
    if ids.numel() == 0:
        return None, False
    return max_norm, scale_grad_by_freq


def positions_from_padding(input_ids: torch.Tensor, pad_id: int, past_length: int = 0) -> torch.Tensor:
    """RoBERTa's positions (Hugging Face's ``create_position_ids_from_input_ids``, fairseq's
    ``make_positions``): a non-pad id at step t gets pad_id + past_length + (its count of non-pad
    ids in steps 0..t); a pad id gets pad_id."""
    not_pad = input_ids.ne(pad_id).int()
    return ((torch.cumsum(not_pad, dim=-1).type_as(not_pad) + past_length) * not_pad).long() + pad_id


def encoder_embedding_reference(
    input_ids: torch.Tensor,
    word_weight: torch.Tensor,
    position_weight: torch.Tensor,
    token_type_weight: Optional[torch.Tensor] = None,
    token_type_ids: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    past_length: int = 0,
    *,
    layer_norm: bool = True,
    layer_norm_weight: Optional[torch.Tensor] = None,
    layer_norm_bias: Optional[torch.Tensor] = None,
    layer_norm_eps: float = 1e-12,
    pad_position_id: Optional[int] = None,
    padding_idx: Optional[int] = None,
    position_padding_idx: Optional[int] = None,
    token_type_padding_idx: Optional[int] = None,
) -> torch.Tensor:
    """The encoder families' embedding before its dropout, as Hugging Face's BertEmbeddings computes it:
    ``LayerNorm(word[ids] + token_type[token_type_ids] + position[positions])``, added in that order.

    Positions: position_ids ([T], [1, T] or [B, T]); else with pad_position_id (RoBERTa),
    ``positions_from_padding(input_ids, pad_position_id, past_length)``; else past_length + arange(T).
    token_type_ids default to zeros; without a token-type table there is no such term (DistilBERT).
    """
    if position_ids is None:
        position_ids = positions_from_padding(input_ids, pad_position_id, past_length) if pad_position_id is not None \
            else default_position_ids(input_ids.shape[-1], past_length, input_ids.device)
    embeddings = F.embedding(input_ids, word_weight, padding_idx)
    if token_type_weight is not None:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = embeddings + F.embedding(token_type_ids, token_type_weight, token_type_padding_idx)
    embeddings = embeddings + F.embedding(position_ids, position_weight, position_padding_idx)
    if layer_norm:
        embeddings = F.layer_norm(embeddings, (word_weight.shape[1],), layer_norm_weight, layer_norm_bias,
                                  layer_norm_eps)
    return embeddings

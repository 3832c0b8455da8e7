"""FusedInputEmbedding: a drop-in for ``tok_emb(ids) + pos_emb(arange(T))``.

The module owns two ordinary ``nn.Embedding`` submodules and calls the functional op with their
``.weight`` at every call, so anything that replaces, loads or ties those weights just works.
It knows nothing about Triton: the functional op picks the path.
"""
from typing import Optional

import torch
from torch import nn

from .functional import fused_input_embedding


class FusedInputEmbedding(nn.Module):
    """Token embedding + absolute position embedding, fused.

    Args:
        vocab_size: rows of the token table.
        context_length: rows of the position table (the longest T + past_length).
        embedding_dim: D.
        check_ids: check ids and positions against the tables on every call (default True;
            on a GPU this costs one host sync, see the README).
        device, dtype: factory kwargs for both tables.

    Submodules ``tok_emb`` and ``pos_emb`` are plain ``nn.Embedding`` s (state_dict keys
    ``tok_emb.weight`` and ``pos_emb.weight``).
    """

    def __init__(self, vocab_size: int, context_length: int, embedding_dim: int, *, check_ids: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, embedding_dim, device=device, dtype=dtype)
        self.pos_emb = nn.Embedding(context_length, embedding_dim, device=device, dtype=dtype)
        self.check_ids = check_ids

    @classmethod
    def from_embeddings(cls, tok_emb: nn.Embedding, pos_emb: nn.Embedding, *,
                        check_ids: bool = True) -> "FusedInputEmbedding":
        """Wrap two existing ``nn.Embedding`` modules; their weights are shared, never copied."""
        for name, emb in (("tok_emb", tok_emb), ("pos_emb", pos_emb)):
            if not isinstance(emb, nn.Embedding):
                raise TypeError(f"{name} must be an nn.Embedding, got {type(emb).__name__}")
        if tok_emb.embedding_dim != pos_emb.embedding_dim:
            raise ValueError(f"tok_emb has embedding_dim {tok_emb.embedding_dim} but pos_emb has "
                             f"{pos_emb.embedding_dim}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.tok_emb = tok_emb
        self.pos_emb = pos_emb
        self.check_ids = check_ids
        return self

    @property
    def vocab_size(self) -> int:
        return self.tok_emb.num_embeddings

    @property
    def context_length(self) -> int:
        return self.pos_emb.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.tok_emb.embedding_dim

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                past_length: int = 0) -> torch.Tensor:
        return fused_input_embedding(input_ids, self.tok_emb.weight, self.pos_emb.weight,
                                     position_ids=position_ids, past_length=past_length,
                                     check_ids=self.check_ids)

    def extra_repr(self) -> str:
        return f"check_ids={self.check_ids}"

"""FusedInputEmbedding: a drop-in for ``tok_emb(ids) + pos_emb(arange(T))``.

The module owns two ``nn.Embedding`` submodules and, at every call, reads their ``.weight`` and
their options (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse) and hands them to
the functional op. So anything that replaces, loads or ties those weights, or wraps existing
embeddings with their own options, just works. It knows nothing about Triton.
"""
import math
from typing import Optional

import torch
from torch import nn

from .encoder import fused_encoder_embedding
from .encoder import last_backend as encoder_last_backend
from .functional import BACKENDS, _fused, backend_name, last_backend
from .options import check_mode
from .validation import check_dropout, check_pad_position_id, check_table_options, check_token_scale

POSITION_KINDS = ("learned", "sinusoidal")

#: What torch.jit.script of the module (or of a model holding it) raises.
SCRIPT_UNSUPPORTED = (
    "torch.jit.script cannot compile {} (tokemb-fast): TorchScript does not support its call path (the Triton "
    "launchers, keyword-only options, custom ops chosen per call), and TorchScript is deprecated in PyTorch. "
    "Use torch.export.export (then AOTInductor or ONNX: see docs/shipping.md) or torch.jit.trace, which "
    "records PyTorch's own ops on either path.")


def sinusoidal_table(num_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed position table of "Attention Is All You Need" (float64, [num_positions, dim]):
    row p, column 2i is sin(p / base^(2i/dim)), column 2i+1 is cos(p / base^(2i/dim))."""
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    frequencies = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(base) / dim))
    angles = positions * frequencies[None, :]
    table = torch.empty(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return table


class SinusoidalPositionEmbedding(nn.Module):
    """A fixed sin/cos position table, held as a non-trainable buffer named ``weight``.

    It stands where a position ``nn.Embedding`` would (same attribute names, no options set);
    the buffer is not saved in the state_dict (it is a function of its shape) and gets no gradient.
    """

    padding_idx = None
    max_norm = None
    norm_type = 2.0
    scale_grad_by_freq = False
    sparse = False

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(sinusoidal_table(self.num_embeddings, self.embedding_dim))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(position_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class FusedInputEmbedding(nn.Module):
    """Token embedding + absolute position embedding, fused.

    Args:
        vocab_size: rows of the token table.
        context_length: rows of the position table (the longest T + past_length).
        embedding_dim: D.
        padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse: ``nn.Embedding``'s options
            for the token table, with the same meaning; ``position_*``: the same for the position table.
        position: 'learned' (an ``nn.Embedding``) or 'sinusoidal' (the fixed sin/cos table of the
            original Transformer, a non-trainable buffer).
        position_padding_idx, position_max_norm, position_norm_type, position_scale_grad_by_freq,
        position_sparse: the same options for a learned position table.
        dropout: probability of the dropout applied to the sum (GPT-2's embedding dropout), fused
            into the kernel; it follows ``train()`` / ``eval()`` like ``nn.Dropout``.
        check_ids: True (default): an id or position outside its table raises IndexError, found
            by the kernel without a host sync (raised at the latest in the backward of the call, or
            at the next call); "sync": checked before the launch (one host sync on a GPU); False:
            not checked (the row is NaN). See the README.
        token_scale: the token rows are multiplied by it before the sum (e.g. sqrt(D), as BioGPT
            does); fused, gradient included.
        backend: "auto", "triton" or "torch" for every call; None (default): TOKEMB_FAST_BACKEND,
            else "auto" (Triton for CUDA tensors, plain PyTorch otherwise).
        device, dtype: factory kwargs for both tables.

    Submodules ``tok_emb`` and ``pos_emb`` are ``nn.Embedding`` s (state_dict keys
    ``tok_emb.weight`` and ``pos_emb.weight``), or a ``SinusoidalPositionEmbedding`` for
    ``position='sinusoidal'``; ``drop`` is an ``nn.Dropout`` (no state).
    """

    def __init__(self, vocab_size: int, context_length: int, embedding_dim: int, *,
                 padding_idx: Optional[int] = None, max_norm: Optional[float] = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False, position: str = "learned",
                 position_padding_idx: Optional[int] = None, position_max_norm: Optional[float] = None,
                 position_norm_type: float = 2.0, position_scale_grad_by_freq: bool = False,
                 position_sparse: bool = False, dropout: float = 0.0, check_ids=True, token_scale: float = 1.0,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if position not in POSITION_KINDS:
            raise ValueError(f"position must be one of {POSITION_KINDS}, got {position!r}")
        check_table_options("token", vocab_size, padding_idx, max_norm, norm_type)
        self.tok_emb = nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx, max_norm=max_norm,
                                    norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse,
                                    device=device, dtype=dtype)
        if position == "sinusoidal":
            if (position_padding_idx, position_max_norm, position_scale_grad_by_freq, position_sparse) != \
                    (None, None, False, False):
                raise ValueError("position options apply to a learned position table, not position='sinusoidal'")
            self.pos_emb = SinusoidalPositionEmbedding(context_length, embedding_dim, device=device, dtype=dtype)
        else:
            check_table_options("position", context_length, position_padding_idx, position_max_norm, position_norm_type)
            self.pos_emb = nn.Embedding(context_length, embedding_dim, padding_idx=position_padding_idx,
                                        max_norm=position_max_norm, norm_type=position_norm_type,
                                        scale_grad_by_freq=position_scale_grad_by_freq, sparse=position_sparse,
                                        device=device, dtype=dtype)
        self._set_call_options(dropout, check_ids, token_scale, backend)

    def _set_call_options(self, dropout, check_ids, token_scale, backend) -> None:
        self.drop = _as_dropout(dropout)
        self.check_ids = check_mode(check_ids)
        self.token_scale = check_token_scale(token_scale)
        self.backend = _module_backend(backend)

    @classmethod
    def from_embeddings(cls, tok_emb: nn.Embedding, pos_emb: nn.Module, *, dropout=0.0, check_ids=True,
                        token_scale: float = 1.0, backend: Optional[str] = None) -> "FusedInputEmbedding":
        """Wrap two existing embeddings; weights are shared, never copied, and their options
        (padding_idx, max_norm, ...) are honoured as they are at each call. ``dropout`` is a
        probability or the model's own ``nn.Dropout`` module, whose ``p`` and train/eval mode are
        read at each call."""
        if not isinstance(tok_emb, nn.Embedding):
            raise TypeError(f"tok_emb must be an nn.Embedding, got {type(tok_emb).__name__}")
        if not isinstance(pos_emb, (nn.Embedding, SinusoidalPositionEmbedding)):
            raise TypeError(f"pos_emb must be an nn.Embedding, got {type(pos_emb).__name__}")
        if tok_emb.embedding_dim != pos_emb.embedding_dim:
            raise ValueError(f"tok_emb has embedding_dim {tok_emb.embedding_dim} but pos_emb has "
                             f"{pos_emb.embedding_dim}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.tok_emb = tok_emb
        self.pos_emb = pos_emb
        self._set_call_options(dropout, check_ids, token_scale, backend)
        return self

    @classmethod
    def from_pretrained(cls, token_weight: torch.Tensor, position_weight: torch.Tensor, freeze: bool = True, *,
                        padding_idx: Optional[int] = None, max_norm: Optional[float] = None, norm_type: float = 2.0,
                        scale_grad_by_freq: bool = False, sparse: bool = False,
                        position_padding_idx: Optional[int] = None, position_max_norm: Optional[float] = None,
                        position_norm_type: float = 2.0, position_scale_grad_by_freq: bool = False,
                        position_sparse: bool = False, dropout: float = 0.0, check_ids=True, token_scale: float = 1.0,
                        backend: Optional[str] = None) -> "FusedInputEmbedding":
        """Like ``nn.Embedding.from_pretrained`` for both tables (freeze=True: no gradients)."""
        for name, weight in (("token_weight", token_weight), ("position_weight", position_weight)):
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ValueError(f"{name} must be a 2-D tensor [num_rows, embedding_dim]")
        check_table_options("token", token_weight.shape[0], padding_idx, max_norm, norm_type)
        check_table_options("position", position_weight.shape[0], position_padding_idx, position_max_norm,
                       position_norm_type)
        tok_emb = nn.Embedding.from_pretrained(token_weight, freeze=freeze, padding_idx=padding_idx,
                                               max_norm=max_norm, norm_type=norm_type,
                                               scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)
        pos_emb = nn.Embedding.from_pretrained(position_weight, freeze=freeze, padding_idx=position_padding_idx,
                                               max_norm=position_max_norm, norm_type=position_norm_type,
                                               scale_grad_by_freq=position_scale_grad_by_freq, sparse=position_sparse)
        return cls.from_embeddings(tok_emb, pos_emb, dropout=dropout, check_ids=check_ids, token_scale=token_scale,
                                   backend=backend)

    @property
    def vocab_size(self) -> int:
        return self.tok_emb.num_embeddings

    @property
    def context_length(self) -> int:
        return self.pos_emb.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.tok_emb.embedding_dim

    def reset_parameters(self) -> None:
        """nn.Embedding's initialisation (N(0, 1), padding rows zeroed); a sinusoidal table is rebuilt."""
        self.tok_emb.reset_parameters()
        self.pos_emb.reset_parameters()

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                past_length: int = 0) -> torch.Tensor:
        modules = self._modules
        out = lookup_with(modules["tok_emb"], modules["pos_emb"], modules["drop"], self.check_ids, self.token_scale,
                          self.backend, input_ids, position_ids, past_length)
        if not torch.compiler.is_compiling():
            self.__dict__["last_backend"] = last_backend()  # (not through nn.Module.__setattr__: per call)
        return out

    def __prepare_scriptable__(self):
        raise RuntimeError(SCRIPT_UNSUPPORTED.format(type(self).__name__))

    #: The path the last call took: "triton", "triton-interpreter" or "torch" (None before a call).
    last_backend = None
    # Defaults of attributes added since 0.1, for modules pickled by it.
    backend = None
    token_scale = 1.0

    def extra_repr(self) -> str:
        position = "sinusoidal" if isinstance(self.pos_emb, SinusoidalPositionEmbedding) else "learned"
        backend = _repr_backend(self.last_backend, self.tok_emb.weight.device, self.backend)
        return (f"vocab_size={self.vocab_size}, context_length={self.context_length}, "
                f"embedding_dim={self.embedding_dim}, position={position}, check_ids={self.check_ids!r}"
                + ("" if self.token_scale == 1.0 else f", token_scale={self.token_scale:g}") + f", {backend}")


def lookup_with(tok: nn.Module, pos: nn.Module, drop: nn.Dropout, check_ids, token_scale: float,
                backend: Optional[str], input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                past_length: int = 0) -> torch.Tensor:
    """What a FusedInputEmbedding over these modules computes (its forward, without the module):
    for callers that hold the modules but must not build a module, e.g. inside torch.compile."""
    # fused_input_embedding's arguments, read from the modules at every call; positionally,
    # because at GPT-2 sizes the host time of a call is what users feel.
    # A parameter's own dict first: ``tok.weight`` goes through nn.Module.__getattr__ (0.5 us).
    # (A parametrized weight, or the sinusoidal table's buffer, is not there: read as attributes.)
    token_weight = tok._parameters.get("weight")
    if token_weight is None:
        token_weight = tok.weight
    position_weight = pos._parameters.get("weight")
    if position_weight is None:
        position_weight = pos.weight
    return _fused(input_ids, token_weight, position_weight, position_ids, past_length,
                  (tok.padding_idx, tok.max_norm, tok.norm_type, tok.scale_grad_by_freq, tok.sparse,
                   pos.padding_idx, pos.max_norm, pos.norm_type, pos.scale_grad_by_freq, pos.sparse),
                  drop.p if drop.training else 0.0, check_ids, token_scale, backend,
                  tok.__dict__.get("tokemb_fast_tensor_parallel"))  # (tokemb_fast.parallel's layout)


def encoder_lookup_with(parts, pad_position_id: Optional[int], check_ids, backend: Optional[str],
                        input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                        position_ids: Optional[torch.Tensor] = None, past_length: int = 0) -> torch.Tensor:
    """What a FusedEncoderEmbedding over ``parts`` (a mapping with its submodules' names, such as a
    Hugging Face embeddings module's ``_modules``) computes, without building the module."""
    # (No token-type table, or no LayerNorm: None, held as a plain attribute.)
    word, position, token_type = parts["word_embeddings"], parts["position_embeddings"], \
        parts.get("token_type_embeddings")
    layer_norm, drop = parts.get("LayerNorm"), parts["dropout"]
    return fused_encoder_embedding(
        input_ids, word.weight, position.weight, None if token_type is None else token_type.weight,
        token_type_ids, position_ids, past_length, layer_norm=layer_norm is not None,
        layer_norm_weight=None if layer_norm is None else layer_norm.weight,
        layer_norm_bias=None if layer_norm is None else layer_norm.bias,
        layer_norm_eps=1e-12 if layer_norm is None else layer_norm.eps, pad_position_id=pad_position_id,
        padding_idx=word.padding_idx, position_padding_idx=position.padding_idx,
        token_type_padding_idx=None if token_type is None else token_type.padding_idx,
        dropout_p=drop.p if drop.training else 0.0, check_ids=check_ids, backend=backend)


def _repr_backend(last_backend, device, backend) -> str:
    """The backend argument if one was given, then the path the last call took, or before any call
    the path a call would take (named last_backend, as the attribute: not the constructor's backend)."""
    chosen = "" if backend is None else f"backend={backend!r}, "
    if last_backend is not None:
        return f"{chosen}last_backend={last_backend!r}"
    try:
        return f"{chosen}last_backend=None (a call would take {backend_name(device, backend)!r})"
    except (RuntimeError, ValueError) as error:  # no path can run on these tables
        return f"{chosen}last_backend=None (no path can run: {error})"


def _module_backend(backend: Optional[str]) -> Optional[str]:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (TOKEMB_FAST_BACKEND decides), got {backend!r}")
    return backend


def _as_dropout(dropout) -> nn.Dropout:
    if isinstance(dropout, nn.Dropout):
        return dropout
    if isinstance(dropout, nn.Module):
        raise TypeError(f"dropout must be a probability or an nn.Dropout, got {type(dropout).__name__}")
    return nn.Dropout(check_dropout(dropout, "dropout"))


class FusedEncoderEmbedding(nn.Module):
    """The encoder families' embedding (BERT, RoBERTa, DistilBERT, ELECTRA, XLM-RoBERTa), fused:
    ``dropout(LayerNorm(word_embeddings(ids) + token_type_embeddings(types) + position_embeddings(positions)))``.

    Args:
        vocab_size, max_position_embeddings, hidden_size: the tables' rows and D.
        type_vocab_size: rows of the token-type table (BERT's 2); 0 or None: no token types (DistilBERT).
        padding_idx, position_padding_idx, token_type_padding_idx: rows of the word, position and
            token-type tables that get no gradient.
        pad_position_id: RoBERTa's positions, made from the padding with this pad token id when no
            position_ids are given (see ``fused_encoder_embedding``); None: past_length + arange(T).
        layer_norm, layer_norm_eps: the LayerNorm of the sum (True: with weight and bias).
        dropout, check_ids, backend, device, dtype: as ``FusedInputEmbedding``'s.

    Submodules are named as in Hugging Face's ``BertEmbeddings`` (``word_embeddings``,
    ``position_embeddings``, ``token_type_embeddings``, ``LayerNorm``, ``dropout``), so its
    state_dict loads into this module and back. Read at every call, as FusedInputEmbedding reads its own.
    """

    def __init__(self, vocab_size: int, max_position_embeddings: int, hidden_size: int, *,
                 type_vocab_size: Optional[int] = 2, padding_idx: Optional[int] = None,
                 position_padding_idx: Optional[int] = None, pad_position_id: Optional[int] = None,
                 token_type_padding_idx: Optional[int] = None, layer_norm: bool = True, layer_norm_eps: float = 1e-12, dropout: float = 0.0, check_ids=True,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        check_table_options("word", vocab_size, padding_idx, None, 2.0)
        check_table_options("position", max_position_embeddings, position_padding_idx, None, 2.0)
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=padding_idx, **factory)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size,
                                                padding_idx=position_padding_idx, **factory)
        if token_type_padding_idx is not None and not type_vocab_size:
            raise ValueError("token_type_padding_idx was given but there is no token-type table (type_vocab_size)")
        if type_vocab_size:
            check_table_options("token type", type_vocab_size, token_type_padding_idx, None, 2.0)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size, padding_idx=token_type_padding_idx,
                                                  **factory) if type_vocab_size else None
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps, **factory) if layer_norm else None
        self._set_call_options(dropout, pad_position_id, check_ids, backend)

    def _set_call_options(self, dropout, pad_position_id, check_ids, backend) -> None:
        self.dropout = _as_dropout(dropout)
        check_pad_position_id(pad_position_id)
        self.pad_position_id = pad_position_id
        self.check_ids = check_mode(check_ids)
        self.backend = _module_backend(backend)

    @classmethod
    def from_embeddings(cls, embeddings: Optional[nn.Module] = None, *, word_embeddings: Optional[nn.Embedding] = None,
                        position_embeddings: Optional[nn.Embedding] = None,
                        token_type_embeddings: Optional[nn.Embedding] = None, layer_norm: Optional[nn.Module] = None,
                        dropout=0.0, pad_position_id: Optional[int] = None, check_ids=True,
                        backend: Optional[str] = None) -> "FusedEncoderEmbedding":
        """Wrap existing modules (shared, never copied): a Hugging Face ``BertEmbeddings``-style module
        (``word_embeddings``, ``position_embeddings``, optional ``token_type_embeddings``, ``LayerNorm``,
        ``dropout``; RoBERTa's and XLM-RoBERTa's bring their ``padding_idx`` as pad_position_id), or the
        parts as keywords."""
        if embeddings is not None:
            word_embeddings = embeddings.word_embeddings
            position_embeddings = embeddings.position_embeddings
            token_type_embeddings = getattr(embeddings, "token_type_embeddings", None)
            layer_norm = embeddings.LayerNorm
            dropout = embeddings.dropout
            if pad_position_id is None and type(embeddings).__name__ in ("RobertaEmbeddings", "XLMRobertaEmbeddings"):
                pad_position_id = embeddings.padding_idx
        for name, table in (("word_embeddings", word_embeddings), ("position_embeddings", position_embeddings),
                            ("token_type_embeddings", token_type_embeddings)):
            if table is None and name == "token_type_embeddings":
                continue
            if not isinstance(table, nn.Embedding):
                raise TypeError(f"{name} must be an nn.Embedding, got {type(table).__name__}")
            for option in ("max_norm", "scale_grad_by_freq", "sparse"):
                if getattr(table, option):
                    raise ValueError(f"{name} has {option} set, which the encoder op does not support (the encoder "
                                     f"families do not use it)")
            if table.embedding_dim != word_embeddings.embedding_dim:
                raise ValueError(f"{name} has embedding_dim {table.embedding_dim} but word_embeddings has "
                                 f"{word_embeddings.embedding_dim}")
        if layer_norm is not None:
            if not isinstance(layer_norm, nn.LayerNorm) or tuple(layer_norm.normalized_shape) != \
                    (word_embeddings.embedding_dim,):
                raise TypeError(f"layer_norm must be an nn.LayerNorm over the last dimension "
                                f"({word_embeddings.embedding_dim}), got {layer_norm!r}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.word_embeddings = word_embeddings
        self.position_embeddings = position_embeddings
        self.token_type_embeddings = token_type_embeddings
        self.LayerNorm = layer_norm
        self._set_call_options(dropout, pad_position_id, check_ids, backend)
        return self

    @property
    def embedding_dim(self) -> int:
        return self.word_embeddings.embedding_dim

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, past_length: int = 0) -> torch.Tensor:
        out = encoder_lookup_with(self._modules, self.pad_position_id, self.check_ids, self.backend, input_ids,
                                  token_type_ids, position_ids, past_length)
        if not torch.compiler.is_compiling():
            self.__dict__["last_backend"] = encoder_last_backend()
        return out

    last_backend = None

    def __prepare_scriptable__(self):
        raise RuntimeError(SCRIPT_UNSUPPORTED.format(type(self).__name__))

    def extra_repr(self) -> str:
        kind = "from padding (RoBERTa)" if self.pad_position_id is not None else "absolute"
        backend = _repr_backend(self.last_backend, self.word_embeddings.weight.device, self.backend)
        return (f"vocab_size={self.word_embeddings.num_embeddings}, "
                f"max_position_embeddings={self.position_embeddings.num_embeddings}, hidden_size={self.embedding_dim}, "
                f"token_types={0 if self.token_type_embeddings is None else self.token_type_embeddings.num_embeddings}, "
                f"positions={kind}, layer_norm={self.LayerNorm is not None}, check_ids={self.check_ids!r}, "
                f"{backend}")

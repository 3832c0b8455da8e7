"""The per-call options of the fused op, bundled in two small hashable tuples.

``LookupOptions`` travels from ``fused_input_embedding`` through ``FusedInputEmbeddingFunction``
to the launchers, and is part of the keys under which launch plans are cached: a NamedTuple,
because it is built on every call (cheaply) and hashed on every call (cheaply).
"""
from typing import NamedTuple, Optional, Union

#: ``check_ids`` values. True: the kernel records any id outside its table in a device flag and
#: the error is raised later without a host sync (see ``tokemb_fast.id_check``). "sync": ids are
#: checked before the launch (one host sync per call on a GPU). False: no check at all (an id
#: outside its table still never reads memory: its output row is NaN).
CHECK_MODES = (True, False, "sync")


class TableOptions(NamedTuple):
    """``nn.Embedding``'s gradient options for one table, as the kernels take them."""

    #: The row that receives no gradient, as a row index >= 0 (negative values are normalised by
    #: ``tokemb_fast.validation.check_table_options``), or None.
    padding_idx: Optional[int] = None
    #: Divide each row's gradient by how often the row is looked up in the call.
    scale_grad_by_freq: bool = False
    #: Return the gradient as a sparse COO tensor (``nn.Embedding(sparse=True)``'s).
    sparse: bool = False


class TokenShard(NamedTuple):
    """The token table is one rank's rows of a vocabulary split across a tensor-parallel group
    (``tokemb_fast.parallel``): ids outside ``[row_offset, row_offset + rows)`` contribute zero
    here, and the sum over the group is the op on the whole table."""

    #: Global id of this shard's first row.
    row_offset: int
    #: The whole vocabulary's size: what ids are checked against.
    vocab_size: int
    #: Whether this rank adds the position rows (one rank of the group does, so the sum has them once).
    add_positions: bool


class LookupOptions(NamedTuple):
    """Everything about a call of the op that is not a tensor."""

    token: TableOptions = TableOptions()
    position: TableOptions = TableOptions()
    #: First position when no position_ids are given (KV-cache decoding).
    past_length: int = 0
    #: Probability of the fused dropout of the sum; 0 is off. With p > 0 the autograd Function
    #: also takes the call's seed (``tokemb_fast.dropout_seed``).
    dropout_p: float = 0.0
    #: One of ``CHECK_MODES``.
    check_ids: Union[bool, str] = True
    #: The token rows are multiplied by this before the sum (BioGPT's sqrt(D)); 1.0 is off.
    token_scale: float = 1.0
    #: A ``TokenShard`` when the token table is one rank's shard of the vocabulary; None: all of it.
    #: ``token.padding_idx`` is then a row of the shard (None when the padding row is elsewhere).
    shard: Optional[TokenShard] = None


def check_mode(check_ids) -> Union[bool, str]:
    """check_ids as one of CHECK_MODES, or a ValueError naming the choices."""
    if isinstance(check_ids, bool) or (isinstance(check_ids, str) and check_ids == "sync"):
        return check_ids
    raise ValueError(f"check_ids must be True (checked on the device, raised without a host sync), 'sync' "
                     f"(checked before the launch) or False (not checked), got {check_ids!r}")

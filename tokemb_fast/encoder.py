"""The encoder families' embedding: ``fused_encoder_embedding`` and its autograd Function.

BERT, RoBERTa, DistilBERT, ELECTRA and XLM-RoBERTa (and the sentence-transformers models built on
them) embed their input as ``dropout(LayerNorm(word[ids] + token_type[types] + position[positions]))``.
On the Triton path that is one kernel (kernels/encoder.py) and its backward one kernel plus the
GPT op's table-gradient kernels, one per table; on the plain path it is PyTorch's own ops in
Hugging Face's order (``reference.encoder_embedding_reference``), so a swapped model gives the
unswapped one's results exactly there.

Data flow as for the GPT op: FusedEncoderEmbedding (module.py) -> fused_encoder_embedding (checks,
path) -> FusedEncoderEmbeddingFunction -> triton_encoder_ops -> kernels/encoder.py. Saved for the
backward: the ids, positions and token types as given, each row's mean and 1/std, the dropout
seed, and references to the tables (the sum is recomputed from them: no B*T*D tensor is kept).

Autograd: backward through the kernels; double backward (``create_graph=True``) by recomputing
the forward in PyTorch's ops (with the kernel's dropout mask) and differentiating that; forward-mode
AD and torch.func transforms take the plain composition on the tables' device from the start.
"""
import numbers
import threading
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import id_check
from .autograd import (_constant, _dropout_mask, _dropout_scale, _forward_ad_active, _in_transform, _kernel_table,
                       _legacy_batched, _ops, _PLAIN, dropout_seed, id_flag)
from .functional import _backend_variable, resolve_backend
from .options import check_mode
from .reference import default_position_ids, encoder_embedding_reference, positions_from_padding
from .validation import (check_dense, check_dropout, check_id_ranges, check_ids_like_positions, check_inputs,
                         check_pad_position_id, check_table_options)

_encoder_ops = None


def _ops_encoder():
    global _encoder_ops
    if _encoder_ops is None:
        _ops()  # (the GPT op's launchers first: the encoder's import theirs)
        from . import triton_encoder_ops
        _encoder_ops = triton_encoder_ops
    return _encoder_ops


class EncoderOptions(NamedTuple):
    """Everything about a call of the encoder op that is not a tensor."""

    past_length: int = 0
    #: RoBERTa's positions: made from the padding with this pad id when no position_ids are given; -1: off.
    pad_position_id: int = -1
    #: Rows that get no gradient (row indices >= 0), or None.
    padding_idx: Optional[int] = None
    position_padding_idx: Optional[int] = None
    layer_norm: bool = True
    layer_norm_eps: float = 1e-12
    dropout_p: float = 0.0
    check_ids: object = True
    #: The token-type table's row that gets no gradient (>= 0), or None. (Last: added in 0.3.)
    token_type_padding_idx: Optional[int] = None


class _Prepared(NamedTuple):
    use_triton: bool
    backend: str
    options: EncoderOptions


_prepared = {}
_last = threading.local()


def last_backend() -> Optional[str]:
    return getattr(_last, "backend", None)


def fused_encoder_embedding(
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
    dropout_p: float = 0.0,
    training: bool = True,
    check_ids=True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``dropout(LayerNorm(word_weight[ids] + token_type_weight[token_type_ids] + position_weight[positions]))``
    in one pass, the sum added in that order (Hugging Face's).

    Args:
        input_ids: int64 or int32 ids, [T] or [B, T].
        word_weight, position_weight: [vocab_size, D] and [num_positions, D] tables.
        token_type_weight: optional [type_vocab_size, D] table (BERT's segment embedding); none
            for DistilBERT. token_type_ids: [T], [1, T] or [B, T]; default all zeros.
        position_ids: [T], [1, T] or [B, T]; default past_length + arange(T), or with
            pad_position_id RoBERTa's positions made from the padding (a non-pad id at step t gets
            pad_position_id + past_length + the count of non-pad ids up to t; a pad id gets
            pad_position_id), computed in the kernel.
        layer_norm, layer_norm_weight, layer_norm_bias, layer_norm_eps: the LayerNorm of the sum
            (statistics in fp32, fp64 for fp64 tables); weight and bias [D] or None.
        padding_idx, position_padding_idx, token_type_padding_idx: rows of the word, position and
            token-type tables that get no gradient (negative: counted from the end), as nn.Embedding's.
        dropout_p, training: dropout of the result, fused (mask regenerated in the backward).
        check_ids, backend: as ``fused_input_embedding``'s; token-type ids are checked too.

    Returns:
        [T, D] or [B, T, D] in the tables' dtype.
    """
    options = (past_length, pad_position_id, padding_idx, position_padding_idx, layer_norm, layer_norm_eps,
               dropout_p if training else 0.0, check_ids, token_type_padding_idx)
    tensors = (input_ids, word_weight, position_weight, token_type_weight, token_type_ids, position_ids,
               layer_norm_weight, layer_norm_bias)
    try:
        key = (backend, _backend_variable(), torch.compiler.is_compiling() or None) + tuple(
            None if t is None else (type(t), t.shape, t.dtype, t.device, t.layout) for t in tensors) + \
            tuple((value, type(value)) for value in options)
        prepared = _prepared.get(key)
    except (AttributeError, TypeError, RuntimeError):  # not tensors, nested ones, unhashable options
        key, prepared = None, None
    if prepared is None:
        prepared = _prepare(*tensors, *options, backend)
        if key is not None:
            if len(_prepared) >= 4096:
                _prepared.clear()
            _prepared[key] = prepared
    options = prepared.options
    _last.backend = prepared.backend
    one_dim = input_ids.dim() == 1
    if one_dim:  # (as [1, T]; the extra ids as [1, T] too)
        input_ids = input_ids.unsqueeze(0)
        position_ids = None if position_ids is None else position_ids.reshape(1, -1)
        token_type_ids = None if token_type_ids is None else token_type_ids.reshape(1, -1)
    if position_ids is not None and position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if token_type_ids is not None and token_type_ids.dim() == 1:
        token_type_ids = token_type_ids.unsqueeze(0)
    if not prepared.use_triton or torch._C._get_tracing_state() is not None or _forward_ad_active() or \
            _in_transform() or _legacy_batched(input_ids, word_weight, position_weight, token_type_weight):
        # The plain path, and the Triton path under forward-mode AD, torch.func and jit tracing: PyTorch's
        # own ops (on the tables' device), differentiable in every mode.
        out = _plain(input_ids, word_weight, position_weight, token_type_weight, token_type_ids, position_ids,
                     layer_norm_weight, layer_norm_bias, options)
        if options.dropout_p > 0:
            out = F.dropout(out, options.dropout_p, training=True)
    else:
        if options.dropout_p > 0 and options.check_ids is True and not torch.compiler.is_compiling() and \
                not torch._C._len_torch_dispatch_stack():
            id_check.settle(word_weight.device)  # (an earlier call's error before the seed is drawn)
        seed = dropout_seed(word_weight.device) if options.dropout_p > 0 else None
        tensors = (input_ids, word_weight, position_weight, token_type_weight, token_type_ids, position_ids,
                   layer_norm_weight, layer_norm_bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors[1:]):
            out = FusedEncoderEmbeddingFunction.apply(*tensors, options, seed)[0]
        else:  # no gradient can flow: no autograd node, no statistics kept, the id check as for inference
            out = _run_forward(*tensors, options, seed, training=False)[0]
    return out[0] if one_dim else out


def _prepare(input_ids, word_weight, position_weight, token_type_weight, token_type_ids, position_ids,
             layer_norm_weight, layer_norm_bias, past_length, pad_position_id, padding_idx, position_padding_idx,
             layer_norm, layer_norm_eps, dropout_p, check_ids, token_type_padding_idx, backend) -> _Prepared:
    """Every check that does not read tensor values (a clear exception, or what the call needs)."""
    if not isinstance(word_weight, torch.Tensor):
        raise TypeError(f"word_weight must be a torch.Tensor, got {type(word_weight).__name__}")
    use_triton = resolve_backend(backend, word_weight.device) == "triton"
    check_pad_position_id(pad_position_id)
    try:
        check_inputs(input_ids, word_weight, position_weight, position_ids, past_length,
                     default_positions=pad_position_id is None)
    except (TypeError, ValueError) as error:  # (named as this op names its tables)
        raise type(error)(str(error).replace("token_weight", "word_weight")) from None
    dim = word_weight.shape[1]
    if token_type_weight is not None:
        if not isinstance(token_type_weight, torch.Tensor):
            raise TypeError(f"token_type_weight must be a torch.Tensor or None, got {type(token_type_weight).__name__}")
        check_dense("token_type_weight", token_type_weight)
        if token_type_weight.dim() != 2 or token_type_weight.shape[1] != dim:
            raise ValueError(f"token_type_weight must be [type_vocab_size, {dim}] (the word table's embedding_dim), "
                             f"got shape {tuple(token_type_weight.shape)}")
        if token_type_weight.dtype != word_weight.dtype or token_type_weight.device != word_weight.device:
            raise ValueError(f"token_type_weight is {token_type_weight.dtype} on {token_type_weight.device} but "
                             f"word_weight is {word_weight.dtype} on {word_weight.device}; the tables must match")
        if token_type_weight.shape[0] == 0 and input_ids.numel() > 0:
            raise IndexError("the token-type table has no rows, so no token type id can be looked up")
    if token_type_ids is not None:
        if token_type_weight is None:
            raise ValueError("token_type_ids were given but there is no token_type_weight to look them up in")
        check_ids_like_positions("token_type_ids", token_type_ids, input_ids)
    if not isinstance(layer_norm, bool):
        raise TypeError(f"layer_norm must be True or False, got {type(layer_norm).__name__}")
    for name, tensor in (("layer_norm_weight", layer_norm_weight), ("layer_norm_bias", layer_norm_bias)):
        if tensor is None:
            continue
        if not layer_norm:
            raise ValueError(f"{name} was given with layer_norm=False")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}")
        check_dense(name, tensor)
        if tuple(tensor.shape) != (dim,) or not tensor.is_floating_point() or tensor.device != word_weight.device:
            raise ValueError(f"{name} must be a floating-point [{dim}] tensor on {word_weight.device} (the "
                             f"embedding_dim), got a {tensor.dtype} tensor of shape {tuple(tensor.shape)} on "
                             f"{tensor.device}")
        # PyTorch's layer_norm takes parameters of its input's dtype, or fp32 ones for a half-precision
        # input (mixed precision keeps norms in fp32); anything else it refuses on one device or another.
        if tensor.dtype != word_weight.dtype and not (
                tensor.dtype == torch.float32 and word_weight.dtype in (torch.float16, torch.bfloat16)):
            raise ValueError(f"{name} is {tensor.dtype} but the tables are {word_weight.dtype}: the LayerNorm's "
                             f"parameters must have the tables' dtype, or be float32 for float16/bfloat16 tables")
    if layer_norm_weight is not None and layer_norm_bias is not None and \
            layer_norm_weight.dtype != layer_norm_bias.dtype:
        raise ValueError(f"layer_norm_weight is {layer_norm_weight.dtype} but layer_norm_bias is "
                         f"{layer_norm_bias.dtype}: the LayerNorm's parameters must have one dtype")
    if isinstance(layer_norm_eps, bool) or not isinstance(layer_norm_eps, numbers.Real) or \
            not 0 <= layer_norm_eps < float("inf"):
        raise ValueError(f"layer_norm_eps must be a finite number >= 0, got {layer_norm_eps!r}")
    padding_idx = check_table_options("word", word_weight.shape[0], padding_idx, None, 2.0)
    position_padding_idx = check_table_options("position", position_weight.shape[0], position_padding_idx, None, 2.0)
    if token_type_padding_idx is not None and token_type_weight is None:
        raise ValueError("token_type_padding_idx was given but there is no token_type_weight")
    if token_type_weight is not None:
        token_type_padding_idx = check_table_options("token type", token_type_weight.shape[0], token_type_padding_idx,
                                                     None, 2.0)
    dropout_p = check_dropout(dropout_p)
    check_ids = check_mode(check_ids)
    options = EncoderOptions(past_length, -1 if pad_position_id is None else pad_position_id, padding_idx,
                             position_padding_idx, layer_norm, float(layer_norm_eps), dropout_p, check_ids,
                             token_type_padding_idx)
    name = "torch" if not use_triton else "triton-interpreter" if word_weight.device.type == "cpu" else "triton"
    return _Prepared(use_triton, name, options)


def _positions(input_ids, position_ids, options):
    if position_ids is not None:
        return position_ids
    if options.pad_position_id >= 0:
        return positions_from_padding(input_ids, options.pad_position_id, options.past_length)
    return default_position_ids(input_ids.shape[-1], options.past_length, input_ids.device).unsqueeze(0)


def _check_ranges(input_ids, word_weight, position_weight, token_type_weight, token_type_ids, position_ids, options):
    """Raise IndexError for the first kind of id outside its table (reads the ids: a host sync on a GPU)."""
    check_id_ranges(input_ids, word_weight.shape[0], _positions(input_ids, position_ids, options),
                    position_weight.shape[0], token_type_ids,
                    0 if token_type_weight is None else token_type_weight.shape[0])


def _plain(input_ids, word_weight, position_weight, token_type_weight, token_type_ids, position_ids,
           layer_norm_weight, layer_norm_bias, options):
    """encoder_embedding_reference with the call's checks: bad ids raise IndexError naming them
    (check_ids True or "sync") or give NaN rows that add nothing to any gradient (False)."""
    positions = _positions(input_ids, position_ids, options)
    if options.check_ids:
        compiling = torch.compiler.is_compiling()
        if input_ids.device.type == "cpu" and not compiling:
            # F.embedding checks every id on a CPU: ours is raised when it finds one.
            try:
                return _reference(input_ids, word_weight, position_weight, token_type_weight, token_type_ids,
                                  positions, layer_norm_weight, layer_norm_bias, options)
            except IndexError:
                _check_ranges(input_ids, word_weight, position_weight, token_type_weight, token_type_ids, positions,
                              options)
                raise
        if not compiling and torch._C._get_tracing_state() is None:  # (on a GPU a bad id would stop the process)
            _check_ranges(input_ids, word_weight, position_weight, token_type_weight, token_type_ids, positions,
                          options)
        return _reference(input_ids, word_weight, position_weight, token_type_weight, token_type_ids, positions,
                          layer_norm_weight, layer_norm_bias, options)
    # Unchecked: bad ids look up row 0 (never out of bounds), their rows become NaN after the
    # LayerNorm, and the gradient through those rows is zero.
    valid = (input_ids >= 0) & (input_ids < word_weight.shape[0])
    safe = [torch.where(valid, input_ids, 0)]
    for ids, table in ((positions, position_weight), (token_type_ids, token_type_weight)):
        if ids is None or table is None:
            safe.append(ids)
            continue
        inside = (ids >= 0) & (ids < table.shape[0])
        valid = valid & inside
        safe.append(torch.where(inside, ids, 0))
    out = _reference(safe[0], word_weight, position_weight, token_type_weight, safe[2], safe[1], layer_norm_weight,
                     layer_norm_bias, options)
    return out.masked_fill(~valid.unsqueeze(-1), float("nan"))


def _reference(input_ids, word_weight, position_weight, token_type_weight, token_type_ids, positions,
               layer_norm_weight, layer_norm_bias, options):
    return encoder_embedding_reference(
        input_ids, word_weight, position_weight, token_type_weight, token_type_ids, positions,
        layer_norm=options.layer_norm, layer_norm_weight=layer_norm_weight, layer_norm_bias=layer_norm_bias,
        layer_norm_eps=options.layer_norm_eps, padding_idx=options.padding_idx,
        position_padding_idx=options.position_padding_idx, token_type_padding_idx=options.token_type_padding_idx)


# --- the Triton path -------------------------------------------------------------------------------

_record = threading.local()


class FusedEncoderEmbeddingFunction(torch.autograd.Function):
    """Autograd for the fused encoder op (Triton path)::

        FusedEncoderEmbeddingFunction.apply(input_ids [B, T], word_weight, position_weight,
            token_type_weight, token_type_ids, position_ids, layer_norm_weight, layer_norm_bias,
            options: EncoderOptions, dropout_seed)

    Arguments as ``fused_encoder_embedding`` checks and shapes them ([B, T] or [1, T] ids; padding
    rows >= 0; with dropout, the call's seed). Backward and double backward; forward-mode AD and
    torch.func go through ``fused_encoder_embedding``, which takes PyTorch's ops under them.
    """

    @staticmethod
    def forward(input_ids, word_weight, position_weight, token_type_weight, token_type_ids, position_ids,
                layer_norm_weight, layer_norm_bias, options, seed):
        out, mean, rstd, record = _run_forward(input_ids, word_weight, position_weight, token_type_weight,
                                               token_type_ids, position_ids, layer_norm_weight, layer_norm_bias,
                                               options, seed, training=True)
        _record.value = record
        return out, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input_ids, word_weight, position_weight, token_type_weight, token_type_ids, position_ids, layer_norm_weight,
         layer_norm_bias, options, seed) = inputs
        _out, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.id_record = None if torch.compiler.is_compiling() else getattr(_record, "value", None)
        _record.value = None
        ctx.options = options
        ctx.save_for_backward(input_ids, word_weight, position_weight, token_type_weight, token_type_ids,
                              position_ids, layer_norm_weight, layer_norm_bias, seed, mean, rstd)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean=None, _grad_rstd=None):
        record = ctx.id_record
        if record is not None and not record.checked:
            record.guard.check(record)  # an IndexError for a bad id, before any gradient exists
        (input_ids, word_weight, position_weight, token_type_weight, token_type_ids, position_ids, layer_norm_weight,
         layer_norm_bias, seed, mean, rstd) = ctx.saved_tensors
        options = ctx.options
        needs = ctx.needs_input_grad
        if grad_out is None:
            return (None,) * 10
        if not torch.compiler.is_compiling() and (torch.is_grad_enabled() or _legacy_batched(grad_out)):
            # Double backward (differentiable gradients), or batched upstream gradients
            # (is_grads_batched, gradcheck's check_batched_grad: no storage for a kernel): PyTorch's ops.
            grads = _differentiable_backward(grad_out, input_ids, word_weight, position_weight, token_type_weight,
                                             token_type_ids, position_ids, layer_norm_weight, layer_norm_bias, seed,
                                             options, needs)
        else:
            grads = _kernel_backward(grad_out, mean, rstd, input_ids, word_weight, position_weight, token_type_weight,
                                     token_type_ids, position_ids, layer_norm_weight, layer_norm_bias, seed, options,
                                     needs)
        word, position, token_type, ln_weight, ln_bias = grads
        return None, word, position, token_type, None, None, ln_weight, ln_bias, None, None


def _run_forward(input_ids, word_weight, position_weight, token_type_weight, token_type_ids, position_ids,
                 layer_norm_weight, layer_norm_bias, options, seed, training):
    """The forward launch, arguments checked: (out, mean, rstd, the id check's record or None).
    training: a backward may come (the row statistics are kept, and the backward checks the ids);
    otherwise the thread's next call checks them."""
    ops = _ops_encoder()
    device = word_weight.device
    compiling = torch.compiler.is_compiling()
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):  # Triton launches on the current device
            return _run_forward(input_ids, word_weight, position_weight, token_type_weight, token_type_ids,
                                position_ids, layer_norm_weight, layer_norm_bias, options, seed, training)
    word_weight, position_weight, token_type_weight, layer_norm_weight, layer_norm_bias = _kernel_tensors(
        word_weight, position_weight, token_type_weight, layer_norm_weight, layer_norm_bias, compiling)
    plain = not compiling and all(type(t) in _PLAIN for t in (input_ids, word_weight, position_weight,
                                                               token_type_weight, token_type_ids, position_ids))
    direct = plain and torch._C._len_torch_dispatch_stack() == 0
    flag = guard = None
    if options.check_ids is True:
        flag, guard = id_flag(device, plain, direct, compiling)
    elif options.check_ids == "sync" and not compiling:
        _check_ranges(input_ids, word_weight, position_weight, token_type_weight, token_type_ids, position_ids,
                      options)
    scale = None if seed is None else _dropout_scale(options.dropout_p, device, cache=direct)
    eps = _constant(options.layer_norm_eps, device, cache=direct) if options.layer_norm else None
    arguments = (input_ids, word_weight, position_weight, token_type_weight, position_ids, token_type_ids,
                 layer_norm_weight, layer_norm_bias, eps, options.past_length, options.pad_position_id,
                 options.pad_position_id >= 0 and position_ids is None, options.layer_norm, training,
                 options.dropout_p, seed, scale)
    launch = ops.encoder_embedding_forward.direct if direct else ops.encoder_embedding_forward
    record = None
    if guard is not None:
        (out, mean, rstd), record = guard.launch(not training, launch, *arguments, flag)
    elif direct or flag is not None:
        out, mean, rstd = launch(*arguments, flag)
    else:  # through dispatch with no flag to write: the op that mutates nothing (exported graphs hold it)
        out, mean, rstd = ops.encoder_embedding(*arguments)
    return out, mean, rstd, record


def _kernel_tensors(word_weight, position_weight, token_type_weight, layer_norm_weight, layer_norm_bias, compiling):
    """The tables as the kernels read them (the values a lookup sees, unit column stride), and the
    LayerNorm parameters contiguous."""
    tables = [None if table is None else _kernel_table(table, compiling)
              for table in (word_weight, position_weight, token_type_weight)]
    vectors = [None if vector is None else vector.resolve_neg().contiguous()
               for vector in (layer_norm_weight, layer_norm_bias)]
    return (*tables, *vectors)


def _kernel_backward(grad_out, mean, rstd, input_ids, word_weight, position_weight, token_type_weight, token_type_ids,
                     position_ids, layer_norm_weight, layer_norm_bias, seed, options, needs):
    encoder_ops = _ops_encoder()
    ops = _ops()
    ln_parameters = layer_norm_weight, layer_norm_bias  # (their gradients take these dtypes)
    word_weight, position_weight, token_type_weight, layer_norm_weight, layer_norm_bias = _kernel_tensors(
        word_weight, position_weight, token_type_weight, layer_norm_weight, layer_norm_bias,
        torch.compiler.is_compiling())
    direct = not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0 and \
        all(type(t) in _PLAIN for t in (grad_out, input_ids, position_ids, token_type_ids))
    device = grad_out.device
    scale = None if seed is None else _dropout_scale(options.dropout_p, device, cache=direct)
    backward = encoder_ops.encoder_embedding_backward.direct if direct else encoder_ops.encoder_embedding_backward
    from_padding = options.pad_position_id >= 0 and position_ids is None
    grad_sum, grad_ln_weight, grad_ln_bias = backward(
        grad_out, mean, rstd, input_ids, word_weight, position_weight, token_type_weight, position_ids,
        token_type_ids, layer_norm_weight, options.past_length, options.pad_position_id, from_padding,
        options.layer_norm, options.dropout_p, seed, scale)
    dense = ops.embedding_dense_grad.direct if direct else ops.embedding_dense_grad
    batch = grad_sum.shape[0]

    def table_grad(keys, num_rows, padding_idx, past_length=0):
        return dense(grad_sum, keys, num_rows, past_length, -1 if padding_idx is None else padding_idx, False, 1,
                     0.0, None, None, None)

    word = table_grad(input_ids, word_weight.shape[0], options.padding_idx) if needs[1] else None
    position = None
    if needs[2]:
        if position_ids is None and not from_padding:
            position = table_grad(None, position_weight.shape[0], options.position_padding_idx, options.past_length)
        else:
            keys = positions_from_padding(input_ids, options.pad_position_id, options.past_length) if from_padding \
                else position_ids.expand(batch, -1)
            position = table_grad(keys, position_weight.shape[0], options.position_padding_idx)
    token_type = None
    if needs[3] and token_type_weight is not None:
        if token_type_ids is None:  # every row looked up type 0: its gradient is the sum of all rows
            accumulate = torch.float64 if grad_sum.dtype == torch.float64 else torch.float32
            token_type = torch.zeros_like(token_type_weight)
            if options.token_type_padding_idx != 0:
                token_type[0] = grad_sum.reshape(-1, grad_sum.shape[-1]).sum(0, dtype=accumulate).to(grad_sum.dtype)
        else:
            token_type = table_grad(token_type_ids.expand(batch, -1), token_type_weight.shape[0],
                                    options.token_type_padding_idx)
    ln_weight = grad_ln_weight.to(ln_parameters[0].dtype) if needs[6] and layer_norm_weight is not None else None
    ln_bias = grad_ln_bias.to(ln_parameters[1].dtype) if needs[7] and layer_norm_bias is not None else None
    return word, position, token_type, ln_weight, ln_bias


def _differentiable_backward(grad_out, input_ids, word_weight, position_weight, token_type_weight, token_type_ids,
                             position_ids, layer_norm_weight, layer_norm_bias, seed, options, needs):
    """The gradients as a differentiable function (create_graph=True): the forward recomputed in
    PyTorch's ops, times the kernel's own dropout mask, differentiated by autograd."""
    inputs = [(index, tensor) for index, tensor in ((1, word_weight), (2, position_weight), (3, token_type_weight),
                                                    (6, layer_norm_weight), (7, layer_norm_bias))
              if tensor is not None and needs[index]]
    with torch.enable_grad():
        # (Unchecked: rows of bad ids, if any, read row 0 and add nothing, as in the kernels.)
        out = _plain(input_ids, word_weight, position_weight, token_type_weight, token_type_ids, position_ids,
                     layer_norm_weight, layer_norm_bias, options._replace(check_ids=False))
        if seed is not None:
            out = out * _dropout_mask(out.shape, out.dtype, out.device, _dropout_options(options), seed)
        grads = torch.autograd.grad(out, [tensor for _, tensor in inputs], grad_out, create_graph=True,
                                    allow_unused=True)
    by_index = dict(zip((index for index, _ in inputs), grads))
    return tuple(by_index.get(index) for index in (1, 2, 3, 6, 7))


def _dropout_options(options):
    from .options import LookupOptions
    return LookupOptions(dropout_p=options.dropout_p)

"""The op: ``fused_input_embedding``.

Data flow: FusedInputEmbedding (module) -> fused_input_embedding (this file: checks, picks a
path) -> FusedInputEmbeddingFunction (autograd.py) -> the launchers (triton_ops.py) ->
kernels/. On the plain-PyTorch path ``F.embedding + F.embedding`` runs instead (the sum
``reference.py`` defines) and PyTorch's autograd differentiates it.

Every call is checked, but the outcome of the checks that look only at shapes, dtypes, devices
and options is kept per key (``_prepared``), so a call that repeats an earlier one's shapes
costs a dict lookup: at the GPT-2 sizes the host time of a call is what users feel. A repeated
plain eager call on the Triton path goes further: a second key (strides, alignment) finds its
``autograd.PlannedForward``, which launches the compiled binary directly (see ``_fused``).
"""
import os
import sys
import threading
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .autograd import (_forward_ad_active, _FusedInputEmbedding, _in_transform, apply_checked, apply_planned, dropout_seed,
                       planned_forward, run_forward)
from .id_check import new_persistent
from .id_check import settle as settle_id_checks
from .options import LookupOptions, TableOptions, check_mode
from .reference import default_position_ids, input_embedding_reference
from .validation import (check_dense, check_dropout, check_id_ranges, check_inputs, check_table_options,
                         check_token_scale)

BACKENDS = ("auto", "triton", "torch")
_TRITON_IMPORT_ERROR: Optional[BaseException] = None


def triton_available() -> bool:
    """Whether Triton imports here (checked once, without importing the kernels)."""
    global _TRITON_IMPORT_ERROR
    if _TRITON_IMPORT_ERROR is None:
        try:
            import triton  # noqa: F401  (only whether it imports)
            _TRITON_IMPORT_ERROR = False
        except ImportError as exc:
            _TRITON_IMPORT_ERROR = exc
    return _TRITON_IMPORT_ERROR is False


def interpreted() -> bool:
    """Whether Triton kernels run on Triton's CPU interpreter in this process (decided when the
    kernels are first imported, from TRITON_INTERPRET)."""
    triton_ops = sys.modules.get("tokemb_fast.triton_ops")
    # (A module another thread is still importing has no INTERPRETED yet: it is deciding it from
    # the same variable.)
    decided = getattr(triton_ops, "INTERPRETED", None)
    if decided is not None:
        return decided
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


try:
    # What TOKEMB_FAST_BACKEND holds, raw, for the per-call key: os.environ.get takes 0.7 us (it
    # encodes the name and decodes the value), a tenth of a planned call's host time; the dict
    # behind os.environ, which every assignment to os.environ updates, answers in 0.04 us.
    _ENVIRON_DATA, _BACKEND_VARIABLE = os.environ._data, os.environ.encodekey("TOKEMB_FAST_BACKEND")

    def _backend_variable():
        return _ENVIRON_DATA.get(_BACKEND_VARIABLE)
except AttributeError:  # pragma: no cover  (not CPython's os.environ)
    def _backend_variable():
        return os.environ.get("TOKEMB_FAST_BACKEND")


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """'triton' or 'torch' for a call on ``device``. Read per call, so the env var can change at run time."""
    choice = backend if backend is not None else os.environ.get("TOKEMB_FAST_BACKEND", "auto")
    choice = choice.strip().lower() if isinstance(choice, str) else choice
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (argument or TOKEMB_FAST_BACKEND), got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend 'triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                         f"not on {device.type} tensors")
    if not triton_available():
        raise RuntimeError(f"backend 'triton' was asked for but Triton cannot be imported: {_TRITON_IMPORT_ERROR}")
    if device.type == "cpu" and not interpreted():
        raise RuntimeError(CPU_NEEDS_INTERPRETER)
    return "triton"


CPU_NEEDS_INTERPRETER = ("backend 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 in the "
                         "environment before importing tokemb_fast")


#: What ``backend_name`` and ``FusedInputEmbedding.last_backend`` report.
BACKEND_NAMES = ("triton", "triton-interpreter", "torch")


def backend_name(device, backend: Optional[str] = None) -> str:
    """Which path a call on ``device`` takes now: "triton" (the compiled kernels), "triton-interpreter"
    (the kernels on Triton's CPU interpreter) or "torch" (plain PyTorch, F.embedding + F.embedding).
    Raises as a call would for a path that cannot run (e.g. backend="triton" on a meta tensor)."""
    device = torch.device(device)
    if resolve_backend(backend, device) == "torch":
        return "torch"
    return "triton-interpreter" if device.type == "cpu" else "triton"


class _Prepared(NamedTuple):
    """What the checks of a call concluded, for every later call with the same key."""
    use_triton: bool
    backend: str                    # one of BACKEND_NAMES
    options: LookupOptions          # normalised (padding rows >= 0)
    renorm: bool                    # max_norm on either table
    check_on_error: bool            # plain PyTorch on CPU: F.embedding's own IndexError triggers our check
    #: Triton calls that can be planned: PlannedForwards (False: never) by the planned key in _fused;
    #: None where none can be
    planned: Optional[dict]
    #: The kernel checks ids and the call changes state before its launch (max_norm, a dropout seed):
    #: earlier calls' errors are raised first (id_check.settle)
    settle_first: bool = False


_prepared = {}
_MAX_PREPARED = 4096
_MAX_PLANNED = 16  # layouts per _prepared key (strides and alignment rarely vary)
_PLAIN_TABLES = (torch.Tensor, torch.nn.Parameter)


def _any_dtensor(*tensors) -> bool:
    # (torch.distributed.tensor is imported by whoever made a DTensor; not here, for import time.)
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    return dtensor_module is not None and any(isinstance(tensor, dtensor_module.DTensor) for tensor in tensors)


# The path the last call on this thread took (FusedInputEmbedding.last_backend reads it).
_last = threading.local()


def last_backend() -> Optional[str]:
    """The path the last fused_input_embedding call of this thread took (see backend_name)."""
    return getattr(_last, "backend", None)


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
    check_ids=True,
    token_scale: float = 1.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``dropout(token_scale * token_weight[input_ids] + position_weight[positions])`` in one pass.

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
        check_ids: True (default): an id or position outside its table raises ``IndexError``; on
            the Triton path the kernel finds it and the error is raised without a host sync, at
            the latest in the backward of the call, or at the next call for an inference call
            (see the README). ``"sync"``: checked before the launch (one host sync on a GPU).
            False: not checked (an out-of-range id is still never dereferenced; its row is NaN).
        token_scale: multiplies the token rows before the sum (BioGPT scales by sqrt(D)); fused,
            and its gradient too.
        backend: 'auto' (Triton for CUDA tensors, PyTorch otherwise), 'triton' or 'torch';
            default from TOKEMB_FAST_BACKEND, else 'auto'.

    A token table that is a DTensor sharded on rows (``tokemb_fast.parallel``) makes this the
    vocabulary-parallel op: the result is a replicated DTensor.

    Returns:
        [T, D] or [B, T, D] in the tables' dtype.
    """
    table_options = (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, position_padding_idx,
                     position_max_norm, position_norm_type, position_scale_grad_by_freq, position_sparse)
    return _fused(input_ids, token_weight, position_weight, position_ids, past_length, table_options,
                  dropout_p if training else 0.0, check_ids, token_scale, backend)


def _fused(input_ids, token_weight, position_weight, position_ids, past_length, table_options, dropout_p, check_ids,
           token_scale, backend, output_layout=None, shard=None):
    """fused_input_embedding with nn.Embedding's ten options as one tuple, in the order of its
    signature (token table, then position table): the module's call. DTensor tables go to
    tokemb_fast.parallel (output_layout: the layout its style left, or None), which calls this
    again on the local shards with ``shard`` (a TokenShard)."""
    if (type(token_weight) not in _PLAIN_TABLES or type(position_weight) not in _PLAIN_TABLES) and \
            _any_dtensor(token_weight, position_weight):
        from .parallel import vocab_parallel_lookup
        return vocab_parallel_lookup(input_ids, token_weight, position_weight, position_ids, past_length,
                                     table_options, dropout_p, check_ids, token_scale, backend, output_layout)
    if _tracing_state() is not None and shard is None:
        return _jit_traced(input_ids, token_weight, position_weight, position_ids, past_length, table_options,
                           dropout_p, check_ids, token_scale, backend)
    compiling = torch.compiler.is_compiling()
    prepared = key = None
    if not compiling:
        try:
            # (Not the layouts, 0.1 us each: a sparse or nested tensor fails where a dense one runs, and
            # _check_layouts then says what is wrong.)
            key = (backend, _backend_variable(), input_ids.shape, input_ids.dtype, input_ids.device,
                   token_weight.shape, token_weight.dtype, token_weight.device, position_weight.shape,
                   position_weight.dtype, position_weight.device,
                   None if position_ids is None else (position_ids.shape, position_ids.dtype, position_ids.device),
                   # Types too: True == 1 and hashes alike, but only one of them is a valid past_length.
                   past_length, type(past_length), table_options, tuple(map(type, table_options)), dropout_p,
                   type(dropout_p), check_ids, type(check_ids), token_scale, type(token_scale), shard)
            prepared = _prepared.get(key)
        except (AttributeError, TypeError, RuntimeError):  # not tensors, nested ones, unhashable options:
            key = None                                         # the checks say what
    if prepared is None:
        prepared = _prepare(input_ids, token_weight, position_weight, position_ids, past_length, table_options,
                            dropout_p, check_ids, token_scale, backend, shard)
        if key is not None:
            if len(_prepared) >= _MAX_PREPARED:
                _prepared.clear()
            _prepared[key] = prepared
    options = prepared.options
    if not compiling:  # (a traced graph has no thread to tell, and Dynamo would warn of the side effect)
        _last.backend = prepared.backend

    if not prepared.use_triton:
        if check_ids and not prepared.check_on_error:
            check_id_ranges(input_ids, token_weight.shape[0] if shard is None else shard.vocab_size, position_ids,
                            position_weight.shape[0])
        if not check_ids and shard is None and (prepared.renorm or token_weight.device.type not in ("cpu", "meta")):
            # Unchecked: bad ids give NaN rows, as on the Triton path. (On a GPU F.embedding would
            # stop the process with a device-side assert; max_norm would renormalise by them.)
            out = _plain_sum_unchecked(input_ids, token_weight, position_weight, position_ids, past_length, prepared,
                                       table_options)
        else:
            try:
                out = _plain_sum(input_ids, token_weight, position_weight, position_ids, past_length, prepared,
                                 table_options)
            except IndexError:
                if check_ids or shard is not None:
                    if prepared.check_on_error:  # raise ours, naming the bad id and the limit
                        check_id_ranges(input_ids, token_weight.shape[0], position_ids, position_weight.shape[0])
                    raise
                # Unchecked, and F.embedding's own check found a bad id: NaN rows instead.
                out = _plain_sum_unchecked(input_ids, token_weight, position_weight, position_ids, past_length,
                                           prepared, table_options)
            except (RuntimeError, NotImplementedError):
                _check_layouts(input_ids, token_weight, position_weight, position_ids)
                raise
        # A different random stream from the kernels' (PyTorch's CPU/CUDA generator vs Philox in Triton).
        return F.dropout(out, dropout_p, training=True) if dropout_p > 0 else out

    if prepared.settle_first and not compiling and not _dispatch_stack_length():
        # An earlier call's error due at this call is raised before anything here changes state.
        settle_id_checks(token_weight.device)
    if prepared.renorm:
        # max_norm: rows looked up in this call are renormalised in place first, by the function
        # F.embedding uses (on the detached table, as F.embedding does), so the same rows change
        # by the same amounts. The ids are checked first, so that a rejected call changes nothing.
        max_norm, norm_type, position_max_norm, position_norm_type = (table_options[1], table_options[2],
                                                                      table_options[6], table_options[7])
        if check_ids:
            check_id_ranges(input_ids, token_weight.shape[0], position_ids, position_weight.shape[0])
        if max_norm is not None:
            _renorm_rows(token_weight, input_ids, max_norm, norm_type, checked=bool(check_ids))
        if position_max_norm is not None:
            looked_up = position_ids if position_ids is not None else \
                default_position_ids(input_ids.shape[-1], past_length, input_ids.device)
            _renorm_rows(position_weight, looked_up, position_max_norm, position_norm_type, checked=bool(check_ids))
    seed = dropout_seed(token_weight.device) if options.dropout_p > 0 else None
    if compiling:
        return _FusedInputEmbedding.apply(input_ids, token_weight, position_weight, position_ids, options, seed)
    planned_calls = prepared.planned
    planned_key = None
    if planned_calls is not None and not (type(input_ids) is torch.Tensor and type(token_weight) in _PLAIN_TABLES and
                                          type(position_weight) in _PLAIN_TABLES and
                                          (position_ids is None or type(position_ids) is torch.Tensor)):
        planned_calls = None  # tensor subclasses (FakeTensor, a torch.func wrapper) take the general path
    if planned_calls is not None:
        try:
            # What a PlannedForward depends on beyond the _prepared key: the tensors' strides, 16-byte
            # alignment and negative bits. data_ptr raises RuntimeError for a tensor without storage
            # (batched by legacy vmap, a dead torch.func wrapper): those take the general path.
            planned_key = (input_ids.stride(), input_ids.data_ptr() & 15 == 0, token_weight.stride(),
                           token_weight.data_ptr() & 15 == 0, token_weight.is_neg(), position_weight.stride(),
                           position_weight.data_ptr() & 15 == 0, position_weight.is_neg(),
                           None if position_ids is None else (position_ids.stride(), position_ids.data_ptr() & 15 == 0))
        except RuntimeError:
            planned_calls = None
        else:
            planned = planned_calls.get(planned_key)
            stream = planned.stream() if planned else None
            if stream is not None:
                # A repeated plain eager call: its launch is planned (tokemb_fast.autograd.PlannedForward).
                if torch.is_grad_enabled() and (token_weight.requires_grad or position_weight.requires_grad):
                    return apply_planned(input_ids, token_weight, position_weight, position_ids, planned, seed, stream)
                return planned.launch(stream, input_ids, token_weight, position_weight, position_ids, seed, True)[0]
    _check_layouts(input_ids, token_weight, position_weight, position_ids)  # (not in the _prepared key)
    if (torch.is_grad_enabled() and (token_weight.requires_grad or position_weight.requires_grad)) or \
            _forward_ad_active() or _in_transform():
        out = apply_checked(input_ids, token_weight, position_weight, position_ids, options, seed)
    else:
        # No gradient can flow: launch without an autograd node (the Function's own cost is ~10 us).
        out, _record = run_forward(input_ids, token_weight, position_weight, position_ids, options, seed,
                                   wait_at_next_call=True)
    if planned_calls is not None and planned_key not in planned_calls:
        # This call planned its launch: later ones of its layout reuse it (False: they never
        # can; None: this one could not, e.g. under the interpreter or a profiler's hook).
        planned = planned_forward(input_ids, token_weight, position_weight, position_ids, options, seed)
        if planned is not None:
            if len(planned_calls) >= _MAX_PLANNED:
                planned_calls.clear()
            planned_calls[planned_key] = planned
    return out


def _jit_traced(input_ids, token_weight, position_weight, position_ids, past_length, table_options, dropout_p,
                check_ids, token_scale, backend):
    """A call under torch.jit.trace (or ONNX's TorchScript-based exporter), which records the ops a
    call dispatches: PyTorch's own, then, on either path (a kernel launch would not be recorded)."""
    with warnings.catch_warnings():
        # The checks compare shapes, which the tracer warns about; they do not shape the trace.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if isinstance(past_length, torch.Tensor) and past_length.dim() == 0 and not past_length.is_floating_point():
            # ONNX's TorchScript-based exporter passes the forward's default arguments as tensors.
            past_length = int(past_length)
        prepared = _prepare(input_ids, token_weight, position_weight, position_ids, past_length, table_options,
                            dropout_p, check_ids, token_scale, backend)
        _last.backend = "torch"
        out = _plain_sum(input_ids, token_weight, position_weight, position_ids, past_length, prepared, table_options)
    return F.dropout(out, dropout_p, training=True) if dropout_p > 0 else out


def _check_layouts(input_ids, token_weight, position_weight, position_ids) -> None:
    """A TypeError for a sparse or nested tensor (what _prepare says for a new key)."""
    for name, tensor in (("input_ids", input_ids), ("token_weight", token_weight),
                         ("position_weight", position_weight), ("position_ids", position_ids)):
        if tensor is not None:
            check_dense(name, tensor)


def _prepare(input_ids, token_weight, position_weight, position_ids, past_length, table_options, dropout_p, check_ids,
             token_scale, backend, shard=None) -> _Prepared:
    """Every check that does not read tensor values; raises a clear exception or returns what
    the call needs. A rejected call has changed nothing (max_norm has not run)."""
    (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, position_padding_idx, position_max_norm,
     position_norm_type, position_scale_grad_by_freq, position_sparse) = table_options
    if not isinstance(token_weight, torch.Tensor):
        raise TypeError(f"token_weight must be a torch.Tensor, got {type(token_weight).__name__}")
    use_triton = resolve_backend(backend, token_weight.device) == "triton"
    check_inputs(input_ids, token_weight, position_weight, position_ids, past_length)
    padding_idx = check_table_options("token", token_weight.shape[0], padding_idx, max_norm, norm_type)
    position_padding_idx = check_table_options("position", position_weight.shape[0], position_padding_idx,
                                               position_max_norm, position_norm_type)
    dropout_p = check_dropout(dropout_p)
    check_ids = check_mode(check_ids)
    token_scale = check_token_scale(token_scale)
    options = LookupOptions(
        token=TableOptions(padding_idx, bool(scale_grad_by_freq), bool(sparse)),
        position=TableOptions(position_padding_idx, bool(position_scale_grad_by_freq), bool(position_sparse)),
        past_length=past_length, dropout_p=dropout_p, check_ids=check_ids, token_scale=token_scale, shard=shard)
    renorm = max_norm is not None or position_max_norm is not None
    # On the CPU, F.embedding bounds-checks every id itself, so the range check (a reduction per
    # call, about as costly as the lookup at small sizes) can wait for its IndexError, unless
    # max_norm would renormalise a table before the lookup fails.
    check_on_error = bool(check_ids) and not use_triton and token_weight.device.type == "cpu" and not renorm and \
        shard is None
    backend = "torch" if not use_triton else "triton-interpreter" if token_weight.device.type == "cpu" else "triton"
    plannable = use_triton and not renorm and shard is None and check_ids != "sync"
    settle_first = use_triton and check_ids is True and (renorm or dropout_p > 0)
    return _Prepared(use_triton, backend, options, renorm, check_on_error, {} if plannable else None, settle_first)


_positions = {}


def _default_positions(seq_len: int, past_length: int, device: torch.device) -> torch.Tensor:
    # arange(T) + past_length, kept per (T, past_length, device): a read-only index tensor that
    # every call with that shape would otherwise allocate and fill again. What is kept must serve
    # every later call: a plain tensor, made outside inference mode (a call with grad could not
    # save an inference tensor for its backward). Under a dispatch mode (FakeTensorMode, a
    # recording mode) the call gets its own, made in that mode, and nothing is kept.
    if _dispatch_stack_length() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        # (Under a CUDA graph capture, the fill would only be captured, not run: nothing to keep.)
        return default_position_ids(seq_len, past_length, device)
    key = (seq_len, past_length, device)
    positions = _positions.get(key)
    if positions is None:
        if len(_positions) >= 256:
            _positions.clear()
        positions = _positions[key] = new_persistent(lambda: default_position_ids(seq_len, past_length, device))
    return positions


_dispatch_stack_length = torch._C._len_torch_dispatch_stack
_tracing_state = torch._C._get_tracing_state


def _plain_sum_unchecked(input_ids, token_weight, position_weight, position_ids, past_length, prepared,
                         table_options):
    """_plain_sum where ids outside a table give a NaN row (and no gradient), as the kernels do with
    check_ids=False, instead of an error."""
    (_, max_norm, norm_type, scale_grad_by_freq, sparse, _, position_max_norm, position_norm_type,
     position_scale_grad_by_freq, position_sparse) = table_options
    options = prepared.options
    if position_ids is not None and input_ids.dim() == 1 and position_ids.dim() == 2:
        position_ids = position_ids[0]
    tokens = _lookup_or_nan(input_ids, token_weight, options.token.padding_idx, max_norm, norm_type,
                            scale_grad_by_freq, sparse)
    if position_ids is None:  # (past_length + T was checked: every default position is in the table)
        position_ids = default_position_ids(input_ids.shape[-1], past_length, input_ids.device)
    positions = _lookup_or_nan(position_ids, position_weight, options.position.padding_idx, position_max_norm,
                               position_norm_type, position_scale_grad_by_freq, position_sparse)
    return (tokens if options.token_scale == 1.0 else tokens * options.token_scale) + positions


def _lookup_or_nan(ids, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse):
    """F.embedding with these options, except that an id outside the table gives a NaN row and adds
    no gradient (nor a count for scale_grad_by_freq, nor a renormalised row)."""
    num_rows, dim = weight.shape
    valid = (ids >= 0) & (ids < num_rows)
    if num_rows > 0 and max_norm is None and not scale_grad_by_freq and not sparse:
        # Bad ids read row 0, whose values are then replaced and whose gradient there is zero: no
        # host sync, so a CUDA step stays capturable.
        rows = F.embedding(torch.where(valid, ids, 0), weight, padding_idx)
    else:
        # Only the valid ids are looked up, so that counts, renormalised rows and sparse gradients
        # are those of the valid ids alone (nonzero: a host sync on a GPU).
        selected = valid.nonzero(as_tuple=True)
        rows = weight.new_zeros((*ids.shape, dim)).index_put(
            selected, F.embedding(ids[selected], weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse))
    return rows.masked_fill(~valid.unsqueeze(-1), float("nan"))


def _plain_sum(input_ids, token_weight, position_weight, position_ids, past_length, prepared, table_options):
    """input_embedding_reference, minus the per-call work that the checks did already."""
    (_, max_norm, norm_type, scale_grad_by_freq, sparse, _, position_max_norm, position_norm_type,
     position_scale_grad_by_freq, position_sparse) = table_options
    padding_idx, position_padding_idx = prepared.options.token.padding_idx, prepared.options.position.padding_idx
    if position_ids is not None and input_ids.dim() == 1 and position_ids.dim() == 2:
        position_ids = position_ids[0]
    if prepared.options.shard is not None:
        return _plain_shard_sum(input_ids, token_weight, position_weight, position_ids, past_length, prepared.options,
                                table_options)
    if prepared.renorm or input_ids.numel() == 0 or torch.compiler.is_compiling() or _in_transform() or \
            _tracing_state() is not None:
        return input_embedding_reference(
            input_ids, token_weight, position_weight, position_ids, past_length,
            padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq,
            sparse=sparse, position_padding_idx=position_padding_idx, position_max_norm=position_max_norm,
            position_norm_type=position_norm_type, position_scale_grad_by_freq=position_scale_grad_by_freq,
            position_sparse=position_sparse, token_scale=prepared.options.token_scale)
    if position_ids is None:
        position_ids = _default_positions(input_ids.shape[-1], past_length, input_ids.device)
    tokens = F.embedding(input_ids, token_weight, padding_idx, None, 2.0, scale_grad_by_freq, sparse)
    positions = F.embedding(position_ids, position_weight, position_padding_idx, None, 2.0,
                            position_scale_grad_by_freq, position_sparse)
    token_scale = prepared.options.token_scale
    return (tokens if token_scale == 1.0 else tokens * token_scale) + positions


def _plain_shard_sum(input_ids, token_weight, position_weight, position_ids, past_length, options, table_options):
    """One rank's part of the vocabulary-parallel sum (options.shard), in plain PyTorch: the token
    rows of this shard's ids, zero elsewhere, plus the position rows on the rank that adds them."""
    shard = options.shard
    local_ids = input_ids - shard.row_offset
    selected = ((local_ids >= 0) & (local_ids < token_weight.shape[0])).nonzero(as_tuple=True)
    # Looked up by the selected ids alone, so that scale_grad_by_freq counts what nn.Embedding
    # counts (each id lives in one shard) and no other rank's id touches this shard's rows.
    rows = F.embedding(local_ids[selected], token_weight, options.token.padding_idx, None, 2.0,
                       options.token.scale_grad_by_freq)
    if options.token_scale != 1.0:
        rows = rows * options.token_scale
    tokens = token_weight.new_zeros((*input_ids.shape, token_weight.shape[1])).index_put(selected, rows)
    if position_ids is None:
        position_ids = _default_positions(input_ids.shape[-1], past_length, input_ids.device)
    positions = F.embedding(position_ids, position_weight, options.position.padding_idx, None, 2.0,
                            options.position.scale_grad_by_freq, options.position.sparse)
    if not shard.add_positions:
        # Zero, with the true gradient: the position table is replicated, so every rank's copy
        # must get the whole gradient, not only the rank whose sum holds the rows.
        positions = _ZeroWithGradient.apply(positions)
    elif not options.check_ids:
        # Unchecked ids outside the vocabulary: a NaN row, as the kernels write (no rank looked them up).
        bad = (input_ids < 0) | (input_ids >= shard.vocab_size)
        tokens = tokens.masked_fill(bad.unsqueeze(-1), float("nan"))
    return tokens + positions


class _ZeroWithGradient(torch.autograd.Function):
    """Zeros shaped like x whose backward passes the gradient to x unchanged (x - x.detach()
    would be NaN where x is infinite)."""

    @staticmethod
    def forward(x):
        return torch.zeros_like(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


def _renorm_rows(weight: torch.Tensor, ids: torch.Tensor, max_norm: float, norm_type: float, checked: bool) -> None:
    if not checked:
        # Unchecked ids: only the rows that exist are renormalised (the others' rows are NaN).
        ids = ids[(ids >= 0) & (ids < weight.shape[0])]
    if ids.numel() == 0:  # nothing to renormalise, and PyTorch's CUDA kernel rejects an empty index
        return
    with torch.no_grad():
        torch.embedding_renorm_(weight.detach(), ids.contiguous(), max_norm, norm_type)

"""Autograd for the Triton path: every mode PyTorch has, closed under the op itself.

Forward: ``out = dropout(token_weight[ids] + position_weight[positions])``. Everything its
derivatives need is this op again or its table gradient:

* backward: the table gradients (``table_grads``: sort, segment sums, one write per row);
* double backward: the table gradient is linear in ``grad_out``, and its transpose is a gather
  of the incoming gradient's rows by the same ids and positions, i.e. this forward (with the
  rows scaled as the backward scaled them: zero for padding_idx, 1/count for
  scale_grad_by_freq, and the same dropout mask);
* forward-mode AD: the output's tangent is this forward applied to the tables' tangents (with
  the same mask), as ``nn.Embedding``'s (which gathers the padding row's tangent too);
* vmap: each rule maps over the batch with the op itself.

So ``FusedInputEmbeddingFunction`` and ``EmbeddingGradFunction`` call each other and nothing
else. In plain training (no ``create_graph``, no torch.func transform) the backward computes the
gradients directly and records no graph: nothing here costs the common case anything.
"""
import threading
from typing import Optional, Tuple

import torch
from torch._functorch.utils import unwrap_dead_wrappers

from . import id_check
from .options import LookupOptions
from .reference import default_position_ids
from .validation import check_id_ranges, check_inputs, check_lookup_options

_DEFAULT_OPTIONS = LookupOptions()
_triton_ops = None


def _ops():
    """tokemb_fast.triton_ops, imported on first use: importing Triton takes about a second, which
    a process that never takes the Triton path should not pay."""
    global _triton_ops
    if _triton_ops is None:
        from . import triton_ops
        _triton_ops = triton_ops
    return _triton_ops


def dropout_seed(device) -> torch.Tensor:
    """A fresh seed for the fused dropout of one call: a 1-element int64 tensor on ``device``.

    Drawn from the device's default generator by a device op: ``torch.manual_seed`` reproduces a
    run, consecutive calls get fresh masks, no host sync happens, and a captured CUDA graph draws
    a fresh seed at each replay. Under ``torch.func.vmap`` it follows vmap's ``randomness``.
    """
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


_constants = {}


def _constant(value: float, device: torch.device, cache: bool) -> torch.Tensor:
    """A 1-element fp64 tensor: Triton would pass a Python float as fp32, which would make fp64
    tables' results inexact. Kept per (value, device) in eager calls rather than rebuilt."""
    key = (value, device)
    constant = _constants.get(key) if cache else None
    if constant is None:
        if not cache or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            # (During a CUDA graph capture the fill would only be captured, not run: nothing to keep.)
            return torch.full((1,), value, dtype=torch.float64, device=device)
        # Kept for later calls in any mode: a plain tensor (not an inference tensor).
        constant = id_check.new_persistent(lambda: torch.full((1,), value, dtype=torch.float64, device=device))
        if len(_constants) >= 256:
            _constants.clear()
        _constants[key] = constant
    return constant


def _dropout_scale(dropout_p: float, device: torch.device, cache: bool) -> torch.Tensor:
    return _constant(1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0, device, cache)


_PLAIN = (type(None), torch.Tensor, torch.nn.Parameter)


def _direct(*tensors) -> bool:
    """Plain eager: no compiling, no dispatch mode (FakeTensor, make_fx), no tensor subclass. Then
    the launchers run without the custom-op dispatch (tokemb_fast.triton_ops)."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0 and \
        all(type(tensor) in _PLAIN for tensor in tensors)


def _fake_mode_active() -> bool:
    """A FakeTensorMode is on: nothing runs, so there is nothing for the id check to record."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    return any(isinstance(mode, FakeTensorMode) for mode in _get_current_dispatch_mode_stack())


def id_flag(device, plain: bool, direct: bool, compiling: bool):
    """(the flag a check_ids=True launch writes or None, the guard to record it with or None), for
    both ops: in eager calls on plain tensors, the calling thread's flag (none under a FakeTensorMode,
    where nothing runs); in a compiled graph, the device's graph flag (an input it mutates, which
    check_ids_now() reads; made by an eager call first: a compiled one cannot)."""
    if plain and (direct or not _fake_mode_active()):
        return id_check.flag_for_launch(device)
    if compiling:
        return id_check.compiled_flag(device), None
    return None, None


def _in_transform() -> bool:
    """Inside a torch.func transform (grad, vjp, jvp, vmap, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _forward_ad_active() -> bool:
    return torch.autograd.forward_ad._current_level >= 0


def _kernel_table(weight: torch.Tensor, compiling: bool) -> torch.Tensor:
    """The table as the kernels read it: the values a lookup sees, unit column stride."""
    if compiling or weight.is_neg():  # (torch.compile cannot trace is_neg; resolve_neg is a no-op without)
        # A negative view (torch._neg_view, z.conj().imag) stores values that read negated: the
        # kernels see storage, so they get the values themselves.
        weight = weight.resolve_neg()
    # Only a row stride is passed to the kernels; a table with a strided last dim is rare (a
    # transposed view) and gets a contiguous copy rather than a wrong answer.
    return weight if weight.stride(1) == 1 or weight.shape[1] <= 1 else weight.contiguous()


_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _legacy_batched(*tensors) -> bool:
    """Batched by torch._vmap_internals (gradcheck's check_batched_grad / check_batched_forward_grad):
    such tensors have no storage for a kernel to read, so those calls take PyTorch's own ops."""
    return any(tensor is not None and _is_legacy_batched(tensor) for tensor in tensors)


def run_forward(input_ids, token_weight, position_weight, position_ids, options: LookupOptions,
                dropout_seed: Optional[torch.Tensor], wait_at_next_call: bool):
    """The forward launch, arguments already checked: (output, id-check record or None)."""
    ops = _triton_ops or _ops()
    compiling = torch.compiler.is_compiling()
    if not compiling and _legacy_batched(input_ids, token_weight, position_weight, position_ids):
        return _aten_forward(input_ids, token_weight, position_weight, position_ids, options, dropout_seed), None
    one_dim = input_ids.dim() == 1
    if one_dim:
        input_ids = input_ids.unsqueeze(0)
    if position_ids is not None and position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    token_weight = _kernel_table(token_weight, compiling)
    position_weight = _kernel_table(position_weight, compiling)
    # Plain tensors, not compiling: the id flag can be used (a FakeTensor, a DTensor or a traced
    # graph could not take the per-device flag tensor), and without a dispatch mode the launcher
    # can run directly.
    plain = not compiling and type(input_ids) in _PLAIN and type(token_weight) in _PLAIN and \
        type(position_weight) in _PLAIN and type(position_ids) in _PLAIN
    direct = plain and torch._C._len_torch_dispatch_stack() == 0
    device = token_weight.device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        # Triton launches on the current device: make it the tables'.
        with torch.cuda.device(device):
            return run_forward(input_ids, token_weight, position_weight, position_ids, options, dropout_seed,
                               wait_at_next_call)
    guard = flag = None
    check = options.check_ids
    if check is True:
        flag, guard = id_flag(device, plain, direct, compiling)
    elif check == "sync" and not compiling:
        check_id_ranges(input_ids, token_weight.shape[0] if options.shard is None else options.shard.vocab_size,
                        position_ids, position_weight.shape[0])
    scale = token_scale = None
    if dropout_seed is not None:
        scale = _dropout_scale(options.dropout_p, device, cache=direct)
    if options.token_scale != 1.0:
        token_scale = _constant(options.token_scale, device, cache=direct)
    shard = options.shard
    sharding = () if shard is None else (shard.row_offset, shard.vocab_size, shard.add_positions)
    record = None
    if direct or flag is not None:
        launch = ops.input_embedding_forward.direct if direct else ops.input_embedding_forward
        arguments = (input_ids, token_weight, position_weight, position_ids, options.past_length, options.dropout_p,
                     dropout_seed, scale, flag, token_scale, *sharding)
        if guard is None:
            out = launch(*arguments)
        else:
            out, record = guard.launch(wait_at_next_call, launch, *arguments)
    else:
        # Through dispatch with no flag to write (check_ids=False, exporting): the op that mutates
        # nothing, so that a traced graph holds a pure function (with a decomposition).
        out = ops.input_embedding(input_ids, token_weight, position_weight, position_ids, options.past_length,
                                  options.dropout_p, dropout_seed, scale, token_scale, *sharding)
    return (out[0] if one_dim else out), record


_checked = {}


class _CallState(threading.local):
    """What one thread's call hands from one step to the next (class attributes: the defaults, so that
    reading one that was never set costs no AttributeError)."""

    #: fused_input_embedding checked this call already: it leaves the options it built here, and
    #: the Function's forward skips its own checks when it finds them.
    checked_options = None
    #: The forward's id-check record, for setup_context (which cannot see the forward's locals).
    record = None
    #: Inside a torch.func transform's apply (see _apply).
    transformed = False


_state = _CallState()


def _check_call(input_ids, token_weight, position_weight, position_ids, options, dropout_seed) -> None:
    """The checks of fused_input_embedding, for direct callers of the Function; cached per key."""
    if _state.checked_options is options:
        _state.checked_options = None
        return
    if torch.compiler.is_compiling():
        key = None
    else:
        try:
            key = (input_ids.shape, input_ids.dtype, input_ids.device, input_ids.layout, token_weight.shape,
                   token_weight.dtype, token_weight.device, token_weight.layout, position_weight.shape,
                   position_weight.dtype, position_weight.device, position_weight.layout,
                   None if position_ids is None else
                   (position_ids.shape, position_ids.dtype, position_ids.device, position_ids.layout),
                   options, dropout_seed is None)
            if key in _checked:
                return
        except (AttributeError, TypeError, RuntimeError):  # not tensors, or nested ones: the checks say what
            key = None
    check_inputs(input_ids, token_weight, position_weight, position_ids, options.past_length)
    check_lookup_options(options, token_weight.shape[0], position_weight.shape[0])
    if token_weight.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_cpu_launch()
    if options.dropout_p > 0 and dropout_seed is None:
        raise ValueError("dropout_p > 0 needs the call's dropout_seed (tokemb_fast.dropout_seed(device)); "
                         "fused_input_embedding draws one for you")
    if key is not None:
        if len(_checked) > 4096:
            _checked.clear()
        _checked[key] = True


def _check_cpu_launch() -> None:
    """The Function is the Triton path: on CPU tensors it needs the interpreter (or a Triton driver
    set up for them, as bench/compile_report.py's stand-in is); otherwise the message
    backend="triton" gets, rather than Triton's own about active drivers."""
    from .functional import CPU_NEEDS_INTERPRETER, interpreted  # (functional imports this module)
    if interpreted():
        return
    from triton.runtime.driver import driver
    try:
        driver.active
    except RuntimeError:
        raise RuntimeError(CPU_NEEDS_INTERPRETER) from None


def apply_checked(input_ids, token_weight, position_weight, position_ids, options, dropout_seed):
    """FusedInputEmbeddingFunction.apply for a caller that has run every check already."""
    _state.checked_options = options
    return FusedInputEmbeddingFunction.apply(input_ids, token_weight, position_weight, position_ids, options,
                                             dropout_seed)


def _apply(cls, args, n_arguments):
    # Function.apply binds the arguments to forward's signature (inspect.signature: ~15 us per call
    # on this project's CPU, more than the rest of a call) whenever setup_context is defined. With
    # every argument given positionally there is nothing to bind, and outside torch.func
    # transforms the rest of its path is this line.
    transformed = torch._C._are_functorch_transforms_active()
    if len(args) == n_arguments and not transformed:
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))
    if not transformed or _state.transformed:
        return super(cls, cls).apply(*args)
    # A torch.func transform. Its levels are popped while the forward runs, so the forward cannot
    # see it: it is told through _state (see _FusedInputEmbedding.forward and setup_context).
    _state.transformed = True
    try:
        return super(cls, cls).apply(*args)
    finally:
        _state.transformed = False
        _state.record = None


def _backward(ctx, grad_out, options, table_shapes):
    """The backward of the forward Functions: gradients of the two tables (the ids, position ids,
    options and seed get none)."""
    record = ctx.id_record
    if record is not None and not record.checked:
        record.guard.check(record)  # raises IndexError for a bad id before any gradient exists
    input_ids, position_ids, dropout_seed = ctx.saved_tensors
    needs = (ctx.needs_input_grad[1], ctx.needs_input_grad[2])
    if grad_out is None or not any(needs):
        return None, None, None, None, None, None
    rows = (table_shapes[0][0], table_shapes[1][0])
    if not torch.compiler.is_compiling() and (torch.is_grad_enabled() or _in_transform()):
        if options.shard is not None:
            raise NotImplementedError(
                "double backward (create_graph=True) and torch.func transforms of the tensor-parallel embedding "
                "are not supported: its derivatives would need the group's collectives")
        # create_graph=True or a torch.func transform: the gradients must be differentiable.
        grad_token, grad_position = differentiable_table_grads(grad_out, input_ids, position_ids, dropout_seed,
                                                               options, rows, needs)
    else:
        grad_token, grad_position = table_grads(grad_out, input_ids, position_ids, dropout_seed, options, rows,
                                                needs)
    return None, grad_token, grad_position, None, None, None


class _FusedInputEmbedding(torch.autograd.Function):
    """Forward and backward of FusedInputEmbeddingFunction: what torch.compile traces (Dynamo does
    not trace a Function that defines jvp, so fused_input_embedding uses this one there)."""

    @staticmethod
    def forward(input_ids, token_weight, position_weight, position_ids=None, options=_DEFAULT_OPTIONS,
                dropout_seed=None):
        _check_call(input_ids, token_weight, position_weight, position_ids, options, dropout_seed)
        # A backward checks this call's ids before any gradient exists. Where none may come
        # (forward-mode AD; torch.func's jvp, vmap), the thread's next call checks them, as it
        # does an inference call's; a backward that comes first (torch.func.grad) still does.
        # (Traced by torch.compile or export: no record, and no state of this module is touched.)
        compiling = torch.compiler.is_compiling()
        no_backward = not compiling and (_state.transformed or _forward_ad_active())
        out, record = run_forward(input_ids, token_weight, position_weight, position_ids, options, dropout_seed,
                                  wait_at_next_call=no_backward)
        if not compiling and (record is not None or not _state.transformed):
            # (Under a transform, a nested unchecked call, the jvp rule's own, must not drop the record
            # an outer level's setup_context is still to take: hessian's, jacfwd(jacrev)'s.)
            _state.record = record
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        input_ids, token_weight, position_weight, position_ids, options, dropout_seed = inputs
        # The forward hands its id-check record over through _state (it cannot see ctx). Under a
        # torch.func transform setup_context runs once per level for one forward, and the backward
        # that comes is the outer level's: each gets the record (_apply drops it afterwards).
        ctx.id_record = None
        if not torch.compiler.is_compiling():
            ctx.id_record = _state.record
            if not _state.transformed:
                _state.record = None
        ctx.save_for_backward(input_ids, position_ids, dropout_seed)
        if _forward_ad_active() or _in_transform():
            ctx.save_for_forward(input_ids, position_ids, dropout_seed)
        ctx.options = options
        ctx.table_shapes = (token_weight.shape, position_weight.shape)
        ctx.table_dtype = token_weight.dtype

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out, ctx.options, ctx.table_shapes)


class FusedInputEmbeddingFunction(_FusedInputEmbedding):
    """Autograd for the fused op (Triton path)::

        FusedInputEmbeddingFunction.apply(input_ids, token_weight, position_weight, position_ids=None,
                                          options=LookupOptions(), dropout_seed=None)

    ``options`` (``tokemb_fast.LookupOptions``) holds past_length, the fused dropout's p,
    check_ids and each table's ``TableOptions`` (padding_idx as a row index >= 0,
    scale_grad_by_freq, sparse). With ``options.dropout_p > 0`` pass the call's seed,
    ``tokemb_fast.dropout_seed(device)``: the backward regenerates the mask from it. Arguments
    are checked as in ``fused_input_embedding``; ``max_norm`` is not an option here (it
    renormalises the tables before the lookup, outside autograd).

    Saved for the backward: the ids, the position ids if given, the seed: never the tables, the
    output or a mask. Supports backward, double backward (``create_graph=True``), forward-mode
    AD, and torch.func's transforms (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap).
    """

    @classmethod
    def apply(cls, *args):
        return _apply(cls, args, 6)

    @staticmethod
    def jvp(ctx, _ids_tangent, token_tangent, position_tangent, *_other_tangents):
        if token_tangent is None and position_tangent is None:
            return None
        input_ids, position_ids, dropout_seed = ctx.saved_tensors
        token_tangent = _or_zeros(token_tangent, ctx.table_shapes[0], ctx.table_dtype, input_ids.device)
        position_tangent = _or_zeros(position_tangent, ctx.table_shapes[1], ctx.table_dtype, input_ids.device)
        # nn.Embedding's forward-mode derivative gathers the tangent rows as they are (the padding
        # row's included; scale_grad_by_freq is a backward-only rule), with the same mask and
        # token scale.
        return FusedInputEmbeddingFunction.apply(input_ids, token_tangent, position_tangent, position_ids,
                                                 _plain(ctx.options), dropout_seed)

    @staticmethod
    def vmap(info, in_dims, input_ids, token_weight, position_weight, position_ids=None, options=_DEFAULT_OPTIONS,
             dropout_seed=None):
        args = (input_ids, token_weight, position_weight, position_ids, options, dropout_seed)
        in_dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
        outputs = [FusedInputEmbeddingFunction.apply(*_select(args, in_dims, index))
                   for index in range(info.batch_size)]
        return torch.stack(outputs), 0


class PlannedForward:
    """The forward of one call layout, planned: ``launch`` (a ``triton_ops.ForwardCall``, which
    also keeps the id check's books) is what a repeated plain eager call runs instead of
    ``run_forward``.

    ``tokemb_fast.functional`` keeps these per call key (shapes, strides, alignment, dtypes,
    options: everything the launch depends on) after a call of that key took the general path,
    and uses one only when ``stream()`` says the call is plain eager (no dispatch mode, torch.func
    transform or forward-mode AD; no profiler hook; no CUDA graph capture; the device planned for)."""

    __slots__ = ("launch", "options", "table_shapes", "cuda")

    def stream(self):
        """The stream to launch on, or None where this call must take the general path."""
        if not _plain_eager_mode(self.cuda) or _triton_ops.hooks_installed():
            return None
        launch = self.launch
        device = launch.get_device()
        return launch.get_stream(device) if device == launch.device_index else None


_dispatch_stack_length = torch._C._len_torch_dispatch_stack
_peek_interpreter_stack = torch._C._functorch.peek_interpreter_stack


def _plain_eager_mode(cuda: bool) -> bool:
    """No dispatch mode, torch.func transform or forward-mode AD is active, and (for a CUDA call)
    no CUDA graph is being captured: what a planned forward needs (torch.compile aside)."""
    return not (_dispatch_stack_length() or _peek_interpreter_stack() is not None or
                torch.autograd.forward_ad._current_level >= 0 or (cuda and torch.cuda.is_current_stream_capturing()))


def planned_forward(input_ids, token_weight, position_weight, position_ids, options: LookupOptions,
                    seed: Optional[torch.Tensor]):
    """A PlannedForward for calls like this one, which has just run through run_forward; False
    where calls of this layout are never planned (tensor subclasses, 1-D ids or positions, a
    table the kernels do not read as it is, tensor parallelism, check_ids="sync"); None where
    this call could not make one (a dispatch mode or transform, a CUDA graph capture, no plan
    made, e.g. under the interpreter or a profiler's hook): a later call may."""
    if options.shard is not None or options.check_ids == "sync" or input_ids.dim() != 2 or \
            (position_ids is not None and position_ids.dim() != 2) or \
            any(type(tensor) not in _PLAIN for tensor in (input_ids, token_weight, position_weight, position_ids)):
        return False
    for table in (token_weight, position_weight):
        if table.is_neg() or not (table.stride(1) == 1 or table.shape[1] <= 1):  # _kernel_table would copy
            return False
    device = token_weight.device
    if torch.compiler.is_compiling() or not _plain_eager_mode(device.type == "cuda"):
        return None
    planned = PlannedForward()
    planned.options = options
    planned.table_shapes = (token_weight.shape, position_weight.shape)
    planned.cuda = device.type == "cuda"
    # (Cached constants: plain tensors, whatever mode this call runs in; the plan serves all modes.)
    scale = None if seed is None else _dropout_scale(options.dropout_p, device, cache=True)
    token_scale = None if options.token_scale == 1.0 else _constant(options.token_scale, device, cache=True)
    planned.launch = _ops().forward_call(input_ids, token_weight, position_weight, position_ids, options.past_length,
                                         options.dropout_p, seed, scale, bool(options.check_ids), token_scale)
    return None if planned.launch is None else planned


class _PlannedFunction(torch.autograd.Function):
    """FusedInputEmbeddingFunction's autograd node for a call run by a PlannedForward: the same
    backward (double backward included); only used outside forward-mode AD and torch.func
    transforms, so it needs neither jvp nor vmap. Its forward takes ctx (no setup_context call)
    and leaves it the PlannedForward, which holds the options and table shapes of its key."""

    @staticmethod
    def forward(ctx, input_ids, token_weight, position_weight, position_ids, planned, dropout_seed, stream):
        out, ctx.id_record = planned.launch(stream, input_ids, token_weight, position_weight, position_ids,
                                            dropout_seed, False)
        ctx.save_for_backward(input_ids, position_ids, dropout_seed)
        ctx.planned = planned
        return out

    @staticmethod
    def backward(ctx, grad_out):
        planned = ctx.planned
        return (*_backward(ctx, grad_out, planned.options, planned.table_shapes), None)


#: _PlannedFunction.apply without torch.autograd.Function.apply's Python layer (argument binding
#: and the torch.func checks, which PlannedForward.stream has made).
apply_planned = super(torch.autograd.Function, _PlannedFunction).apply


class EmbeddingGradFunction(torch.autograd.Function):
    """The dense table gradients as a differentiable function of ``grad_out``: what the backward
    of ``FusedInputEmbeddingFunction`` returns under ``create_graph=True`` or torch.func.

    ``apply(grad_out, input_ids, position_ids, dropout_seed, options, table_rows, needs)`` gives
    (token gradient or None, position gradient or None) for the tables flagged in ``needs``."""

    @classmethod
    def apply(cls, *args):
        return _apply(cls, args, 7)

    @staticmethod
    def forward(grad_out, input_ids, position_ids, dropout_seed, options, table_rows, needs):
        return table_grads(grad_out, input_ids, position_ids, dropout_seed, options, table_rows, needs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, input_ids, position_ids, dropout_seed, options, table_rows, needs = inputs
        ctx.save_for_backward(input_ids, position_ids, dropout_seed)
        if _forward_ad_active() or _in_transform():
            ctx.save_for_forward(input_ids, position_ids, dropout_seed)
        ctx.options, ctx.table_rows, ctx.needs = options, table_rows, needs
        ctx.grad_shape, ctx.grad_dtype = tuple(grad_out.shape), grad_out.dtype

    @staticmethod
    def backward(ctx, grad_of_token_grad, grad_of_position_grad):
        if not ctx.needs_input_grad[0] or (grad_of_token_grad is None and grad_of_position_grad is None):
            return (None,) * 7
        input_ids, position_ids, dropout_seed = ctx.saved_tensors
        dim = ctx.grad_shape[-1]
        device = input_ids.device
        tables = []
        for table, incoming, num_rows in (("token", grad_of_token_grad, ctx.table_rows[0]),
                                          ("position", grad_of_position_grad, ctx.table_rows[1])):
            if incoming is None:
                tables.append(_zeros_table(num_rows, dim, ctx.grad_dtype, device))
            else:
                tables.append(incoming * _row_weights(table, input_ids, position_ids, ctx.options, num_rows,
                                                      incoming.dtype)[:, None])
        grad_out = FusedInputEmbeddingFunction.apply(input_ids, tables[0], tables[1], position_ids,
                                                     _plain(ctx.options), dropout_seed)
        return grad_out, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, grad_out_tangent, *_other_tangents):
        # The table gradients are linear in grad_out.
        if grad_out_tangent is None:
            return None, None
        input_ids, position_ids, dropout_seed = ctx.saved_tensors
        return EmbeddingGradFunction.apply(grad_out_tangent, input_ids, position_ids, dropout_seed, ctx.options,
                                           ctx.table_rows, ctx.needs)

    @staticmethod
    def vmap(info, in_dims, grad_out, input_ids, position_ids, dropout_seed, options, table_rows, needs):
        args = (grad_out, input_ids, position_ids, dropout_seed, options, table_rows, needs)
        results = [EmbeddingGradFunction.apply(*_select(args, in_dims, index)) for index in range(info.batch_size)]
        return _stack_pairs(results)


def _stack_pairs(results):
    stacked = tuple(None if results[0][i] is None else torch.stack([result[i] for result in results])
                    for i in range(2))
    return stacked, tuple(None if tensor is None else 0 for tensor in stacked)


def _select(args, in_dims, index):
    # (Non-tensor arguments get in_dims of their own pytree shape, all None.)
    return tuple(arg.select(dim, index) if isinstance(arg, torch.Tensor) and dim is not None else arg
                 for arg, dim in zip(args, in_dims))


def _plain(options: LookupOptions) -> LookupOptions:
    """The same lookup (positions, dropout, token scale) with no gradient rules and no id check:
    for the derivatives, whose ids were checked by the call they derive from."""
    return LookupOptions(past_length=options.past_length, dropout_p=options.dropout_p, check_ids=False,
                         token_scale=options.token_scale, shard=options.shard)


def _zeros_table(num_rows, dim, dtype, device):
    # Row stride 0: one row of storage stands for all.
    return torch.zeros(dim, dtype=dtype, device=device).expand(num_rows, dim)


def _or_zeros(tangent, shape, dtype, device):
    return _zeros_table(shape[0], shape[1], dtype, device) if tangent is None else tangent


def _row_weights(table, input_ids, position_ids, options, num_rows, dtype):
    """What the backward multiplied each row's sum by: 0 for padding_idx, 1/count with
    scale_grad_by_freq (count: occurrences in the looked-up tensor), else 1."""
    table_options = options.token if table == "token" else options.position
    weights = torch.ones(num_rows, dtype=dtype, device=input_ids.device)
    if table_options.scale_grad_by_freq:
        if table == "token":
            looked_up = input_ids
        elif position_ids is None:
            looked_up = default_position_ids(input_ids.shape[-1], options.past_length, input_ids.device)
        else:
            # [T] and [1, T] positions are looked up once for the batch, as nn.Embedding would.
            looked_up = position_ids
        counts = torch.zeros(num_rows, dtype=dtype, device=input_ids.device)
        counts.index_add_(0, looked_up.reshape(-1), torch.ones(looked_up.numel(), dtype=dtype, device=counts.device))
        weights = weights / counts.clamp_min(1)
    if table_options.padding_idx is not None:
        weights[table_options.padding_idx] = 0
    return weights


def table_grads(grad_out, input_ids, position_ids, dropout_seed, options: LookupOptions,
                table_rows: Tuple[int, int], needs: Tuple[bool, bool]):
    """(token-table gradient or None, position-table gradient or None), not differentiable."""
    if not torch.compiler.is_compiling() and _legacy_batched(grad_out, input_ids, position_ids):
        return _aten_table_grads(grad_out, input_ids, position_ids, dropout_seed, options, table_rows, needs)
    device = grad_out.device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):  # Triton launches on the current device
            return table_grads(grad_out, input_ids, position_ids, dropout_seed, options, table_rows, needs)
    if input_ids.dim() == 1:
        grad_out = grad_out.unsqueeze(0)
        input_ids = input_ids.unsqueeze(0)
        if position_ids is not None and position_ids.dim() == 2:
            position_ids = position_ids[0]
    batch = grad_out.shape[0]
    direct = _direct(grad_out, input_ids, position_ids)
    dropout = (options.dropout_p, dropout_seed,
               None if dropout_seed is None else _dropout_scale(options.dropout_p, grad_out.device, cache=direct))
    grad_token = grad_position = None
    if needs[0]:
        token_scale = None if options.token_scale == 1.0 else \
            _constant(options.token_scale, grad_out.device, cache=direct)
        keys = input_ids
        if options.shard is not None and options.shard.row_offset != 0:
            # Rows of this shard: the other ranks' ids fall outside 0 .. rows - 1, where no row's
            # segment of the sorted keys looks (the row kernels skip them).
            keys = input_ids - options.shard.row_offset
        grad_token = _table_grad(grad_out, keys, table_rows[0], 0, 1, options.token, dropout, direct,
                                 token_scale)
    if needs[1]:
        # The position ids nn.Embedding would have looked up: [T] (shared by the batch) or [B, T].
        if position_ids is not None and position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        shared = position_ids is None or (position_ids.shape[0] == 1 and batch != 1)
        if position_ids is not None and shared:
            position_ids = position_ids.expand(batch, -1)
        grad_position = _table_grad(grad_out, position_ids, table_rows[1], options.past_length,
                                    max(batch, 1) if shared else 1, options.position, dropout, direct, None)
    return grad_token, grad_position


def _table_grad(grad_out, keys, num_rows, past_length, count_divisor, table_options, dropout, direct, grad_scale):
    ops = _ops()
    dropout_p, seed, scale = dropout
    padding_idx = -1 if table_options.padding_idx is None else table_options.padding_idx
    if table_options.sparse:
        if seed is not None:
            masked = ops.dropout_masked_grad.direct if direct else ops.dropout_masked_grad
            grad_out = masked(grad_out, dropout_p, seed, scale)
        if grad_scale is not None:  # the sparse values are the upstream rows themselves: scaled here
            grad_out = grad_out * grad_scale.to(grad_out.dtype)
        # A sparse gradient is the upstream rows themselves, indexed by id: no reduction, so
        # nothing to fuse. Built by the function nn.Embedding uses, so it is the same tensor.
        return _aten_grad(grad_out, keys, num_rows, past_length, count_divisor, table_options)
    dense = ops.embedding_dense_grad.direct if direct else ops.embedding_dense_grad
    return dense(grad_out, keys, num_rows, past_length, padding_idx, table_options.scale_grad_by_freq, count_divisor,
                 dropout_p, seed, scale, grad_scale)


def differentiable_table_grads(grad_out, input_ids, position_ids, dropout_seed, options, table_rows, needs):
    """table_grads as a differentiable function of grad_out: dense tables through
    EmbeddingGradFunction, sparse ones through PyTorch's own (differentiable) sparse backward."""
    dense_needs = (needs[0] and not options.token.sparse, needs[1] and not options.position.sparse)
    sparse_needs = (needs[0] and options.token.sparse, needs[1] and options.position.sparse)
    grads = [None, None]
    if any(dense_needs):
        grads = list(EmbeddingGradFunction.apply(grad_out, input_ids, position_ids, dropout_seed, options, table_rows,
                                                 dense_needs))
    if any(sparse_needs):
        sparse = _aten_table_grads(grad_out, input_ids, position_ids, dropout_seed, options, table_rows, sparse_needs)
        grads = [grad if grad is not None else other for grad, other in zip(sparse, grads)]
    return tuple(grads)


class _DropoutAfterReduction(torch.autograd.Function):
    """x times the fused op's dropout mask and scale for (seed, element index): tensor
    parallelism's dropout of the reduced output. Linear in x, so the backward is the same op."""

    @staticmethod
    def forward(x, dropout_p, seed, mask_seq_len, mask_seq_offset):
        return _masked(x, dropout_p, seed, mask_seq_len, mask_seq_offset)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _x, ctx.dropout_p, seed, ctx.mask_seq_len, ctx.mask_seq_offset = inputs
        ctx.save_for_backward(seed)

    @staticmethod
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        return _masked(grad, ctx.dropout_p, seed, ctx.mask_seq_len, ctx.mask_seq_offset), None, None, None, None


def _masked(x, dropout_p, seed, mask_seq_len, mask_seq_offset):
    three_d = x if x.dim() == 3 else x.unsqueeze(0)  # [T, D] output of [T] ids
    scale = _dropout_scale(dropout_p, x.device, cache=_direct(x))
    return _ops().dropout_masked_grad(three_d, dropout_p, seed, scale, mask_seq_len, mask_seq_offset).reshape(x.shape)


def dropout_after_reduction(x, dropout_p: float, seed, mask_seq_len: int, mask_seq_offset: int):
    """``x`` [B, T, D] (or [T, D]) holding steps mask_seq_offset .. of mask_seq_len-step sequences,
    times the mask the fused forward would draw there with ``seed``, and 1/(1-p)."""
    return _DropoutAfterReduction.apply(x, dropout_p, seed, mask_seq_len, mask_seq_offset)


# --- PyTorch's own ops: sparse gradients under create_graph, and tensors the kernels cannot read
# (legacy vmap) -----------------------------------------------------------------------------------

def _dropout_mask(shape, dtype, device, options, dropout_seed):
    """The kernels' dropout mask times 1/(1-p), as a tensor (the masking kernel applied to ones)."""
    ones = torch.ones(shape, dtype=dtype, device=device)
    three_d = ones.reshape(-1, *shape[-2:]) if len(shape) == 3 else ones.unsqueeze(0)
    scale = _dropout_scale(options.dropout_p, device, cache=False)
    return _ops().dropout_masked_grad(three_d, options.dropout_p, dropout_seed, scale).reshape(shape)


def _aten_forward(input_ids, token_weight, position_weight, position_ids, options, dropout_seed):
    positions = position_ids if position_ids is not None else \
        default_position_ids(input_ids.shape[-1], options.past_length, input_ids.device)
    if input_ids.dim() == 1 and positions.dim() == 2:
        positions = positions[0]
    tokens = torch.nn.functional.embedding(input_ids, token_weight)
    if options.token_scale != 1.0:
        tokens = tokens * options.token_scale
    out = tokens + torch.nn.functional.embedding(positions, position_weight)
    if dropout_seed is not None:
        out = out * _dropout_mask(out.shape, out.dtype, out.device, options, dropout_seed)
    return out


def _aten_table_grads(grad_out, input_ids, position_ids, dropout_seed, options, table_rows, needs):
    if dropout_seed is not None:
        grad_out = grad_out * _dropout_mask(grad_out.shape, grad_out.dtype, grad_out.device, options, dropout_seed)
    if input_ids.dim() == 1:
        grad_out, input_ids = grad_out.unsqueeze(0), input_ids.unsqueeze(0)
        if position_ids is not None and position_ids.dim() == 2:
            position_ids = position_ids[0]
    grads = [None, None]
    if needs[0]:
        token = options.token
        grads[0] = _aten_grad(grad_out if options.token_scale == 1.0 else grad_out * options.token_scale, input_ids,
                              table_rows[0], 0, 1, token)
    if needs[1]:
        batch = grad_out.shape[0]
        if position_ids is not None and position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        shared = position_ids is None or (position_ids.shape[0] == 1 and batch != 1)
        grads[1] = _aten_grad(grad_out, position_ids, table_rows[1], options.past_length,
                              max(batch, 1) if shared else 1, options.position)
    return tuple(grads)


def _aten_grad(grad_out, keys, num_rows, past_length, count_divisor, table_options):
    """A table's gradient by PyTorch's own embedding backward (dense or sparse, as the options say).
    Positions shared by the batch were looked up once, as [T]: their rows sum over the batch."""
    if keys is None:
        grad_out, keys = grad_out.sum(0), default_position_ids(grad_out.shape[1], past_length, grad_out.device)
    elif count_divisor != 1:
        grad_out, keys = grad_out.sum(0), keys[0]
    padding_idx = -1 if table_options.padding_idx is None else table_options.padding_idx
    return torch.ops.aten.embedding_backward(grad_out, keys, num_rows, padding_idx, table_options.scale_grad_by_freq,
                                             table_options.sparse)

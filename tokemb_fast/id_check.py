"""Out-of-range ids without a host sync: the forward kernel records them, the host raises later.

Checking ids before a launch means reading them on the host: one sync with the GPU queue per
call (0.28 ms per forward on an H100, bench/RESULTS.md). Instead, with ``check_ids=True`` (the
default), the forward kernel, which reads every id anyway, records any id outside its table in a
small flag (int64 [ID_FLAG_SIZE], see kernels/forward.py for the layout); its output row is NaN.
After the launch the flag is copied to pinned host memory (an asynchronous copy) and an event
recorded. The host looks at that copy, after waiting for that event only (never the whole
queue), and raises ``IndexError`` naming the id and the limit:

* in the backward of that call, before any gradient is returned: nothing trains on the NaN rows;
* for a call with no backward coming (inference), at the latest at the next call on that device
  made by the same thread;
* when ``check_ids_now()`` is called in that thread.

**Who owns a flag.** Eager calls write a flag owned by the launching thread and its current stream
(a ``_Guard``, kept in a thread-local table): one thread's bad id is never raised in another
thread, never lost because another thread cleared a shared flag, and the flag of one stream is
never cleared by work queued on another. A thread that makes calls on several streams of one
device has one guard per stream; its next call on the device checks the pending inference calls of
all of them.

Calls inside a captured CUDA graph or a ``torch.compile``'d graph cannot know which thread will
replay them: they write the device's *graph flag* (made by the first eager call on the device, as a
graph cannot allocate it), which ``check_ids_now()`` reads (a sync) in whichever thread calls it.
Exported graphs (``torch.export``) write no flag at all: an exported program must be a pure
function (their bad rows are still NaN).

The flag is sticky: once an id is recorded it stays until the error has been raised, then it is
cleared. On CPU tensors (Triton's interpreter) the kernel has finished when the launch returns,
so the same protocol runs with the flag itself as the host copy and no events.

Every tensor here is made outside inference mode and outside any dispatch mode (FakeTensorMode,
a debugging mode): a flag lives as long as its thread and must serve every later call, whatever
mode that call runs in.
"""
import collections
import threading
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

#: Flag layout: [0] the lowest negative token id seen (0: none), [1] the highest token id >= its
#: vocab size seen (0: none), [2] and [3] the same for positions, [4] and [5] the vocab size and
#: position-table size of the call that recorded them; [6] and [7] the same for token-type ids
#: (the encoder op's) and [8] the token-type table's size.
ID_FLAG_SIZE = 9

#: Training calls left for their backward to check before a forward checks them itself.
_BACKLOG = 32

_LATER = (" (found by the kernel, so raised after the launch: in the backward of the call, or at the next "
          "call on this device in this thread; pass check_ids='sync' to raise before the launch)")


def new_persistent(factory):
    """``factory()``'s tensor made as a plain tensor: outside inference mode (an inference tensor
    could not be written or saved for backward by later calls outside it) and outside any dispatch
    mode (a FakeTensor would serve no real call). For what caches and flags keep across calls."""
    with torch.inference_mode(False), _disable_current_modes():
        return factory()


class _Record:
    """One checked launch: whether its host copy has been looked at, and whether the next call
    of its thread must look at it."""

    __slots__ = ("guard", "event", "wait_at_next_call", "checked")

    def __init__(self, guard, event, wait_at_next_call):
        self.guard = guard
        self.event = event
        self.wait_at_next_call = wait_at_next_call
        self.checked = False


class _Guard:
    """The flag of one (thread, device, stream), its host copy and its launches not yet checked.

    Launches of one stream finish in order, so waiting for a record's event waits for every
    earlier record of the guard. The owning thread launches; the check of a record may run in
    another thread (autograd runs a CUDA backward on its device thread), hence the lock."""

    def __init__(self, device: torch.device, stream=None):
        self.device = device
        self.stream = stream  # the CUDA stream handle the launches go to (None: the interpreter's)
        self.cuda = device.type == "cuda"
        self.flag = new_persistent(lambda: torch.zeros(ID_FLAG_SIZE, dtype=torch.int64, device=device))
        # The interpreter's kernels run synchronously on CPU tensors: the flag is its own copy.
        self.host = new_persistent(lambda: torch.zeros(ID_FLAG_SIZE, dtype=torch.int64, pin_memory=True)) \
            if self.cuda else self.flag
        self.pending = collections.deque()
        self.free_events = []
        self.lock = threading.Lock()

    def before_launch(self) -> None:
        """Raise for an earlier call whose error must surface now (see the module docstring)."""
        lock = self.lock  # (a backward in another thread may be emptying the queue meanwhile)
        lock.acquire()
        try:
            pending = self.pending
            if not pending:
                return
            newest = pending[-1]
            if newest.wait_at_next_call:
                # The last call was an inference call: its error must surface now. Checking it
                # checks every earlier one too (the flag is sticky).
                self._check_locked(newest, False)
                return
            if len(pending) <= _BACKLOG:
                return
            pending = list(pending)
        finally:
            lock.release()
        # Training calls whose backward has not come (a forward-only loop with grad enabled):
        # check the newest that has finished, and with it all earlier ones. Launches on one stream
        # finish in order, so a binary search finds it in a few event queries.
        finished = None
        low, high = 0, len(pending) - 1
        while low <= high:
            middle = (low + high) // 2
            record = pending[middle]
            if record.event is None or record.event.query():
                finished, low = record, middle + 1
            else:
                high = middle - 1
        if finished is not None:
            self.check(finished, finished=True)

    def waits_at_next_call(self) -> bool:
        """Whether the newest pending launch is an inference call's (checked at the next call)."""
        with self.lock:
            return bool(self.pending) and self.pending[-1].wait_at_next_call

    def launch(self, wait_at_next_call: bool, launch, *arguments):
        """(``launch(*arguments)``, the record of that launch), under the guard's lock (see after_launch)."""
        with self.lock:
            result = launch(*arguments)
            return result, self.after_launch(wait_at_next_call)

    def after_launch(self, wait_at_next_call: bool) -> _Record:
        """Record a launch. The caller holds ``self.lock`` from before the launch: a check in
        another thread must not clear the flag between the launch and its copy here."""
        event = None
        if self.cuda:  # (every checked launch: no torch.func level is active here, the forward runs below them)
            self.host.copy_(self.flag, non_blocking=True)
            event = self.free_events.pop() if self.free_events else torch.cuda.Event()
            event.record()
        record = _Record(self, event, wait_at_next_call)
        self.pending.append(record)
        return record

    def check(self, record: _Record, finished: bool = False) -> None:
        """Wait for ``record``'s launch (and so the earlier ones of this stream) and raise if an
        id was bad. ``finished``: its event has been seen complete already."""
        with self.lock:
            self._check_locked(record, finished)

    def _check_locked(self, record: _Record, finished: bool) -> None:
        if record.checked:
            return
        if record.event is not None and not finished:
            record.event.synchronize()
        pending = self.pending
        while pending:
            oldest = pending.popleft()
            oldest.checked = True
            if oldest.event is not None:
                self.free_events.append(oldest.event)
            if oldest is record:
                break
        # The host copy of the launch waited for: the flag is sticky, so it holds every id
        # recorded by the launches before it too.
        values = self.host.tolist()
        if _recorded(values) and pending and pending[-1].event is not None:
            # Raising clears the flag, and with it what later launches of this stream (already
            # queued, not yet checked) wrote or will write before the clear: wait for them, so that
            # the error raised now covers theirs too instead of losing it.
            pending[-1].event.synchronize()
            values = self.host.tolist()
        self._raise_if_recorded(values)

    def check_now(self) -> None:
        """Read the device flag itself after every launch of its stream (a sync) and raise if an
        id was ever recorded."""
        with self.lock:
            for record in self.pending:
                record.checked = True
                if record.event is not None:
                    self.free_events.append(record.event)
            self.pending.clear()
            with self._on_stream():  # (the read waits for this stream's launches, not the current stream's)
                values = self.flag.tolist()
            self._raise_if_recorded(values)

    def _raise_if_recorded(self, values) -> None:
        if not _recorded(values):
            return
        self._clear()
        for record in self.pending:
            record.checked = True
        self.pending.clear()
        raise IndexError(flag_error(values) + _LATER)

    def _on_stream(self):
        if self.cuda and self.stream is not None:
            return torch.cuda.stream(torch.cuda.ExternalStream(self.stream, device=self.device))
        return _no_context()

    def __del__(self):
        # A thread that ends with launches not yet checked (its last call an inference call with a
        # bad id, say) leaves its flag to check_ids_now(), in whichever thread calls it next.
        try:
            if self.pending:
                _orphans.append(self)
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    def _clear(self) -> None:
        # On the guard's own stream: ordered after its launches, before its next ones. Outside any
        # torch.func transform: a backward under torch.func.grad checks (and clears) from inside
        # one, which would refuse an in-place op on a tensor it did not make.
        with self._on_stream(), torch._C._DisableFuncTorch():
            self.flag.zero_()
            if self.cuda:
                self.host.zero_()


class _no_context:
    def __enter__(self):
        return None

    def __exit__(self, *exc_info):
        return False


def _recorded(values) -> bool:
    return bool(values[0] or values[1] or values[2] or values[3] or values[6] or values[7])


def flag_error(values) -> str:
    low_token, high_token, low_position, high_position, vocab_size, num_positions, low_type, high_type, num_types = \
        values
    if low_token or high_token:
        return token_error(low_token or high_token, vocab_size)
    if low_position or high_position:
        return position_error(low_position or high_position, num_positions)
    return token_type_error(low_type or high_type, num_types)


def token_error(bad_id: int, vocab_size: int) -> str:
    return f"token id {bad_id} is out of range for vocab size {vocab_size} (valid ids are 0..{vocab_size - 1})"


def token_type_error(bad_type: int, num_types: int) -> str:
    return (f"token type id {bad_type} is out of range for a token-type table of {num_types} rows "
            f"(valid token type ids are 0..{num_types - 1})")


def position_error(bad_position: int, num_positions: int) -> str:
    return (f"position id {bad_position} is out of range for a position table of {num_positions} rows "
            f"(context_length {num_positions}, valid positions are 0..{num_positions - 1})")


# --- whose guard: the calling thread's, by (device, stream) --------------------------------------

_local = threading.local()
#: What makes a guard (bench/host_overhead.py substitutes one that runs the CUDA protocol on CPU).
_GUARD_CLASS = _Guard


def _thread_guards() -> Dict[tuple, _Guard]:
    try:
        return _local.guards
    except AttributeError:
        _local.guards = guards = {}
        return guards


def guard(device: torch.device, stream=None) -> _Guard:
    """The calling thread's guard for launches on (``device``, ``stream``), made on first use, with
    the checks due before a launch done: an earlier inference call of this thread on this device
    (on any of its streams) raises now."""
    try:  # (_thread_guards inlined: this runs in every checked call)
        guards = _local.guards
    except AttributeError:
        guards = _local.guards = {}
    found = guards.get((device, stream))
    if found is None:
        found = guards[(device, stream)] = _GUARD_CLASS(device, stream)
        _ensure_graph_flag(device)
    if len(guards) > 1:
        for other in list(guards.values()):
            if other is not found and other.device == device and other.waits_at_next_call():
                other.before_launch()
    if found.pending:
        found.before_launch()
    return found


def settle(device: torch.device) -> None:
    """Raise now what the next launch on ``device`` by this thread would raise for earlier calls:
    for a call that changes state before its launch (max_norm renormalises the tables, dropout draws
    a seed), so that a call that raises changes nothing."""
    if device.type in ("cuda", "cpu") and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        guard(device, launch_stream(device))


def existing_guard(device: torch.device, stream=None) -> Optional[_Guard]:
    """The calling thread's guard for (``device``, ``stream``; default: the current stream), or None."""
    device = torch.device(device)
    return _thread_guards().get((device, launch_stream(device) if stream is None else stream))


def launch_stream(device: torch.device):
    """The stream handle a launch on ``device`` goes to now (None on CPU tensors)."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).cuda_stream


# --- graphs: one flag per device, not owned by a thread -----------------------------------------

_graph_flags: Dict[torch.device, torch.Tensor] = {}
_graph_lock = threading.Lock()
#: Guards of threads that ended with launches not yet checked (see _Guard.__del__).
_orphans = []


def _ensure_graph_flag(device: torch.device) -> None:
    if device not in _graph_flags:
        with _graph_lock:
            if device not in _graph_flags:
                _graph_flags[device] = new_persistent(
                    lambda: torch.zeros(ID_FLAG_SIZE, dtype=torch.int64, device=device))


def flag_for_launch(device: torch.device):
    """(the flag to pass to the forward kernel or None, the guard to record the launch with or None)
    for an eager launch on ``device``'s current stream.

    While a CUDA graph is being captured nothing may wait or read, so the launch only writes the
    device's graph flag (each replay will), which check_ids_now() reads. The graph flag is not
    created during a capture (its memory would belong to the graph's pool): warm up first, as
    CUDA graph capture wants anyway; a call captured without one is not checked.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _graph_flags.get(device), None
    found = guard(device, launch_stream(device))
    return found.flag, found


def compiled_flag(device: torch.device) -> Optional[torch.Tensor]:
    """The flag a torch.compile'd call writes: the device's graph flag, if an eager call has made
    it. None while exporting: an exported program writes no state."""
    if torch.compiler.is_exporting():
        return None
    return _graph_flags.get(device)


def _check_graph_flag(flag: torch.Tensor) -> None:
    with _graph_lock:
        if flag.is_cuda:
            torch.cuda.synchronize(flag.device)  # (a graph may have been replayed on any stream)
        values = flag.tolist()
        if not _recorded(values):
            return
        flag.zero_()
    raise IndexError(flag_error(values) + " (found by the kernel in a compiled or captured graph; raised by "
                     "check_ids_now())")


def check_ids_now(device=None) -> None:
    """Raise ``IndexError`` now if a checked call of this thread on ``device`` (default: every
    device) looked up an id outside its table and the error has not been raised yet, or if a
    compiled or captured graph on that device did, or a thread that has ended did (graphs and
    ended threads belong to no live thread: whichever thread calls this gets their error). Waits for the device (a host sync): call it where that is
    cheap, e.g. after a captured CUDA graph's replays or a compiled step, whose own checks cannot
    raise. Other threads' eager calls are theirs to check."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    for found in list(_thread_guards().values()):
        if device is None or found.device == device:
            found.check_now()
    for found in list(_orphans):
        if device is None or found.device == device:
            _orphans.remove(found)
            found.check_now()
    for flag_device, flag in list(_graph_flags.items()):
        if device is None or flag_device == device:
            _check_graph_flag(flag)

"""Out-of-range ids without a host sync: the forward kernel records them, the host raises later.

Checking ids before a launch means reading them on the host: one sync with the GPU queue per
call (0.28 ms per forward on an H100, bench/RESULTS.md). Instead, with ``check_ids=True`` (the
default), the forward kernel, which reads every id anyway, records any id outside its table in a
small per-device flag (int64 [ID_FLAG_SIZE], see kernels/forward.py for the layout); its output
row is NaN. After the launch the flag is copied to pinned host memory (an asynchronous copy) and
an event recorded. The host looks at that copy, after waiting for that event only (never the
whole queue), and raises ``IndexError`` naming the id and the limit:

* in the backward of that call, before any gradient is returned: nothing trains on the NaN rows;
* for a call with no backward coming (inference), at the latest at the next call on that device;
* for a call in a captured CUDA graph or a torch.compile'd graph, at the next eager call on that
  device, or when ``check_ids_now()`` is called: the flag keeps what the graph recorded.

The flag is sticky: once an id is recorded it stays until the error has been raised, then it is
cleared. On CPU tensors (Triton's interpreter) the kernel has finished when the launch returns,
so the same protocol runs with the flag itself as the host copy and no events.
"""
import collections
import threading
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

#: Flag layout: [0] the lowest negative token id seen (0: none), [1] the highest token id >= its
#: vocab size seen (0: none), [2] and [3] the same for positions, [4] and [5] the vocab size and
#: position-table size of the call that recorded them.
ID_FLAG_SIZE = 6

_guards: Dict[torch.device, "_DeviceGuard"] = {}
_lock = threading.Lock()


class _Record:
    """One checked launch: where its flag copy will be, and whether the next call must wait for it."""

    __slots__ = ("guard", "event", "wait_at_next_call", "stream", "checked")

    def __init__(self, guard, event, wait_at_next_call, stream=None):
        self.guard = guard
        self.event = event
        self.wait_at_next_call = wait_at_next_call
        self.stream = stream  # the launch's stream handle, where the caller knows it
        self.checked = False


class _DeviceGuard:
    def __init__(self, device: torch.device):
        self.device = device
        self.flag = torch.zeros(ID_FLAG_SIZE, dtype=torch.int64, device=device)
        self.cuda = device.type == "cuda"
        # The interpreter's kernels run synchronously on CPU tensors: the flag is its own copy.
        self.host = torch.zeros(ID_FLAG_SIZE, dtype=torch.int64, pin_memory=True) if self.cuda else self.flag
        self.pending = collections.deque()
        self.free_events = []

    def before_launch(self) -> None:
        """Raise for an earlier call whose error must surface now (see the module docstring)."""
        pending = self.pending
        if not pending:
            return
        if pending[-1].wait_at_next_call:
            # The last call was an inference call: its error must surface now. Checking it checks
            # every earlier one too (the flag is sticky).
            self.check(pending[-1])
        elif len(pending) > _BACKLOG:
            # Training calls whose backward has not come (a forward-only loop with grad enabled):
            # check the newest that has finished, and with it all earlier ones. Launches on one
            # stream finish in order, so a binary search finds it in a few event queries.
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

    def after_launch(self, wait_at_next_call: bool, stream=None) -> _Record:
        event = None
        if self.cuda:
            self.host.copy_(self.flag, non_blocking=True)
            event = self.free_events.pop() if self.free_events else torch.cuda.Event()
            event.record()
        record = _Record(self, event, wait_at_next_call, stream)
        self.pending.append(record)
        return record

    def check(self, record: _Record, finished: bool = False) -> None:
        """Wait for ``record``'s launch (and the ones before it) and raise if an id was bad.
        ``finished``: its event has been seen complete already."""
        pending = self.pending
        waited = False
        while pending and not record.checked:
            oldest = pending.popleft()
            oldest.checked = True
            waited = True
            event = oldest.event
            if event is not None:
                # An earlier launch on the same (known) stream has finished when this one has:
                # only this one and launches on other or unknown streams are waited for.
                if (oldest is record and not finished) or \
                        (oldest is not record and (oldest.stream is None or oldest.stream != record.stream)):
                    event.synchronize()
                self.free_events.append(event)
        if waited:
            # The host copy of the last launch waited for: the flag is sticky, so it holds every
            # id recorded by the launches before it too.
            self._raise_if_recorded(self.host.tolist())

    def check_now(self) -> None:
        """Read the device flag itself (a sync) and raise if an id was ever recorded."""
        for record in self.pending:
            record.checked = True
            if record.event is not None:
                self.free_events.append(record.event)
        self.pending.clear()
        self._raise_if_recorded(self.flag.tolist())

    def _raise_if_recorded(self, values) -> None:
        low_token, high_token, low_position, high_position, vocab_size, num_positions = values
        if not (low_token or high_token or low_position or high_position):
            return
        self.flag.zero_()
        if self.cuda:
            self.host.zero_()
        for record in self.pending:
            record.checked = True
        self.pending.clear()
        if low_token or high_token:
            raise IndexError(token_error(low_token or high_token, vocab_size) + _LATER)
        raise IndexError(position_error(low_position or high_position, num_positions) + _LATER)


#: Training calls left for their backward to check before a forward checks them itself.
_BACKLOG = 32

_LATER = (" (found by the kernel, so raised after the launch: in the backward of the call, or at the next "
          "call on this device; pass check_ids='sync' to raise before the launch)")


def token_error(bad_id: int, vocab_size: int) -> str:
    return f"token id {bad_id} is out of range for vocab size {vocab_size} (valid ids are 0..{vocab_size - 1})"


def position_error(bad_position: int, num_positions: int) -> str:
    return (f"position id {bad_position} is out of range for a position table of {num_positions} rows "
            f"(context_length {num_positions}, valid positions are 0..{num_positions - 1})")


def flag_for_launch(device: torch.device):
    """(the flag to pass to the forward kernel or None, the guard to record the launch with or None).

    While a CUDA graph is being captured nothing may wait or read, so the launch only writes the
    flag (each replay will), and an eager call or check_ids_now() reads it later. A flag is not
    created during a capture (its memory would belong to the graph's pool): warm up first, as
    CUDA graph capture wants anyway; a call captured without one is not checked.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        found = _guards.get(device)
        return (None if found is None else found.flag), None
    found = guard(device)
    found.before_launch()
    return found.flag, found


def compiled_flag(device: torch.device) -> Optional[torch.Tensor]:
    """The flag a torch.compile'd call writes: the device's, if an eager call has made it."""
    found = _guards.get(device)
    return None if found is None else found.flag


def guard(device: torch.device) -> _DeviceGuard:
    """The flag and pending checks of ``device`` (created on first use)."""
    found = _guards.get(device)
    if found is None:
        with _lock:
            found = _guards.get(device)
            if found is None:
                # Outside any dispatch mode (a recording or debugging mode the call runs under):
                # the flag lives as long as the process.
                with _disable_current_modes():
                    found = _guards[device] = _DeviceGuard(device)
    return found


def existing_guard(device: torch.device) -> Optional[_DeviceGuard]:
    return _guards.get(device)


def check_ids_now(device=None) -> None:
    """Raise ``IndexError`` now if any checked call on ``device`` (default: every device used) looked
    up an id outside its table and the error has not been raised yet. Waits for the device (a host
    sync): call it where that is cheap, e.g. after a captured CUDA graph's replays or a compiled
    step, whose own checks cannot raise."""
    if device is None:
        guards = list(_guards.values())
    else:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        found = _guards.get(device)
        guards = [] if found is None else [found]
    for found in guards:
        found.check_now()

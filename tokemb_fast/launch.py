"""Kernel launches with little host time: reuse the binary Triton chose for the first launch of a plan.

Triton's own launch (``kernel[grid](*args)``) binds every argument, derives a specialization from
each (the dtype and 16-byte alignment of every pointer; whether each integer is 1, divisible by
16 or wider than 32 bits), hashes that into a cache key, and for an autotuned kernel first runs
the autotuner's per-call lookup: 20-50 us of Python per launch (bench/host_overhead.py), on an
H100 more than the GPU time of a GPT-2-sized forward.

The launchers (tokemb_fast.triton_ops) keep, per *plan key*, what Triton chose at the first
launch made the ordinary way (so Triton compiles, autotunes and picks the binary): a
``KernelPlan`` holding the binary, its grid and constexprs, which later calls with the same key
hand to Triton's launcher directly, in a few us. The key must determine everything Triton
specializes on: every integer argument exactly or by its class (``int_class``), every pointer's
dtype and alignment (``aligned``), every constexpr and launch option. tests/compare_planned_launches.py
checks, under a stand-in GPU driver, that planned and ordinary launches run the same binaries
with the same grids and arguments.

Where the internals differ from the ones this was written against (Triton outside
``SUPPORTED_TRITON``, a launch hook installed by a profiler) or there is no binary (the
interpreter), every launch takes Triton's ordinary path.
"""
import os
import threading
from typing import Optional

import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Versions whose ``JITFunction.run`` launches as ``binary.run(grid_x, grid_y, grid_z, stream,
#: binary.function, binary.packed_metadata, launch_metadata, enter_hook, exit_hook, *every
#: argument in signature order)``: read in Triton 3.6 (PyTorch 2.11's) and 3.9.
SUPPORTED_TRITON = ((3, 6), (3, 9))
_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())

#: Whether plans are made at all (TOKEMB_FAST_CACHED_LAUNCH=0 turns them off).
ENABLED = not INTERPRETED and SUPPORTED_TRITON[0] <= _VERSION <= SUPPORTED_TRITON[1] and \
    os.environ.get("TOKEMB_FAST_CACHED_LAUNCH", "1") != "0"

#: Held by every interpreted launch (compiled launches never take it).
INTERPRETER_LOCK = threading.Lock()

#: When a list, every launch appends (kernel name, "planned" | "triton"): tests read which path ran.
PATHS = None

_runtime = triton.knobs.runtime


def int_class(value: int) -> int:
    """What Triton specializes an integer argument on: equal to 1 (it becomes a constant),
    divisible by 16, neither; and 32 or 64 bits wide."""
    if value == 1:
        return 1
    wide = 4 if not -2**31 <= value < 2**31 else 0
    return wide + (2 if value % 16 == 0 else 3)


def aligned(tensor) -> bool:
    """Whether Triton will assume 16-byte alignment of this tensor's pointer."""
    return tensor.data_ptr() % 16 == 0


def hooks_installed() -> bool:
    """A launch hook (a profiler's) wants Triton's launch metadata: plans cannot serve it."""
    for hook in (_runtime.launch_enter_hook, _runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):  # Triton >= 3.6: an empty HookChain
            return True
    return False


def current_stream():
    """(device index, stream handle) as Triton's launch takes them; (None, None) where plans are
    off (the interpreter has no driver)."""
    if not ENABLED:
        return None, None
    active = driver.active
    device = active.get_current_device()
    return device, active.get_current_stream(device)


class KernelPlan:
    """One compiled binary with its grid and constexpr values: ``plan(stream, args)`` launches it."""

    __slots__ = ("name", "run", "function", "packed_metadata", "grid", "constexpr_values")

    def __init__(self, name, binary, grid, constexpr_values):
        self.name = name
        self.run = binary.run  # Triton's launcher (the first launch loaded the binary's handles)
        self.function = binary.function
        self.packed_metadata = binary.packed_metadata
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.constexpr_values = constexpr_values

    def __call__(self, stream, args) -> None:
        grid_x, grid_y, grid_z = self.grid
        self.run(grid_x, grid_y, grid_z, stream, self.function, self.packed_metadata, None, None, None, *args,
                 *self.constexpr_values)
        if PATHS is not None:
            PATHS.append((self.name, "planned"))


class CachedKernel:
    """A ``@triton.jit`` kernel (or a ``triton.autotune`` of one) that can hand out plans."""

    def __init__(self, kernel):
        self.kernel = kernel
        jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
        self.name = jit.fn.__name__
        # (The interpreter's kernels have no parameter list; they are never planned.)
        self.constexpr_names = tuple(param.name for param in getattr(jit, "params", ()) if param.is_constexpr)

    def launch(self, grid, args, constexprs) -> Optional[KernelPlan]:
        """Launch the ordinary way: ``args`` are the kernel's non-constexpr arguments in signature
        order; ``grid`` a tuple or, for an autotuned kernel, a callable of the meta-parameters;
        ``constexprs`` the constexpr parameters and launch options (num_warps). Returns a plan
        for later launches with the same specialisation, or None where plans are off."""
        if INTERPRETED:
            # Triton's interpreter keeps the launch it runs in module globals (the grid, the
            # program ids): two threads' launches at once would mix them up.
            with INTERPRETER_LOCK:
                self.kernel[grid](*args, **constexprs)
            if PATHS is not None:
                PATHS.append((self.name, "triton"))
            return None
        binary = self.kernel[grid](*args, **constexprs)
        if PATHS is not None:
            PATHS.append((self.name, "triton"))
        if not ENABLED or not all(hasattr(binary, name) for name in ("run", "function", "packed_metadata")):
            return None  # not a compiled binary of the kind this was written for: keep Triton's path
        values = dict(constexprs)
        if isinstance(self.kernel, Autotuner):
            values.update(self.kernel.best_config.all_kwargs())
        if callable(grid):
            grid = grid(values)
        return KernelPlan(self.name, binary, grid, tuple(values[name] for name in self.constexpr_names))


class PlanCache(dict):
    """Plans by key, at most ``limit`` of them (oldest dropped first): shapes that change on every
    call (generation without a KV cache grows T by one per step) must not grow memory."""

    def __init__(self, limit: int = 512):
        super().__init__()
        self.limit = limit
        self._lock = threading.Lock()

    def add(self, key, value):
        with self._lock:  # (two threads' first calls may add at once)
            if len(self) >= self.limit:
                del self[next(iter(self))]
            self[key] = value
        return value

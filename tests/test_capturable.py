"""CPU twin of the CUDA-graph test: with check_ids=False a training step of the fused op is capturable.

A CUDA graph replays a fixed sequence of kernels on fixed buffers, so capture fails (or, worse, a
replay goes wrong) if a call reads a device value on the host, or allocates a tensor whose shape
depends on the data. Neither needs a GPU to be seen: this test runs forward and backward through
the real kernels (interpreted) and records
- every host read of a tensor value (.item(), .tolist(), bool(), int(), float(), .numpy(),
  .cpu()) made by tokemb_fast's own code: each one is a device-to-host sync on a GPU;
- every op dispatched, with its output shapes: the sequence must be the same for ids of any
  values (uniform, all equal, Zipf), and contain no op whose output shape depends on values.
The positive control (check_ids=True) shows the detector finds the one sync the id check makes.
"""
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import TRITON_DEVICE
from helpers import id_distribution
from tokemb_fast import FusedInputEmbedding, triton_ops

pytestmark = pytest.mark.skipif(not (triton_ops.INTERPRETED or torch.cuda.is_available()),
                                reason="records the Triton path's host reads and ops")

PACKAGE_DIRS = tuple(os.path.dirname(os.path.abspath(module.__file__)) + os.sep
                     for module in (sys.modules["tokemb_fast"], sys.modules["tokemb_fast.kernels"]))
HOST_READS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"]
# Ops whose output shape depends on tensor values (each syncs on a GPU to size its output).
DATA_DEPENDENT = ("aten.nonzero", "aten.unique", "aten._unique", "aten.masked_select", "aten.bincount",
                  "aten.repeat_interleave", "aten._local_scalar_dense", "aten.equal", "aten.is_nonzero")

BACKEND_KEYS = {"cpu": torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                "cuda": torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)}


class RecordOpsAndShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("tokemb_fast."):
            # Run its implementation (the kernel registered below the Python key) with this mode
            # on, so the ops it runs inside (sort, allocations) are recorded too.
            with self:
                out = func.redispatch(BACKEND_KEYS[TRITON_DEVICE.type], *args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        self.ops.append((str(func), shapes))
        return out


@pytest.fixture
def host_reads(monkeypatch):
    """Host reads of tensor values made from tokemb_fast's files, as (method, file, device of the tensor)."""
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def recording(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE_DIRS):
                reads.append((_name, os.path.basename(caller.f_code.co_filename), self.device.type))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recording)
    return reads


CASES = {
    "default positions": dict(),
    "dropout": dict(dropout=0.1),
    "padding_idx, scale_grad_by_freq": dict(padding_idx=3, scale_grad_by_freq=True,
                                            position_scale_grad_by_freq=True),
    "position_ids [B, T]": dict(position_ids=True),
    "past_length": dict(past_length=5),
}


def training_step(module, ids, position_ids, past_length):
    """One forward and backward, recorded; the grads accumulate into existing buffers, as in a graph."""
    grad_out = torch.ones(*ids.shape, module.embedding_dim, device=ids.device)
    with RecordOpsAndShapes() as recorder:
        out = module(ids, position_ids=position_ids, past_length=past_length)
        out.backward(grad_out)
    return recorder.ops


@pytest.mark.parametrize("case", CASES)
def test_unchecked_training_step_has_no_host_sync_and_static_shapes(case, host_reads, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    options = dict(CASES[case])
    explicit_positions = options.pop("position_ids", False)
    past_length = options.pop("past_length", 0)
    vocab_size, context_length, batch, seq_len = 50, 24, 40, 8  # B >= 32: the position chunk kernel runs too
    module = FusedInputEmbedding(vocab_size, context_length, 16, check_ids=False, device=TRITON_DEVICE, **options)
    for parameter in module.parameters():
        parameter.grad = torch.zeros_like(parameter)
    sequences = {}
    for kind in ("uniform", "all_equal", "zipf"):
        ids = id_distribution(kind, (batch, seq_len), vocab_size, device=TRITON_DEVICE)
        position_ids = id_distribution(kind, (batch, seq_len), context_length, device=TRITON_DEVICE) \
            if explicit_positions else None
        sequences[kind] = training_step(module, ids, position_ids, past_length)
    assert host_reads == [], f"host reads of device values (syncs on a GPU): {host_reads}"
    ops = sequences["uniform"]
    assert any(op.startswith("tokemb_fast.") for op, _ in ops), "the fused op did not run"
    dependent = [op for op, _ in ops if op.startswith(DATA_DEPENDENT)]
    assert dependent == [], f"ops with data-dependent output shapes: {dependent}"
    for kind, other in sequences.items():
        assert other == ops, f"ids {kind!r} dispatch different ops or shapes than uniform ids"


def test_default_id_check_reads_only_its_host_copy_once_per_step(host_reads, monkeypatch):
    # check_ids=True: the forward kernel records bad ids in a device flag, copied to host memory
    # without a sync; the backward reads that copy (after waiting for its own forward's event).
    # On a GPU the tensor read is the pinned host copy, never a device tensor.
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    module = FusedInputEmbedding(50, 24, 16, device=TRITON_DEVICE)
    assert module.check_ids is True
    ids = torch.randint(0, 50, (4, 8), device=TRITON_DEVICE)
    out = module(ids)
    assert host_reads == [], f"the forward read device values: {host_reads}"
    out.sum().backward()
    assert host_reads == [("tolist", "id_check.py", "cpu")], host_reads
    with torch.no_grad():  # inference: checked at the next call on the device
        module(ids)
        assert len(host_reads) == 1
        module(ids)
    assert host_reads[1:] == [("tolist", "id_check.py", "cpu")], host_reads


def test_the_detectors_see_the_sync_id_check(host_reads, monkeypatch):
    # Positive control: check_ids="sync" reads the ids' min and max on the host, once per call.
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    module = FusedInputEmbedding(50, 24, 16, check_ids="sync", device=TRITON_DEVICE)
    module(torch.randint(0, 50, (4, 8), device=TRITON_DEVICE))
    assert [(name, where, device) for name, where, device in host_reads] == [
        ("tolist", "validation.py", TRITON_DEVICE.type)], host_reads
    with RecordOpsAndShapes() as recorder:
        torch.nonzero(torch.randint(0, 2, (16,), device=TRITON_DEVICE))
    assert [op for op, _ in recorder.ops if op.startswith(DATA_DEPENDENT)] == ["aten.nonzero.default"]

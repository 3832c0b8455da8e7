"""What one call dispatches: the forward is one op (one kernel launch) unless the id check runs."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TRITON_DEVICE
from tokemb_fast import fused_input_embedding, triton_ops

pytestmark = pytest.mark.skipif(not (triton_ops.INTERPRETED or torch.cuda.is_available()),
                                reason="counts the Triton path's ops")

VIEWS = {"aten.view.default", "aten.unsqueeze.default", "aten.select.int", "aten.expand.default",
         "aten.alias.default", "aten.detach.default"}


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def forward_ops(**kwargs):
    ids = torch.randint(0, 50, (64, 1), device=TRITON_DEVICE)  # the decode shape: T = 1
    token_weight = torch.randn(50, 32, device=TRITON_DEVICE)
    position_weight = torch.randn(16, 32, device=TRITON_DEVICE)
    with RecordOps() as recorder:
        fused_input_embedding(ids, token_weight, position_weight, backend="triton", **kwargs)
    return [op for op in recorder.ops if op not in VIEWS]


@pytest.mark.parametrize("positions", ["default", "per_row"])
def test_unchecked_forward_is_one_op(positions):
    kwargs = {"check_ids": False}
    if positions == "per_row":
        kwargs["position_ids"] = torch.randint(0, 16, (64, 1), device=TRITON_DEVICE)
    assert forward_ops(**kwargs) == ["tokemb_fast.input_embedding_forward.default"]


def test_checked_forward_adds_one_reduction_per_tensor_and_one_sync():
    # aminmax per id tensor, one stack, then a single .tolist() (the one device-to-host copy:
    # on a GPU, tolist copies to the CPU through one _to_copy; a CPU tensor's memory it reads
    # directly, dispatching nothing), then the forward itself.
    to_host = ["aten._to_copy.default"] if TRITON_DEVICE.type == "cuda" else []
    assert forward_ops(check_ids=True) == [
        "aten.aminmax.default", "aten.stack.default", *to_host, "tokemb_fast.input_embedding_forward.default"]
    position_ids = torch.randint(0, 16, (64, 1), device=TRITON_DEVICE)
    assert forward_ops(check_ids=True, position_ids=position_ids) == [
        "aten.aminmax.default", "aten.aminmax.default", "aten.stack.default", *to_host,
        "tokemb_fast.input_embedding_forward.default"]


def test_plain_eager_calls_run_the_launcher_directly_and_match_the_op(monkeypatch):
    # Outside tracing the launcher body runs without the op's dispatch (its host cost matters at
    # GPT-2 sizes); the op itself still serves dispatch modes, tensor subclasses and torch.compile.
    ids = torch.randint(0, 50, (4, 8), device=TRITON_DEVICE)
    token_weight = torch.randn(50, 32, device=TRITON_DEVICE)
    position_weight = torch.randn(16, 32, device=TRITON_DEVICE)
    args = (ids, token_weight, position_weight, None, 0, 0.0, None, None)
    assert triton_ops._plain_eager(args)
    assert not triton_ops._plain_eager((ids.as_subclass(Subclass),))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert not triton_ops._plain_eager(args)
    with RecordOps():
        assert not triton_ops._plain_eager(args)
    # ... with wrap_triton off, as the op's own eager body runs it: with it on, each launch goes
    # through wrap_triton's tracing operator (4x slower per call on an H100).
    from torch._library.triton import is_wrap_triton_enabled
    wrap_states = []
    original_wrap = triton_ops.wrap_triton
    monkeypatch.setattr(triton_ops, "wrap_triton",
                        lambda kernel: wrap_states.append(is_wrap_triton_enabled()) or original_wrap(kernel))
    direct = triton_ops.input_embedding_forward(*args)
    assert wrap_states == [False]
    through_op = triton_ops.input_embedding_forward.op(*args)
    assert torch.equal(direct, through_op)
    grad_out = torch.randn(4, 8, 32, device=TRITON_DEVICE)
    grad_args = (grad_out, ids, 50, 0, -1, False, 1, 0.0, None, None)
    assert torch.equal(triton_ops.embedding_dense_grad(*grad_args), triton_ops.embedding_dense_grad.op(*grad_args))


class Subclass(torch.Tensor):
    pass

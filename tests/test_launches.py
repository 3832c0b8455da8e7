"""What one call dispatches and launches, and which path each launch takes."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TRITON_DEVICE
from tokemb_fast import autograd, fused_input_embedding, triton_ops

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
@pytest.mark.parametrize("check_ids", [False, True])
def test_forward_is_one_op(positions, check_ids):
    # check_ids=True: the kernel records bad ids itself. On a GPU the flag's asynchronous copy to
    # host memory follows (a copy, not a launch, and no sync); on CPU tensors there is none.
    kwargs = {"check_ids": check_ids}
    if positions == "per_row":
        kwargs["position_ids"] = torch.randint(0, 16, (64, 1), device=TRITON_DEVICE)
    # Without a flag to write, the op that mutates nothing (what a traced graph then holds).
    copy = ["aten.copy_.default"] if check_ids and TRITON_DEVICE.type == "cuda" else []
    op = "tokemb_fast.input_embedding_forward.default" if check_ids else "tokemb_fast.input_embedding.default"
    assert forward_ops(**kwargs) == [op, *copy]


def test_sync_checked_forward_adds_one_reduction_per_tensor_and_one_sync():
    # aminmax per id tensor, one stack, then a single .tolist() (the one device-to-host copy:
    # on a GPU, tolist copies to the CPU through one _to_copy; a CPU tensor's memory it reads
    # directly, dispatching nothing), then the forward itself.
    to_host = ["aten._to_copy.default"] if TRITON_DEVICE.type == "cuda" else []
    assert forward_ops(check_ids="sync") == [
        "aten.aminmax.default", "aten.stack.default", *to_host, "tokemb_fast.input_embedding.default"]
    position_ids = torch.randint(0, 16, (64, 1), device=TRITON_DEVICE)
    assert forward_ops(check_ids="sync", position_ids=position_ids) == [
        "aten.aminmax.default", "aten.aminmax.default", "aten.stack.default", *to_host,
        "tokemb_fast.input_embedding.default"]


def test_plain_eager_calls_run_the_launchers_directly_and_match_the_ops(monkeypatch, kernel_launches):
    # Outside tracing the launchers run without the ops' dispatch (their host cost matters at
    # GPT-2 sizes); the ops themselves still serve dispatch modes, tensor subclasses and torch.compile.
    ids = torch.randint(0, 50, (4, 8), device=TRITON_DEVICE)
    token_weight = torch.randn(50, 32, device=TRITON_DEVICE)
    position_weight = torch.randn(16, 32, device=TRITON_DEVICE)
    assert autograd._direct(ids, token_weight, position_weight, None)
    assert not autograd._direct(ids.as_subclass(Subclass), token_weight)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert not autograd._direct(ids, token_weight)
    with RecordOps():
        assert not autograd._direct(ids, token_weight)
    # Neither path launches through wrap_triton's tracing operator outside tracing (4x slower
    # per call on an H100): both take tokemb_fast.launch's launches.
    wrapped = []
    original_wrap = triton_ops.wrap_triton
    monkeypatch.setattr(triton_ops, "wrap_triton", lambda kernel: wrapped.append(kernel) or original_wrap(kernel))
    args = (ids, token_weight, position_weight, None, 0, 0.0, None, None, None, None)
    grad_out = torch.randn(4, 8, 32, device=TRITON_DEVICE)
    grad_args = (grad_out, ids, 50, 0, -1, False, 1, 0.0, None, None, None)
    direct = triton_ops.input_embedding_forward.direct(*args), triton_ops.embedding_dense_grad.direct(*grad_args)
    direct_launches = list(kernel_launches)
    kernel_launches.clear()
    through_op = triton_ops.input_embedding_forward(*args), triton_ops.embedding_dense_grad(*grad_args)
    assert torch.equal(direct[0], through_op[0]) and torch.equal(direct[1], through_op[1])
    assert wrapped == []
    assert [name for name, _ in kernel_launches] == [name for name, _ in direct_launches]
    assert [name for name, _ in direct_launches][:3] == ["input_embedding_fwd_kernel", "sort_keys_kernel",
                                                         "segment_bounds_and_chunks_kernel"]


def test_plain_training_takes_the_direct_path_and_records_no_double_backward_graph(kernel_launches, monkeypatch):
    # The common case pays nothing for double backward or torch.func support.
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    calls = []
    for name in ("differentiable_table_grads", "table_grads"):
        original = getattr(autograd, name)
        monkeypatch.setattr(autograd, name, lambda *a, _name=name, _original=original: calls.append(_name)
                            or _original(*a))
    weights = [torch.randn(50, 32, device=TRITON_DEVICE, requires_grad=True) for _ in range(2)]
    ids = torch.randint(0, 50, (4, 8), device=TRITON_DEVICE)
    out = fused_input_embedding(ids, *weights)
    out.sum().backward()
    assert calls == ["table_grads"]
    assert weights[0].grad.grad_fn is None and not weights[0].grad.requires_grad
    grads = torch.autograd.grad(fused_input_embedding(ids, *weights).square().sum(), weights, create_graph=True)
    assert calls == ["table_grads", "differentiable_table_grads", "table_grads"]
    assert all(grad.requires_grad for grad in grads)


class Subclass(torch.Tensor):
    pass


def test_repeated_plain_calls_take_the_planned_forward_with_the_same_results(monkeypatch):
    # The first call of a layout plans it; later plain eager calls run its PlannedForward
    # (under the interpreter through Triton's ordinary launch, on a GPU through the binary's
    # launcher): same outputs, gradients, double backward and id errors as the general path.
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    generator = torch.Generator().manual_seed(torch.seed() % 2**32)
    token_weight = torch.randn(50, 32, generator=generator).to(TRITON_DEVICE).requires_grad_()
    position_weight = torch.randn(16, 32, generator=generator).to(TRITON_DEVICE).requires_grad_()
    ids = torch.randint(0, 50, (4, 8), generator=generator).to(TRITON_DEVICE)
    upstream = torch.randn(4, 8, 32, generator=generator).to(TRITON_DEVICE).requires_grad_()  # grads are linear in it

    def step():
        out = fused_input_embedding(ids, token_weight, position_weight, padding_idx=3)
        grads = torch.autograd.grad(out, (token_weight, position_weight), upstream, create_graph=True)
        second = torch.autograd.grad(grads[0].square().sum() + grads[1].sum(), upstream)
        return out, grads, second

    first = step()
    assert type(first[0].grad_fn).__name__ == "FusedInputEmbeddingFunctionBackward"
    repeated = step()
    assert type(repeated[0].grad_fn).__name__ == "_PlannedFunctionBackward"
    for general, planned in zip(first, repeated):
        for expected, actual in zip(general if isinstance(general, tuple) else (general,),
                                    planned if isinstance(planned, tuple) else (planned,)):
            assert torch.equal(expected, actual)
    reference = torch.nn.functional.embedding(ids, token_weight, padding_idx=3) + position_weight[:8]
    assert torch.equal(repeated[0], reference)
    with torch.no_grad():
        inference = fused_input_embedding(ids, token_weight, position_weight, padding_idx=3)
        assert torch.equal(inference, reference) and inference.grad_fn is None
    # A bad id in a planned call: NaN rows, IndexError in its backward before any gradient.
    bad = ids.clone()
    bad[1, 2] = 50
    fused_input_embedding(bad.clone().fill_(0), token_weight, position_weight, padding_idx=3)  # plans bad's layout
    out = fused_input_embedding(bad, token_weight, position_weight, padding_idx=3)
    assert type(out.grad_fn).__name__ == "_PlannedFunctionBackward" and out[1, 2].isnan().all()
    with pytest.raises(IndexError, match="token id 50 is out of range for vocab size 50"):
        torch.autograd.grad(out.sum(), token_weight)
    # A dispatch mode takes the general path again.
    with RecordOps():
        assert type(fused_input_embedding(ids, token_weight, position_weight, padding_idx=3).grad_fn).__name__ == \
            "FusedInputEmbeddingFunctionBackward"

"""When a bad id raises: check_ids=True (found by the kernel, raised without a host sync), "sync", False."""
import time

import pytest
import torch

from conftest import TRITON_DEVICE, requires_cuda
from tokemb_fast import FusedInputEmbedding, check_ids_now, fused_input_embedding, triton_ops
from tokemb_fast.id_check import existing_guard

pytestmark = pytest.mark.skipif(not (triton_ops.INTERPRETED or torch.cuda.is_available()),
                                reason="the kernel's id flag is on the Triton path")

TOKEN_ERROR = r"token id 12 is out of range for vocab size 10 \(valid ids are 0\.\.9\)"


@pytest.fixture
def module(monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    check_ids_now()  # nothing left over from other tests
    return FusedInputEmbedding(10, 6, 4, device=TRITON_DEVICE)


def good_ids():
    return torch.tensor([[1, 2, 3]], device=TRITON_DEVICE)


def bad_ids():
    return torch.tensor([[1, 12, 3]], device=TRITON_DEVICE)


def test_training_call_raises_in_its_backward_before_any_gradient(module):
    out = module(bad_ids())  # no host sync, so no error yet
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, [0, 2]]).all()
    with pytest.raises(IndexError, match=TOKEN_ERROR + r" \(found by the kernel"):
        out.sum().backward()
    assert module.tok_emb.weight.grad is None and module.pos_emb.weight.grad is None
    # The error was raised once: the flag is clear again.
    module(good_ids()).sum().backward()
    assert torch.isfinite(module.tok_emb.weight.grad).all()


def test_inference_call_raises_at_the_next_call_on_the_device(module):
    with torch.no_grad():
        out = module(bad_ids())
        assert torch.isnan(out[0, 1]).all()
        with pytest.raises(IndexError, match=TOKEN_ERROR):
            module(good_ids())
        assert torch.isfinite(module(good_ids())).all()  # and the call after works
        module(good_ids())


def test_check_ids_now_raises_for_a_pending_call_then_is_clear(module):
    with torch.no_grad():
        module(bad_ids())
    with pytest.raises(IndexError, match=TOKEN_ERROR):
        check_ids_now(TRITON_DEVICE)
    check_ids_now()
    check_ids_now(TRITON_DEVICE)


def test_several_bad_ids_report_the_lowest_negative_first(module):
    with torch.no_grad():
        module(torch.tensor([[11, -2, 15, -5]], device=TRITON_DEVICE))
    with pytest.raises(IndexError, match=r"token id -5 is out of range"):
        check_ids_now()
    with torch.no_grad():
        module(torch.tensor([[11, 3, 15, 2]], device=TRITON_DEVICE))
    with pytest.raises(IndexError, match=r"token id 15 is out of range"):
        check_ids_now()


def test_bad_position_ids_are_found_by_the_kernel_too(module):
    out = module(good_ids(), position_ids=torch.tensor([[0, 6, 1]], device=TRITON_DEVICE))
    assert torch.isnan(out[0, 1]).all()
    with pytest.raises(IndexError, match=r"position id 6 is out of range for a position table of 6 rows"):
        out.sum().backward()


def test_sync_mode_raises_before_the_launch(module, kernel_launches):
    module.check_ids = "sync"
    with pytest.raises(IndexError, match=TOKEN_ERROR + r"$"):
        module(bad_ids())
    assert kernel_launches == []
    assert existing_guard(TRITON_DEVICE) is None or not existing_guard(TRITON_DEVICE).pending


def test_unchecked_calls_never_raise_and_leave_no_flag(module):
    module.check_ids = False
    out = module(bad_ids())
    assert torch.isnan(out[0, 1]).all()
    out.sum().backward()
    with torch.no_grad():
        module(bad_ids())
        module(good_ids())
    check_ids_now()


@pytest.mark.parametrize("value", ["yes", 1.0, None, "Sync"])
def test_check_ids_must_be_true_false_or_sync(module, value):
    with pytest.raises(ValueError, match="check_ids must be True"):
        fused_input_embedding(good_ids(), module.tok_emb.weight, module.pos_emb.weight, check_ids=value)


def test_grad_accumulation_two_forwards_then_one_backward(module):
    first = module(bad_ids())
    # The first call's error surfaces at the latest in its backward; here a second forward comes
    # first, which may raise it already (it does when the first launch has finished).
    try:
        second = module(good_ids())
    except IndexError as error:
        assert "token id 12" in str(error)
        return
    with pytest.raises(IndexError, match=TOKEN_ERROR):
        (first.sum() + second.sum()).backward()


def test_under_vmap_the_kernel_still_finds_bad_ids(module):
    weight = module.tok_emb.weight.detach()
    positions = module.pos_emb.weight.detach()
    ids = torch.tensor([[1, 2], [3, 10]], device=TRITON_DEVICE)
    out = torch.func.vmap(lambda row: fused_input_embedding(row, weight, positions))(ids)
    assert torch.isnan(out[1, 1]).all()
    with pytest.raises(IndexError, match=r"token id 10 is out of range"):
        check_ids_now()


def _forward_ad(call, weight):
    import torch.autograd.forward_ad as forward_ad
    with forward_ad.dual_level():
        return forward_ad.unpack_dual(call(forward_ad.make_dual(weight, torch.ones_like(weight)))).primal


# Calls under forward-mode AD and torch.func's transforms, by whether a backward comes for them.
WITH_BACKWARD = {
    "torch.func.grad": lambda call, weight: torch.func.grad(lambda w: call(w).nan_to_num().sum())(weight),
    "torch.func.vjp, then its backward": lambda call, weight: torch.func.vjp(call, weight)[1](
        torch.ones(1, 3, 4, device=TRITON_DEVICE)),
    "torch.func.jacrev": lambda call, weight: torch.func.jacrev(call)(weight),
    # (The jvp rule's own unchecked call once dropped the record the outer level was still to take.)
    "torch.func.hessian": lambda call, weight: torch.func.hessian(lambda w: call(w).nan_to_num().pow(2).sum())(weight),
    "jacfwd(jacrev)": lambda call, weight: torch.func.jacfwd(torch.func.jacrev(
        lambda w: call(w).nan_to_num().pow(2).sum()))(weight),
}
WITHOUT_BACKWARD = {
    "forward-mode AD": _forward_ad,
    "torch.func.jvp": lambda call, weight: torch.func.jvp(call, (weight,), (torch.ones_like(weight),)),
    "torch.func.vjp, no backward": lambda call, weight: torch.func.vjp(call, weight),
    "torch.func.vmap over ids": lambda call, weight: torch.func.vmap(
        lambda ids: fused_input_embedding(ids, weight, call.positions))(torch.cat([good_ids(), bad_ids()])),
}


@pytest.mark.parametrize("transform", WITH_BACKWARD)
def test_under_a_transform_with_a_backward_the_backward_raises(module, transform):
    # torch.func runs setup_context once per level for one forward: the record must reach the
    # context whose backward runs (it once reached only the inner one: no error, and a later
    # unrelated call raised it instead).
    positions = module.pos_emb.weight.detach()

    def call(weight):
        return fused_input_embedding(bad_ids(), weight, positions)
    with pytest.raises(IndexError, match=TOKEN_ERROR):
        WITH_BACKWARD[transform](call, module.tok_emb.weight.detach())
    for _ in range(2):  # raised once, where it belonged: later calls are clear
        with torch.no_grad():
            module(good_ids())
    check_ids_now()


@pytest.mark.parametrize("transform", WITHOUT_BACKWARD)
def test_under_a_transform_without_a_backward_the_next_call_raises(module, transform):
    # No backward comes (forward-mode AD, jvp, vmap): as for an inference call, the thread's next
    # call raises (it was once left for a backward that never came, and raised calls later).
    positions = module.pos_emb.weight.detach()

    def call(weight):
        return fused_input_embedding(bad_ids(), weight, positions)
    call.positions = positions
    WITHOUT_BACKWARD[transform](call, module.tok_emb.weight.detach())
    with pytest.raises(IndexError, match=r"token id 12 is out of range"):
        with torch.no_grad():
            module(good_ids())
    for _ in range(2):
        with torch.no_grad():
            module(good_ids())
    check_ids_now()


@requires_cuda
def test_checked_forward_does_not_wait_for_the_gpu(module):
    # Behind a queued sleep of ~50 ms, a forward that synced with the queue would take that long.
    ids = bad_ids()
    module(good_ids())  # first call: compiles the kernel
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)
    began = time.perf_counter()
    out = module(ids)
    elapsed = time.perf_counter() - began
    assert elapsed < 0.02, f"the forward took {elapsed * 1e3:.1f} ms: it waited for the GPU"
    with pytest.raises(IndexError, match=TOKEN_ERROR):
        out.sum().backward()


@pytest.mark.skipif(not triton_ops.INTERPRETED, reason="CPU twin (aot_eager through the interpreted kernels); on a "
                                                       "GPU, Inductor: see test_compile.py")
def test_a_compiled_call_records_bad_ids_for_a_later_check(module):
    module(good_ids()).sum().backward()  # an eager call makes the device's graph flag
    compiled = torch.compile(lambda ids: module(ids).square().mean(), backend="aot_eager", fullgraph=True)
    assert torch.isfinite(compiled(good_ids()))
    check_ids_now()
    assert torch.isnan(compiled(bad_ids()))  # no sync inside the graph: no error yet
    with pytest.raises(IndexError, match=TOKEN_ERROR):
        check_ids_now()


@requires_cuda
def test_a_captured_cuda_graph_with_the_default_check_records_bad_ids(module):
    # The default check has no host sync, so a step captures; replays write the device's graph flag,
    # which check_ids_now raises.
    module.cuda()
    ids = torch.randint(0, 10, (2, 3), device="cuda")
    graphed = torch.cuda.make_graphed_callables(module, (ids,))  # warms up first (makes the flag)
    graphed(ids).sum().backward()
    check_ids_now()
    ids.copy_(torch.tensor([[1, 2, 3], [4, 12, 5]], device="cuda"))
    module.zero_grad(set_to_none=True)
    out = graphed(ids)
    out.sum().backward()  # inside the graph: no error, no sync
    torch.cuda.synchronize()
    assert torch.isnan(out[1, 1]).all()
    with pytest.raises(IndexError, match=TOKEN_ERROR):
        check_ids_now()

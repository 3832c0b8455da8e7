"""torch.compile(fullgraph=True) over the fused op, and torch.library.opcheck of its ops.

On CPU, the interpreter cannot be compiled by Inductor, so the CPU tests use the "aot_eager"
backend: Dynamo and AOT autograd trace the whole model (a graph break fails fullgraph=True)
and the kernels then run interpreted. The CUDA test uses Inductor itself.
"""
import pytest
import torch

from conftest import TRITON_DEVICE, requires_cuda
from helpers import TOLERANCES
from tokemb_fast import FusedInputEmbedding, triton_ops
from tokemb_fast.id_check import ID_FLAG_SIZE


def loss_fn(module):
    def loss(ids, position_ids=None, past_length=0):
        return module(ids, position_ids=position_ids, past_length=past_length).float().square().mean()
    return loss


def compare_compiled(module, compile_backend, dynamic, calls, exact_grads=True):
    eager = loss_fn(module)
    compiled = torch.compile(eager, backend=compile_backend, fullgraph=True, dynamic=dynamic)
    for kwargs in calls:
        module.zero_grad(set_to_none=True)
        got = compiled(**kwargs)
        got.backward()
        got_grads = [p.grad.clone() for p in module.parameters()]
        module.zero_grad(set_to_none=True)
        expected = eager(**kwargs)
        expected.backward()
        torch.testing.assert_close(got, expected)
        for ours, theirs in zip(got_grads, (p.grad for p in module.parameters())):
            if exact_grads:
                assert torch.equal(ours, theirs), "compiled and eager gradients differ"
            else:
                torch.testing.assert_close(ours, theirs, **TOLERANCES[theirs.dtype])


def calls(device):
    return [
        dict(ids=torch.randint(0, 50, (3, 5), device=device)),
        dict(ids=torch.randint(0, 50, (2, 9), device=device)),
        dict(ids=torch.randint(0, 50, (2, 4), device=device), past_length=3),
        dict(ids=torch.randint(0, 50, (2, 4), device=device),
             position_ids=torch.randint(0, 16, (2, 4), device=device)),
    ]


@pytest.mark.skipif(not triton_ops.INTERPRETED, reason="CPU twin of the CUDA compile test; needs TRITON_INTERPRET=1")
# None: Dynamo's default, automatic dynamic shapes after a recompile (what the CUDA test uses).
@pytest.mark.parametrize("dynamic", [False, True, None])
def test_fullgraph_aot_eager_through_the_kernels(dynamic, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    torch._dynamo.reset()
    module = FusedInputEmbedding(50, 16, 8)
    compare_compiled(module, "aot_eager", dynamic, calls("cpu"))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fullgraph_inductor_on_cuda(dtype):
    torch._dynamo.reset()
    module = FusedInputEmbedding(50, 16, 64, device="cuda", dtype=dtype)
    # Inductor fuses the loss's backward its own way, so the upstream gradient reaching our
    # kernels may differ from eager's in the last bit: gradients compared within one rounding.
    compare_compiled(module, "inductor", None, calls("cuda"), exact_grads=False)


def test_opcheck_forward_and_grad_ops():
    ids = torch.randint(0, 20, (3, 6), device=TRITON_DEVICE)
    token_weight = torch.randn(20, 8, device=TRITON_DEVICE)
    position_weight = torch.randn(10, 8, device=TRITON_DEVICE)
    position_ids = torch.randint(0, 10, (3, 6), device=TRITON_DEVICE)
    grad_out = torch.randn(3, 6, 8, device=TRITON_DEVICE)
    id_flag = torch.zeros(ID_FLAG_SIZE, dtype=torch.int64, device=TRITON_DEVICE)  # mutated in place
    token_scale = torch.full((1,), 1.5, dtype=torch.float64, device=TRITON_DEVICE)
    for op, args in [
        (torch.ops.tokemb_fast.input_embedding_forward,
         (ids, token_weight, position_weight, None, 2, 0.0, None, None, None, None)),
        (torch.ops.tokemb_fast.input_embedding_forward,
         (ids, token_weight, position_weight, position_ids, 0, 0.0, None, None, id_flag, token_scale)),
        (torch.ops.tokemb_fast.input_embedding,
         (ids, token_weight, position_weight, position_ids, 0, 0.0, None, None, token_scale)),
        (torch.ops.tokemb_fast.embedding_dense_grad, (grad_out, ids, 20, 0, -1, False, 1, 0.0, None, None, None)),
        (torch.ops.tokemb_fast.embedding_dense_grad, (grad_out, position_ids, 10, 0, 3, True, 1, 0.0, None, None, token_scale)),
        (torch.ops.tokemb_fast.embedding_dense_grad, (grad_out, None, 10, 4, 5, True, 3, 0.0, None, None, None)),
    ]:
        torch.library.opcheck(op, args)  # schema, autograd registration, fake, AOT dispatch

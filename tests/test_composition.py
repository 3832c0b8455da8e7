"""The fused op inside real training setups: torch.compile, autocast, CUDA graphs (GPU only)."""
import copy

import pytest
import torch
from torch import nn

from conftest import BACKENDS, TRITON_DEVICE, requires_cuda
from helpers import TOLERANCES
from gpt_models import GPTModel, GPTModelKV, NanoGPT
from tokemb_fast import FusedInputEmbedding, swap_input_embeddings, triton_ops

DEVICE = TRITON_DEVICE.type


def _loss(model, ids):
    nano = isinstance(getattr(model, "_orig_mod", model), NanoGPT)  # see through torch.compile's wrapper
    out = model(ids, ids) if nano else model(ids)
    if isinstance(out, tuple):
        return out[1]
    return nn.functional.cross_entropy(out.flatten(0, 1), ids.flatten())


@pytest.mark.skipif(not triton_ops.INTERPRETED, reason="CPU twin of the CUDA test: Dynamo + AOT autograd, kernels "
                                                       "interpreted (Inductor cannot compile the interpreter)")
@pytest.mark.parametrize("family", [GPTModel, NanoGPT])
def test_compiled_swapped_model_fullgraph_on_cpu(family, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = swap_input_embeddings(family()).eval()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 61, (2, 16))
    loss_compiled, loss_eager = _loss(compiled, ids), _loss(eager, ids)
    torch.testing.assert_close(loss_compiled, loss_eager)
    loss_compiled.backward()
    loss_eager.backward()
    eager_grads = dict(eager.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, eager_grads[name].grad, msg=name)


@requires_cuda
@pytest.mark.parametrize("family", [GPTModel, NanoGPT])
def test_compiled_swapped_model_fullgraph_inductor(family):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = swap_input_embeddings(family().cuda()).eval()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 61, (2, 16), device="cuda")
    loss_compiled, loss_eager = _loss(compiled, ids), _loss(eager, ids)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-4, atol=1e-5)
    loss_compiled.backward()
    loss_eager.backward()
    eager_grads = dict(eager.named_parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, eager_grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_behaves_as_nn_embedding(backend, autocast_dtype, table_dtype):
    # Embedding is not an autocast op: the output keeps the tables' dtype, the gradients too.
    tok, pos = nn.Embedding(40, 8, dtype=table_dtype).to(DEVICE), nn.Embedding(12, 8, dtype=table_dtype).to(DEVICE)
    fused = FusedInputEmbedding.from_embeddings(copy.deepcopy(tok), copy.deepcopy(pos))
    ids = torch.randint(0, 40, (3, 12), device=DEVICE)
    weights = torch.randn(3, 12, 8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=autocast_dtype):
        expected = tok(ids) + pos(torch.arange(12, device=DEVICE))
        got = fused(ids)
        assert got.dtype == expected.dtype == table_dtype
        (expected.float() * weights).sum().backward()
        (got.float() * weights).sum().backward()
    torch.testing.assert_close(got, expected)
    # The upstream gradient reaching the tables is `weights` rounded to the tables' dtype.
    upstream = weights.to(table_dtype).double()
    exact_tok = torch.zeros(40, 8, dtype=torch.float64, device=DEVICE).index_add_(
        0, ids.flatten(), upstream.reshape(-1, 8))
    for ours, theirs, exact in ((fused.tok_emb, tok, exact_tok), (fused.pos_emb, pos, upstream.sum(0))):
        assert ours.weight.grad.dtype == theirs.weight.grad.dtype == table_dtype
        if backend == "torch":  # the fallback is nn.Embedding's own arithmetic
            assert torch.equal(ours.weight.grad, theirs.weight.grad)
        else:  # the kernels sum in fp32 and round once
            torch.testing.assert_close(ours.weight.grad.double(), exact, **TOLERANCES[table_dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; on CPU, test_capturable checks "
                    "the step has no host sync and static shapes, test_fused_op and test_dropout its maths")
def test_cuda_graph_capture_and_replay_forward_and_backward():
    # With check_ids=False nothing syncs with the host, so forward and backward can be captured.
    torch.manual_seed(0)
    module = FusedInputEmbedding(500, 64, 128, check_ids=False, dropout=0.1).cuda()
    ids = torch.randint(0, 500, (4, 64), device="cuda")
    grad_out = torch.randn(4, 64, 128, device="cuda")
    graphed = torch.cuda.make_graphed_callables(module, (ids,))
    previous = None
    for step in range(3):
        ids.copy_(torch.randint(0, 500, (4, 64), device="cuda"))
        # As PyTorch's recipe says: None, not zeros. The first backward then adopts the graph's
        # static gradient buffer as .grad, and each replay overwrites it (with zeros, .grad would
        # be that buffer plus itself: twice the gradient, as the first device run found).
        module.zero_grad(set_to_none=True)
        out = graphed(ids)
        out.backward(grad_out)
        torch.cuda.synchronize()
        mask = out != 0  # dropout: a fresh mask at each replay
        expected = (module.tok_emb.weight[ids] + module.pos_emb.weight[:64]) * mask / 0.9
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        expected_grad = torch.zeros_like(module.tok_emb.weight)
        expected_grad.index_add_(0, ids.flatten(), (grad_out * mask / 0.9).reshape(-1, 128))
        torch.testing.assert_close(module.tok_emb.weight.grad, expected_grad, rtol=1e-4, atol=1e-5)
        if previous is not None:
            assert not torch.equal(mask, previous)
        previous = mask
        if step == 0:
            allocated = torch.cuda.memory_allocated()
    assert torch.cuda.memory_allocated() == allocated  # replays allocate nothing new


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; on CPU, test_capturable checks "
                    "a swapped model's step has no host sync and static shapes")
@pytest.mark.parametrize("family", [GPTModel, NanoGPT])
def test_cuda_graph_of_a_whole_swapped_model_training_step(family):
    # PyTorch's whole-network capture recipe (warm up on a side stream, grads set to None, capture
    # forward + backward, replay with new ids copied into the static input) on a swapped model.
    torch.manual_seed(0)
    model = swap_input_embeddings(family().cuda(), check_ids=False).eval()  # eval: no dropout, to compare
    eager = copy.deepcopy(model)
    static_ids = torch.randint(0, 61, (4, 16), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            _loss(model, static_ids).backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _loss(model, static_ids)
        static_loss.backward()
    eager_parameters = dict(eager.named_parameters())
    for step in range(3):
        ids = torch.randint(0, 61, (4, 16), device="cuda")
        static_ids.copy_(ids)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        loss = _loss(eager, ids)
        loss.backward()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, loss, rtol=1e-5, atol=1e-6)
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(parameter.grad, eager_parameters[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", [GPTModelKV])
def test_kv_cache_variant_compiles_without_the_cache(family, monkeypatch):
    # use_cache=False is a plain training forward; decoding with the cache mutates Python state
    # (current_pos) and is left to eager mode.
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton" if "triton" in BACKENDS else "torch")
    torch._dynamo.reset()
    model = swap_input_embeddings(family().to(DEVICE)).eval()
    compiled = torch.compile(model, backend="aot_eager" if DEVICE == "cpu" else "inductor", fullgraph=True)
    ids = torch.randint(0, 61, (2, 10), device=DEVICE)
    torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-4, atol=1e-5)

"""FusedInputEmbedding as a drop-in for two nn.Embedding modules, on both paths."""
import copy
import pickle

import pytest
import torch
from torch import nn

from conftest import TRITON_DEVICE
from helpers import FLOAT_DTYPES, TOLERANCES
from tokemb_fast import FusedInputEmbedding

BACKENDS = ["torch", "triton"]


def pair_of_embeddings(vocab_size, context_length, dim, dtype=torch.float32, device="cpu"):
    return (nn.Embedding(vocab_size, dim, dtype=dtype, device=device),
            nn.Embedding(context_length, dim, dtype=dtype, device=device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_matches_two_embeddings_summed(backend, dtype, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", backend)
    vocab_size, context_length, dim = int(torch.randint(5, 60, ())), 16, int(torch.randint(1, 40, ()))
    batch, seq_len = int(torch.randint(1, 5, ())), int(torch.randint(1, 17, ()))
    tok_emb, pos_emb = pair_of_embeddings(vocab_size, context_length, dim, dtype, TRITON_DEVICE)
    fused = FusedInputEmbedding.from_embeddings(copy.deepcopy(tok_emb), copy.deepcopy(pos_emb))
    ids = torch.randint(0, vocab_size, (batch, seq_len), device=TRITON_DEVICE)
    expected = tok_emb(ids) + pos_emb(torch.arange(seq_len, device=TRITON_DEVICE))
    got = fused(ids)
    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad)
    # nn.Embedding's own backward rounds differently for half types; compare in its precision.
    for ours, theirs in ((fused.tok_emb, tok_emb), (fused.pos_emb, pos_emb)):
        tol = dict(rtol=2e-2, atol=2e-2) if dtype in (torch.float16, torch.bfloat16) else TOLERANCES[dtype]
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)


def test_constructor_and_factory_kwargs():
    module = FusedInputEmbedding(50257, 1024, 768, dtype=torch.bfloat16)
    assert isinstance(module.tok_emb, nn.Embedding) and isinstance(module.pos_emb, nn.Embedding)
    assert module.tok_emb.weight.shape == (50257, 768) and module.pos_emb.weight.shape == (1024, 768)
    assert module.tok_emb.weight.dtype == torch.bfloat16
    assert (module.vocab_size, module.context_length, module.embedding_dim) == (50257, 1024, 768)
    assert list(module.state_dict()) == ["tok_emb.weight", "pos_emb.weight"]
    assert "check_ids=True" in repr(module)


def test_one_dim_ids_give_t_by_d():
    module = FusedInputEmbedding(20, 8, 6).to(TRITON_DEVICE)
    ids = torch.randint(0, 20, (5,), device=TRITON_DEVICE)
    out = module(ids)
    assert out.shape == (5, 6)
    torch.testing.assert_close(out, module.tok_emb(ids) + module.pos_emb.weight[:5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_embeddings_wraps_without_copying(backend, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", backend)
    tok_emb, pos_emb = pair_of_embeddings(30, 10, 8, device=TRITON_DEVICE)
    fused = FusedInputEmbedding.from_embeddings(tok_emb, pos_emb)
    assert fused.tok_emb is tok_emb and fused.pos_emb is pos_emb
    assert fused.tok_emb.weight is tok_emb.weight
    ids = torch.randint(0, 30, (2, 4), device=TRITON_DEVICE)
    fused(ids).sum().backward()
    assert tok_emb.weight.grad is not None and pos_emb.weight.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_weight_parameter_is_honoured(backend, monkeypatch):
    # GPT-2 weight loaders assign a fresh Parameter: the module must read .weight at each call.
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", backend)
    module = FusedInputEmbedding(30, 10, 8).to(TRITON_DEVICE)
    new_weight = torch.nn.Parameter(torch.randn(30, 8, device=TRITON_DEVICE))
    module.tok_emb.weight = new_weight
    ids = torch.randint(0, 30, (2, 4), device=TRITON_DEVICE)
    out = module(ids)
    torch.testing.assert_close(out, new_weight[ids] + module.pos_emb.weight[:4])
    out.sum().backward()
    assert new_weight.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_tied_to_output_head(backend, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", backend)
    module = FusedInputEmbedding(30, 10, 8).to(TRITON_DEVICE)
    head = nn.Linear(8, 30, bias=False).to(TRITON_DEVICE)
    head.weight = module.tok_emb.weight
    ids = torch.randint(0, 30, (2, 4), device=TRITON_DEVICE)
    logits = head(module(ids))
    logits.square().mean().backward()
    tied_grad = module.tok_emb.weight.grad.clone()
    # Same model built from two plain embeddings: gradients of both uses must add up the same.
    reference_tok = nn.Embedding(30, 8).to(TRITON_DEVICE)
    reference_tok.weight = nn.Parameter(module.tok_emb.weight.detach().clone())
    reference_head = nn.Linear(8, 30, bias=False).to(TRITON_DEVICE)
    reference_head.weight = reference_tok.weight
    pos = module.pos_emb.weight.detach()
    reference_head(reference_tok(ids) + pos[:4]).square().mean().backward()
    torch.testing.assert_close(tied_grad, reference_tok.weight.grad, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_with_plain_embeddings():
    module = FusedInputEmbedding(30, 10, 8)
    tok_emb, pos_emb = pair_of_embeddings(30, 10, 8)
    module.load_state_dict({"tok_emb.weight": tok_emb.weight.detach(), "pos_emb.weight": pos_emb.weight.detach()})
    assert torch.equal(module.tok_emb.weight, tok_emb.weight)
    clone = FusedInputEmbedding(30, 10, 8)
    clone.load_state_dict(module.state_dict())
    ids = torch.randint(0, 30, (3, 10))
    assert torch.equal(clone(ids), module(ids))


def test_deepcopy_and_pickle():
    module = FusedInputEmbedding(30, 10, 8, check_ids=False)
    ids = torch.randint(0, 30, (3, 10))
    for other in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert other.check_ids is False
        assert torch.equal(other(ids), module(ids))
        assert other.tok_emb.weight.data_ptr() != module.tok_emb.weight.data_ptr()


def test_past_length_and_position_ids_through_module():
    module = FusedInputEmbedding(30, 10, 8).to(TRITON_DEVICE)
    ids = torch.randint(0, 30, (2, 3), device=TRITON_DEVICE)
    torch.testing.assert_close(module(ids, past_length=7), module.tok_emb(ids) + module.pos_emb.weight[7:10])
    position_ids = torch.tensor([[0, 1, 2], [5, 5, 6]], device=TRITON_DEVICE)
    torch.testing.assert_close(module(ids, position_ids=position_ids),
                               module.tok_emb(ids) + module.pos_emb(position_ids))


def test_from_embeddings_rejects_mismatch():
    with pytest.raises(ValueError, match="tok_emb has embedding_dim 8 but pos_emb has 4"):
        FusedInputEmbedding.from_embeddings(nn.Embedding(5, 8), nn.Embedding(5, 4))
    with pytest.raises(TypeError, match="pos_emb must be an nn.Embedding, got Linear"):
        FusedInputEmbedding.from_embeddings(nn.Embedding(5, 8), nn.Linear(5, 8))


@pytest.mark.parametrize("check_ids", [True, "sync", False])
def test_the_plain_path_runs_on_meta_tensors_as_nn_embedding_does(check_ids):
    # (Shapes only, e.g. for sizing a model before materialising it; the id check once tried to read
    # the ids' values back from the meta device and raised NotImplementedError.)
    from tokemb_fast import fused_encoder_embedding, fused_input_embedding
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    token_weight = torch.empty(13, 6, device="meta", requires_grad=True)
    position_weight = torch.empty(8, 6, device="meta", requires_grad=True)
    out = fused_input_embedding(ids, token_weight, position_weight, check_ids=check_ids, backend="torch")
    assert out.shape == (2, 5, 6) and out.device.type == "meta"
    out.sum().backward()
    assert token_weight.grad.shape == (13, 6) and position_weight.grad.shape == (8, 6)
    encoded = fused_encoder_embedding(ids, token_weight, position_weight, check_ids=check_ids, backend="torch")
    assert encoded.shape == (2, 5, 6) and encoded.device.type == "meta"
    with torch.device("meta"):
        module = FusedInputEmbedding(13, 8, 6, check_ids=check_ids)
    assert module(ids).shape == (2, 5, 6)

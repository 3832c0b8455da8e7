"""nn.Embedding options beyond the property suite: errors that lose nothing, SparseAdam, frozen and
sinusoidal tables, and module hygiene, on both paths."""
import copy
import math
import pickle

import pytest
import torch
from torch import nn

from conftest import TRITON_DEVICE, launches_of
from tokemb_fast import FusedInputEmbedding, SinusoidalPositionEmbedding, fused_input_embedding

DEVICE = TRITON_DEVICE.type


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


@pytest.mark.parametrize("make_bad_call, error, message", [
    (lambda m: m(torch.tensor([[1, 30]])), IndexError, "token id 30 is out of range for vocab size 30"),
    (lambda m: m(torch.tensor([[1, -1]])), IndexError, "token id -1 is out of range"),
    (lambda m: m(torch.tensor([[1, 2]]), position_ids=torch.tensor([0, 8])), IndexError, "position id 8"),
    (lambda m: m(torch.zeros(1, 9, dtype=torch.int64)), IndexError, "context_length is 8"),
    (lambda m: m(torch.tensor([[1.0, 2.0]])), TypeError, "input_ids must be an integer tensor"),
    (lambda m: m(torch.tensor([[1, 2]]), position_ids=torch.tensor([[0.0, 1.0]])), TypeError, "position_ids"),
    (lambda m: m(torch.zeros(1, 2, 2, dtype=torch.int64)), ValueError, r"input_ids must be \[T\] or \[B, T\]"),
])
def test_errors_lose_nothing_even_with_max_norm(backend, make_bad_call, error, message):
    # max_norm renormalises tables in place: a rejected call must be rejected before that.
    module = FusedInputEmbedding(30, 8, 6, max_norm=0.5, position_max_norm=0.5).to(DEVICE)
    before = snapshot(module)
    with pytest.raises(error, match=message):
        make_bad_call(_on_device(module))
    assert_unchanged(module, before)
    out = module(torch.tensor([[1, 2, 3]], device=DEVICE))
    assert out.shape == (1, 3, 6)
    assert module.tok_emb.weight[[1, 2, 3]].norm(dim=1).max() <= 0.5 + 1e-6  # and max_norm still works


class _on_device:
    def __init__(self, module):
        self.module = module

    def __call__(self, ids, **kwargs):
        kwargs = {k: v.to(DEVICE) for k, v in kwargs.items()}
        return self.module(ids.to(DEVICE), **kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(padding_idx=30), ValueError, r"token padding_idx 30 is outside the token table of 30 rows \(valid: -30..29"),
    (dict(padding_idx=-31), ValueError, "token padding_idx -31 is outside"),
    (dict(padding_idx=1.5), TypeError, "token padding_idx must be an int"),
    (dict(max_norm=0.0), ValueError, "token max_norm must be a number > 0"),
    (dict(max_norm=-1.0), ValueError, "token max_norm must be a number > 0"),
    (dict(max_norm=1.0, norm_type=0.0), ValueError, "token norm_type must be a number > 0"),
    (dict(position_padding_idx=8), ValueError, "position padding_idx 8 is outside the position table of 8 rows"),
    (dict(position_max_norm=float("nan")), ValueError, "position max_norm must be a number > 0"),
    (dict(position="rotary"), ValueError, "position must be one of"),
    (dict(position="sinusoidal", position_padding_idx=0), ValueError, "learned position table"),
])
def test_bad_options_are_rejected_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        FusedInputEmbedding(30, 8, 6, **kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(padding_idx=30), ValueError, "token padding_idx 30 is outside"),
    (dict(max_norm=0), ValueError, "token max_norm must be a number > 0"),
    (dict(position_norm_type=-2.0, position_max_norm=1.0), ValueError, "position norm_type must be a number > 0"),
])
def test_bad_options_are_rejected_by_the_functional_op(backend, kwargs, error, message):
    token_weight = torch.randn(30, 6, device=DEVICE)
    position_weight = torch.randn(8, 6, device=DEVICE)
    before = token_weight.clone(), position_weight.clone()
    with pytest.raises(error, match=message):
        fused_input_embedding(torch.tensor([[1, 2]], device=DEVICE), token_weight, position_weight, **kwargs)
    assert torch.equal(token_weight, before[0]) and torch.equal(position_weight, before[1])


def test_sparse_with_scale_grad_by_freq_fails_as_nn_embedding_does(backend):
    module = FusedInputEmbedding(30, 8, 6, sparse=True, scale_grad_by_freq=True).to(DEVICE)
    out = module(torch.tensor([[1, 2, 2]], device=DEVICE))
    with pytest.raises(RuntimeError, match="scale_grad_by_freq not supported with sparse gradients"):
        out.sum().backward()
    reference = nn.Embedding(30, 6, sparse=True, scale_grad_by_freq=True)
    with pytest.raises(RuntimeError, match="scale_grad_by_freq not supported with sparse gradients"):
        reference(torch.tensor([[1, 2, 2]])).sum().backward()


def test_max_norm_changes_the_same_rows_as_nn_embedding(backend):
    tok_ref = nn.Embedding(30, 6, max_norm=1.0, norm_type=3.0).to(DEVICE)
    pos_ref = nn.Embedding(8, 6, max_norm=0.7).to(DEVICE)
    module = FusedInputEmbedding.from_embeddings(copy.deepcopy(tok_ref), copy.deepcopy(pos_ref))
    ids = torch.tensor([[3, 3, 7], [0, 29, 7]], device=DEVICE)
    before = module.tok_emb.weight.detach().clone()
    out = module(ids, past_length=2)
    expected = tok_ref(ids) + pos_ref(torch.arange(2, 5, device=DEVICE))
    assert torch.equal(module.tok_emb.weight, tok_ref.weight) and torch.equal(module.pos_emb.weight, pos_ref.weight)
    touched = torch.zeros(30, dtype=torch.bool)
    touched[[0, 3, 7, 29]] = True
    changed = (module.tok_emb.weight.detach() != before).any(dim=1).cpu()
    assert not changed[~touched].any()  # rows not looked up are left alone
    torch.testing.assert_close(out, expected)


def test_sparse_gradients_train_with_sparse_adam_like_nn_embedding(backend):
    tok_ref = nn.Embedding(30, 6, sparse=True, padding_idx=0).to(DEVICE)
    pos_ref = nn.Embedding(8, 6).to(DEVICE)
    module = FusedInputEmbedding.from_embeddings(copy.deepcopy(tok_ref), copy.deepcopy(pos_ref))
    optimizers = []
    for tok, pos in ((module.tok_emb, module.pos_emb), (tok_ref, pos_ref)):
        optimizers.append((torch.optim.SparseAdam([tok.weight], lr=0.1), torch.optim.Adam([pos.weight], lr=0.1)))
    for step in range(3):
        ids = torch.randint(0, 30, (4, 5), device=DEVICE)
        targets = torch.randn(4, 5, 6, device=DEVICE)
        for (sparse_opt, dense_opt), forward in zip(optimizers, (
                module, lambda i: tok_ref(i) + pos_ref(torch.arange(i.shape[1], device=DEVICE)))):
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss = (forward(ids) - targets).square().mean()
            loss.backward()
            sparse_opt.step()
            dense_opt.step()
        assert module.tok_emb.weight.grad.is_sparse and not module.pos_emb.weight.grad.is_sparse
        torch.testing.assert_close(module.tok_emb.weight, tok_ref.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.pos_emb.weight, pos_ref.weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(module.tok_emb.weight[0], tok_ref.weight[0])


def test_from_pretrained_frozen_does_no_gradient_work(backend, kernel_launches):
    token_weight, position_weight = torch.randn(30, 6, device=DEVICE), torch.randn(8, 6, device=DEVICE)
    module = FusedInputEmbedding.from_pretrained(token_weight, position_weight, freeze=True, padding_idx=2)
    assert not module.tok_emb.weight.requires_grad and module.tok_emb.padding_idx == 2
    assert module.tok_emb.weight.data_ptr() == token_weight.data_ptr()  # like nn.Embedding.from_pretrained
    ids = torch.tensor([[1, 2, 3]], device=DEVICE)
    out = module(ids)
    assert not out.requires_grad
    torch.testing.assert_close(out, token_weight[ids] + position_weight[:3])
    # Frozen positions, trainable tokens: only the token table's gradient is computed.
    trainable = FusedInputEmbedding.from_pretrained(token_weight.clone(), position_weight, freeze=True)
    trainable.tok_emb.weight.requires_grad_(True)
    trainable(ids).sum().backward()
    assert trainable.pos_emb.weight.grad is None and trainable.tok_emb.weight.grad is not None
    if backend == "triton":
        assert launches_of(kernel_launches, "embedding_grad_rows_kernel") == 1  # the token table's only


def test_sinusoidal_positions(backend, kernel_launches):
    module = FusedInputEmbedding(30, 16, 7, position="sinusoidal").to(DEVICE)
    table = module.pos_emb.weight
    assert isinstance(module.pos_emb, SinusoidalPositionEmbedding)
    assert not table.requires_grad and "pos_emb.weight" not in module.state_dict()
    assert [name for name, _ in module.named_parameters()] == ["tok_emb.weight"]
    p, i = 5, 2  # column 2i: sin(p / 10000^(2i/D)); column 2i+1: cos(...)
    angle = p / 10000 ** (2 * i / 7)
    assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert table[p, 6].item() == pytest.approx(math.sin(p / 10000 ** (6 / 7)), abs=1e-6)  # odd D: last is sin
    ids = torch.randint(0, 30, (2, 4), device=DEVICE)
    out = module(ids, past_length=3)
    torch.testing.assert_close(out, module.tok_emb(ids) + table[3:7])
    out.sum().backward()
    if backend == "triton":
        assert launches_of(kernel_launches, "embedding_grad_rows_kernel") == 1  # no position-table gradient work
    half = copy.deepcopy(module).bfloat16()
    assert half.pos_emb.weight.dtype == torch.bfloat16
    assert half(ids).dtype == torch.bfloat16
    module.pos_emb.weight.zero_()
    module.reset_parameters()
    assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_reset_parameters_is_nn_embeddings_init():
    module = FusedInputEmbedding(4000, 50, 16, padding_idx=-1, position_padding_idx=3)
    with torch.no_grad():
        module.tok_emb.weight.fill_(7.0)
    module.reset_parameters()
    weight = module.tok_emb.weight.detach()
    assert torch.count_nonzero(weight[-1]) == 0 and torch.count_nonzero(module.pos_emb.weight[3]) == 0
    assert abs(weight[:-1].mean().item()) < 0.02 and abs(weight[:-1].std().item() - 1.0) < 0.02  # N(0, 1)


def test_options_reach_the_submodules_and_repr():
    module = FusedInputEmbedding(30, 8, 6, padding_idx=-2, max_norm=2.0, norm_type=1.0, scale_grad_by_freq=True,
                                 sparse=True, position_max_norm=3.0, position_scale_grad_by_freq=True)
    tok, pos = module.tok_emb, module.pos_emb
    assert (tok.padding_idx, tok.max_norm, tok.norm_type, tok.scale_grad_by_freq, tok.sparse) == (28, 2.0, 1.0,
                                                                                                  True, True)
    assert (pos.max_norm, pos.scale_grad_by_freq, pos.sparse) == (3.0, True, False)
    text = repr(module)
    assert "vocab_size=30, context_length=8, embedding_dim=6, position=learned" in text
    assert "Embedding(30, 6, padding_idx=28, max_norm=2.0, norm_type=1.0, scale_grad_by_freq=True, sparse=True)" \
        in text
    sparse_positions = FusedInputEmbedding(30, 8, 6, position_sparse=True)
    assert sparse_positions.pos_emb.sparse and not sparse_positions.tok_emb.sparse
    sparse_positions(torch.tensor([[1, 2]])).sum().backward()
    assert sparse_positions.pos_emb.weight.grad.is_sparse and not sparse_positions.tok_emb.weight.grad.is_sparse
    pretrained = FusedInputEmbedding.from_pretrained(torch.randn(30, 6), torch.randn(8, 6), position_sparse=True)
    assert pretrained.pos_emb.sparse
    with pytest.raises(ValueError, match="position options apply to a learned position table"):
        FusedInputEmbedding(30, 8, 6, position="sinusoidal", position_sparse=True)


@pytest.mark.parametrize("convert, dtype", [(lambda m: m.half(), torch.float16), (lambda m: m.bfloat16(), torch.bfloat16),
                                            (lambda m: m.to(torch.float64), torch.float64),
                                            (lambda m: m.float(), torch.float32)])
def test_dtype_conversions_keep_working(backend, convert, dtype):
    module = convert(FusedInputEmbedding(30, 8, 6, padding_idx=0, device=DEVICE))
    assert module.tok_emb.weight.dtype == dtype
    ids = torch.tensor([[0, 5, 9]], device=DEVICE)
    out = module(ids)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert torch.count_nonzero(module.tok_emb.weight.grad[0]) == 0  # padding row


def test_factory_kwargs_and_state_dict_round_trip_with_options():
    module = FusedInputEmbedding(30, 8, 6, padding_idx=1, dtype=torch.float64, device="cpu")
    assert module.tok_emb.weight.dtype == torch.float64
    clone = FusedInputEmbedding(30, 8, 6, padding_idx=1, dtype=torch.float64)
    clone.load_state_dict(module.state_dict())
    ids = torch.randint(0, 30, (2, 8))
    assert torch.equal(clone(ids), module(ids))
    for other in (copy.deepcopy(module), pickle.loads(pickle.dumps(module)),
                  pickle.loads(pickle.dumps(FusedInputEmbedding(30, 8, 6, position="sinusoidal")))):
        assert other(ids).shape == (2, 8, 6)
    assert pickle.loads(pickle.dumps(module)).tok_emb.padding_idx == 1

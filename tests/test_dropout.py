"""Fused embedding dropout: statistics, exact kept values, gradients, reproducibility, no stored mask."""
import math

import pytest
import torch
from torch import nn

from conftest import BACKENDS, TRITON_DEVICE
from helpers import TOLERANCES, assert_exact_within, exact_reference, random_tables
from tokemb_fast import FusedInputEmbedding, fused_input_embedding, triton_ops

DEVICE = TRITON_DEVICE.type
SIGMAS = 5.0  # every statistical bound below fails by chance with probability < 1e-6


def embed(backend, ids, tok, pos, p, **kwargs):
    return fused_input_embedding(ids, tok, pos, dropout_p=p, backend=backend, **kwargs)


def recover_mask(backend, ids, tok, pos, p, seed, **kwargs):
    """The call's keep-mask, as float64: the mask depends only on the seed and the element index,
    so replaying the seed on all-ones tables (kept elements 2/(1-p), never 0) reveals it. Reading
    it off the real output would misread kept sums that happen to be exactly zero (bf16 does that)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        probe = embed(backend, ids, torch.ones_like(tok), torch.ones_like(pos), p, **kwargs)
    return (probe != 0).double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_kept_fraction_mean_and_variance_match_bernoulli(backend, p):
    ids = torch.randint(0, 50, (8, 32), device=DEVICE)
    tok, pos = random_tables(50, 32, 64, torch.float32, DEVICE, requires_grad=False)
    out = embed(backend, ids, tok, pos, p)
    plain = embed(backend, ids, tok, pos, 0.0)
    n = out.numel()
    kept = out != 0
    # Kept fraction ~ Binomial(n, 1-p) / n.
    assert abs(kept.double().mean().item() - (1 - p)) <= SIGMAS * math.sqrt(p * (1 - p) / n)
    # Each element is x * Bernoulli(1-p) / (1-p): mean x, variance x^2 p / (1-p); their sums over
    # independent elements are checked as z-scores.
    x, y = plain.double(), out.double()
    assert abs((y - x).sum().item()) <= SIGMAS * math.sqrt((x.square() * p / (1 - p)).sum().item())
    squared = (y - x).square()
    # (y-x)^2 is x^2 (p/(1-p))^2 w.p. 1-p and x^2 w.p. p: mean x^2 p/(1-p), variance below.
    expected = (x.square() * p / (1 - p)).sum().item()
    fourth = x.pow(4) * ((1 - p) * (p / (1 - p)) ** 4 + p) - (x.square() * p / (1 - p)).square()
    # (At p = 1/2 that variance is 0: (y-x)^2 = x^2 always. Allow fp32 rounding of y on top.)
    rounding = 1e-5 * expected
    assert abs(squared.sum().item() - expected) <= SIGMAS * math.sqrt(fourth.sum().clamp_min(0).item()) + rounding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_kept_elements_are_the_sum_scaled(backend, dtype):
    p = 0.3
    ids = torch.randint(0, 50, (4, 16), device=DEVICE)
    tok, pos = random_tables(50, 16, 24, dtype, DEVICE, requires_grad=False)
    out = embed(backend, ids, tok, pos, p)
    exact, _, _ = exact_reference(ids, tok, pos, torch.zeros(4, 16, 24, device=DEVICE))
    kept = out != 0
    assert 0 < kept.sum() < out.numel()
    assert_exact_within(out[kept], exact[kept] / (1 - p), dtype, "kept elements")
    if dtype == torch.float32 and backend == "triton":
        # Sum in fp32, times fp32(1/(1-p)), one rounding: bit for bit.
        scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
        assert torch.equal(out[kept], ((tok[ids] + pos[:16]) * scale)[kept])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("positions", ["default", "per_row"])
def test_gradients_are_mask_times_grad_over_keep_probability(backend, dtype, positions):
    p = 0.4
    # All-equal ids exercise the long-segment (chunk) path of the backward too.
    ids = torch.full((4, 40), 7, device=DEVICE)
    ids[1] = torch.randint(0, 50, (40,), device=DEVICE)
    kwargs = {}
    if positions == "per_row":
        kwargs["position_ids"] = torch.randint(0, 40, (4, 40), device=DEVICE)
    tok, pos = random_tables(50, 40, 24, dtype, DEVICE)
    torch.manual_seed(99)
    out = embed(backend, ids, tok, pos, p, **kwargs)
    grad_out = torch.randn_like(out)
    grad_tok, grad_pos = torch.autograd.grad(out, (tok, pos), grad_out)
    mask = recover_mask(backend, ids, tok, pos, p, 99, **kwargs)
    masked = grad_out.double() * mask / (1 - p)
    _, exact_tok, exact_pos = exact_reference(ids, tok, pos, masked, kwargs.get("position_ids"))
    tolerance = dict(TOLERANCES[dtype])
    if dtype == torch.bfloat16 and backend == "torch":
        # The fallback is PyTorch's own CPU arithmetic: dropout's backward and nn.Embedding's
        # backward each round to bf16, and the latter accumulates 40 repeated ids in bf16.
        tolerance = dict(rtol=2 ** -4, atol=40 * 2 ** -8 * grad_out.abs().max().item())
    elif dtype == torch.bfloat16:
        # The kernels: grad_out (bf16) * mask * scale summed in fp32, rounded once.
        tolerance = dict(rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(grad_tok.double(), exact_tok, **tolerance)
    torch.testing.assert_close(grad_pos.double(), exact_pos, **tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_mask_and_gradients_new_call_new_mask(backend):
    ids = torch.randint(0, 50, (4, 16), device=DEVICE)
    tok, pos = random_tables(50, 16, 32, torch.float32, DEVICE)
    grad_out = torch.randn(4, 16, 32, device=DEVICE)

    def run():
        out = embed(backend, ids, tok, pos, 0.5)
        return (out,) + torch.autograd.grad(out, (tok, pos), grad_out)

    torch.manual_seed(1234)
    first = run()
    second = run()
    torch.manual_seed(1234)
    again = run()
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0] != 0, second[0] != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_mode_and_zero_p_are_the_plain_op_bit_for_bit(backend, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", backend)
    module = FusedInputEmbedding(50, 16, 32, dropout=0.5).to(DEVICE)
    ids = torch.randint(0, 50, (4, 16), device=DEVICE)
    plain = fused_input_embedding(ids, module.tok_emb.weight, module.pos_emb.weight, backend=backend)
    module.eval()
    assert torch.equal(module(ids), plain)
    module.train()
    assert not torch.equal(module(ids), plain)
    assert torch.equal(embed(backend, ids, module.tok_emb.weight, module.pos_emb.weight, 0.0), plain)
    assert torch.equal(embed(backend, ids, module.tok_emb.weight, module.pos_emb.weight, 0.9, training=False), plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_one_gives_zeros_and_zero_gradients(backend):
    ids = torch.randint(0, 50, (2, 8), device=DEVICE)
    tok, pos = random_tables(50, 8, 16, torch.float32, DEVICE)
    out = embed(backend, ids, tok, pos, 1.0)
    assert torch.count_nonzero(out) == 0
    out.backward(torch.randn_like(out))
    assert torch.count_nonzero(tok.grad) == 0 and torch.count_nonzero(pos.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_p_outside_zero_one_is_rejected(backend, bad):
    ids = torch.randint(0, 50, (2, 8), device=DEVICE)
    tok, pos = random_tables(50, 8, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        embed(backend, ids, tok, pos, bad)
    # The module names its own argument, `dropout`, as nn.Dropout's callers know it.
    with pytest.raises(ValueError, match=r"^dropout must be in"):
        FusedInputEmbedding(50, 8, 16, dropout=bad)


@pytest.mark.skipif("triton" not in BACKENDS, reason="gradcheck through the kernels needs them")
def test_gradcheck_float64_with_a_fixed_seed():
    ids = torch.tensor([[1, 4, 4, 0], [6, 4, 1, 1]], device=DEVICE)
    tok, pos = random_tables(7, 6, 3, torch.float64, DEVICE)

    def fn(token_weight, position_weight):
        torch.manual_seed(0)  # the same mask at every evaluation
        return fused_input_embedding(ids, token_weight, position_weight, dropout_p=0.3, backend="triton")

    assert torch.count_nonzero(fn(tok, pos)) < fn(tok, pos).numel()
    assert torch.autograd.gradcheck(fn, (tok, pos))


@pytest.mark.skipif("triton" not in BACKENDS, reason="checks the kernels' allocations")
def test_no_mask_tensor_is_ever_allocated(monkeypatch):
    batch, seq_len, dim = 4, 16, 24
    ids = torch.randint(0, 50, (batch, seq_len), device=DEVICE)
    tok, pos = random_tables(50, 16, dim, torch.float32, DEVICE)
    allocations = []
    for name in ("empty", "zeros", "ones", "full", "rand", "bernoulli", "empty_like", "zeros_like", "rand_like"):
        original = getattr(torch, name)

        def recording(*args, _original=original, **kwargs):
            tensor = _original(*args, **kwargs)
            allocations.append(tensor.numel())
            return tensor
        monkeypatch.setattr(torch, name, recording)
    out = fused_input_embedding(ids, tok, pos, dropout_p=0.5, backend="triton")
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    grad_out = torch.randn(batch, seq_len, dim, device=DEVICE)
    torch.autograd.grad(out, (tok, pos), grad_out)
    monkeypatch.undo()
    assert allocations.count(batch * seq_len * dim) == 1  # the output; no mask, no masked gradient
    assert sorted(t.numel() for t in saved) == [1, batch * seq_len]  # seed, ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_token_gradient_with_dropout(backend, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", backend)
    module = FusedInputEmbedding(50, 16, 8, sparse=True, dropout=0.5).to(DEVICE)
    ids = torch.randint(0, 50, (3, 16), device=DEVICE)
    torch.manual_seed(5)
    out = module(ids)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert module.tok_emb.weight.grad.is_sparse
    mask = recover_mask(backend, ids, module.tok_emb.weight.detach(), module.pos_emb.weight.detach(), 0.5, 5)
    expected = torch.zeros(50, 8, dtype=torch.float64, device=DEVICE)
    expected.index_add_(0, ids.flatten(), (grad_out.double() * mask * 2).reshape(-1, 8))
    torch.testing.assert_close(module.tok_emb.weight.grad.to_dense().double(), expected,
                               **TOLERANCES[torch.float32])


def test_from_embeddings_folds_the_models_own_dropout_and_follows_train_eval():
    drop = nn.Dropout(0.25)
    module = FusedInputEmbedding.from_embeddings(nn.Embedding(50, 8), nn.Embedding(16, 8), dropout=drop)
    assert module.drop is drop
    parent = nn.Sequential(module)
    ids = torch.randint(0, 50, (2, 16))
    parent.eval()
    plain = module.tok_emb(ids) + module.pos_emb.weight
    assert torch.equal(module(ids), plain)
    parent.train()
    out = module(ids)
    assert (out == 0).any() and not drop.p != 0.25
    with pytest.raises(TypeError, match="dropout must be a probability or an nn.Dropout"):
        FusedInputEmbedding.from_embeddings(nn.Embedding(5, 8), nn.Embedding(5, 8), dropout=nn.ReLU())


@pytest.mark.skipif("triton" not in BACKENDS, reason="compares the kernels' two mask paths")
@pytest.mark.parametrize("dim", [4, 12, 300, 768])
def test_four_columns_per_philox_is_the_same_stream_as_one_per_element(dim, monkeypatch):
    ids = torch.randint(0, 50, (3, 5), device=DEVICE)
    tok, pos = random_tables(50, 5, dim, torch.float32, DEVICE)
    torch.manual_seed(7)
    aligned = embed("triton", ids, tok, pos, 0.5)
    monkeypatch.setattr(triton_ops, "_aligned4", lambda dim, block_d: False)
    torch.manual_seed(7)
    per_element = embed("triton", ids, tok, pos, 0.5)
    assert torch.equal(aligned, per_element)


@pytest.mark.skipif("triton" not in BACKENDS, reason="checks the kernels' tilings")
@pytest.mark.parametrize("dim", [1, 7, 300, 1100, 4096])
def test_forward_and_backward_masks_agree_across_tilings(dim):
    # Forward tiles are up to 1024 columns wide, backward ones up to 256: the mask must be a
    # function of the element alone.
    p = 0.5
    ids = torch.randint(0, 9, (2, 3), device=DEVICE)
    tok, pos = random_tables(9, 3, dim, torch.float32, DEVICE)
    torch.manual_seed(3)
    out = embed("triton", ids, tok, pos, p)
    grad_out = torch.randn_like(out)
    grad_tok, grad_pos = torch.autograd.grad(out, (tok, pos), grad_out)
    mask = recover_mask("triton", ids, tok, pos, p, 3)
    assert torch.equal((out != 0).double() * mask, (out != 0).double())  # nothing kept outside the mask
    _, exact_tok, exact_pos = exact_reference(ids, tok, pos, grad_out.double() * mask / (1 - p))
    assert_exact_within(grad_tok, exact_tok, torch.float32, "token gradient")
    assert_exact_within(grad_pos, exact_pos, torch.float32, "position gradient")

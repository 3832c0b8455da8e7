"""PyTorch's own embedding tests, adapted to this op.

Sources (read, not copied): test/nn/test_embedding.py (the nn.Embedding tests, not EmbeddingBag's),
the Embedding entries of the module tests (common_nn.py; ModuleInfo's module_inputs / module_error_inputs
in common_modules.py) and the nn.functional.embedding OpInfo (sample_inputs_embedding, error_inputs_embedding
and the checks its flags switch on: gradcheck, gradgradcheck, forward AD, fwgrad_bwgrad, batched
gradients, math-bit views) in common_methods_invocations.py.

The op is ``F.embedding(ids, token_weight, **token options) + F.embedding(positions, position_weight,
**position options)``, so every nn.Embedding property becomes a property of the token table, and
where it makes sense of the position table, checked against two real F.embedding / nn.Embedding
calls summed, on both paths (``backend`` fixture: plain PyTorch, and the Triton kernels).

Deliberate, documented differences from nn.Embedding (README, "What differs from nn.Embedding" and
"Errors"; fused_input_embedding's docstring) are asserted as documented, each marked "Difference (n)":
(1) bad arguments raise this library's TypeError / ValueError / IndexError with its own messages;
(2) on the Triton path fp16/bf16 dense gradients are summed in fp32 and rounded once;
(3) scale_grad_by_freq: PyTorch's double backward drops 1/count, the Triton path's is exact;
(4) forward AD gathers the tangent (padding row included, no 1/count), as nn.Embedding does;
(5) with check_ids=True the Triton path raises a bad id at the latest in the call's backward.
Disagreements this port found that are none of these were bugs, since fixed: tests below say which.
"""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from conftest import BACKENDS, TRITON_DEVICE
from helpers import FLOAT_DTYPES, TOLERANCES, assert_exact_within
from tokemb_fast import FusedInputEmbedding, fused_input_embedding

DEVICE = TRITON_DEVICE
ID_DTYPES = [torch.int64, torch.int32]


# --- the oracle and the comparison -----------------------------------------------------------------

def split_options(options):
    """fused_input_embedding's keywords as (token F.embedding kwargs, position F.embedding kwargs)."""
    token = {k: v for k, v in options.items() if not k.startswith("position_")}
    position = {k[len("position_"):]: v for k, v in options.items() if k.startswith("position_")}
    return token, position


def mirrored(options):
    """The same nn.Embedding options for both tables."""
    return {**options, **{"position_" + k: v for k, v in options.items()}}


def looked_up_positions(ids, position_ids=None, past_length=0):
    if position_ids is not None:
        return position_ids
    return torch.arange(past_length, past_length + ids.shape[-1], device=ids.device)


def oracle(ids, token_weight, position_weight, position_ids=None, past_length=0, **options):
    """nn.Embedding's answer: two real F.embedding lookups summed (position rows broadcast over the batch)."""
    token, position = split_options(options)
    return (F.embedding(ids, token_weight, **token)
            + F.embedding(looked_up_positions(ids, position_ids, past_length), position_weight, **position))


def ours(backend, ids, token_weight, position_weight, position_ids=None, past_length=0, **options):
    return fused_input_embedding(ids, token_weight, position_weight, position_ids, past_length, backend=backend,
                                 **options)


def copies(*tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


def float64_sum(grad):
    """A gradient as a dense float64 tensor. A sparse gradient holds the upstream rows as they are (one entry
    per lookup); its entries are summed here in float64, since PyTorch's own to_dense() of an fp16/bf16
    gradient adds duplicate rows in that dtype, rounding at each addition."""
    if grad.is_sparse:
        return torch.sparse_coo_tensor(grad._indices(), grad._values().double(), grad.shape,
                                       check_invariants=True).to_dense()
    return grad.double()


def compare(backend, ids, token_weight, position_weight, position_ids=None, past_length=0, grad_out=None,
            **options):
    """Run this op and the oracle on copies of the same tables with the same upstream gradient; check the
    output, both tables afterwards (max_norm renormalises in place) and both gradients (dense or sparse).

    The plain-PyTorch path runs the same F.embedding calls, so it must agree bit for bit. The Triton path
    sums in fp32 (fp64 for fp64) and rounds once (truncating under the interpreter), and sums fp16/bf16
    gradients in fp32 (difference 2): it is held to helpers.TOLERANCES against the exact float64 answer
    computed from the same table values."""
    tw, pw = copies(token_weight, position_weight)
    rw, rp = copies(token_weight, position_weight)
    out = ours(backend, ids, tw, pw, position_ids, past_length, **options)
    expected = oracle(ids, rw, rp, position_ids, past_length, **options)
    # The same rows renormalised by the same amounts (the same torch.embedding_renorm_), or nothing changed.
    assert torch.equal(tw.detach(), rw.detach()) and torch.equal(pw.detach(), rp.detach())
    exact_options = {k: v for k, v in options.items() if not k.endswith("max_norm")}
    t64, p64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (rw, rp))
    exact = oracle(ids, t64, p64, position_ids, past_length, **exact_options)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert out.requires_grad == expected.requires_grad
    if backend == "torch":
        assert torch.equal(out, expected)
    else:
        assert_exact_within(out.detach(), exact.detach(), out.dtype, "output")
    if not expected.requires_grad:
        return out
    grad_out = torch.randn_like(expected) if grad_out is None else grad_out
    out.backward(grad_out)
    expected.backward(grad_out)
    exact.backward(grad_out.double())
    for name, got, want, want64 in (("token", tw, rw, t64), ("position", pw, rp, p64)):
        if want.grad is None:
            assert got.grad is None, f"{name}: a gradient for a table that needs none"
            continue
        assert got.grad.is_sparse == want.grad.is_sparse, f"{name}: sparse layout differs"
        assert got.grad.shape == want.grad.shape and got.grad.dtype == want.grad.dtype
        if backend == "torch":
            assert torch.equal(got.grad.to_dense(), want.grad.to_dense()), f"{name} gradient"
        elif got.grad.is_sparse:
            torch.testing.assert_close(float64_sum(got.grad), float64_sum(want64.grad), **TOLERANCES[got.grad.dtype],
                                       msg=lambda m: f"{name} gradient: {m}")
        else:
            assert_exact_within(got.grad, want64.grad, got.grad.dtype, f"{name} gradient")
    return out


def tables(vocab_size, num_positions, dim, dtype=torch.float32, requires_grad=True, scale=1.0):
    return (
        (torch.randn(vocab_size, dim, dtype=torch.float64) * scale).to(DEVICE, dtype).requires_grad_(requires_grad),
        (torch.randn(num_positions, dim, dtype=torch.float64) * scale).to(DEVICE, dtype).requires_grad_(requires_grad))


def ids_tensor(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


# --- common_nn / ModuleInfo: the Embedding module entries --------------------------------------------
# common_nn's two Embedding entries (and ModuleInfo's module_inputs_torch_nn_Embedding) run a (4, 3)
# table on [2, 3] ids and on 'discontiguous' ids (one row expanded, stride 0) in float64, checking the
# module's output and parameter gradients: here the module against two nn.Embedding modules.

@pytest.mark.parametrize("layout", ["contiguous", "discontiguous"])
def test_module_inputs_match_two_nn_embeddings(backend, layout):
    ids = (torch.randint(0, 4, (2, 3)) if layout == "contiguous" else torch.randint(0, 4, (1, 24)).expand(5, 24))
    ids = ids.to(DEVICE)
    module = FusedInputEmbedding(4, ids.shape[1], 3, dtype=torch.float64, device=DEVICE)
    tok_ref, pos_ref = copy.deepcopy(module.tok_emb), copy.deepcopy(module.pos_emb)
    out = module(ids)
    expected = tok_ref(ids) + pos_ref(torch.arange(ids.shape[1], device=DEVICE))
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float64])
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(module.tok_emb.weight.grad, tok_ref.weight.grad, **TOLERANCES[torch.float64])
    torch.testing.assert_close(module.pos_emb.weight.grad, pos_ref.weight.grad, **TOLERANCES[torch.float64])


def test_functional_matches_module(backend):
    """test_embedding_functional: the module and the functional form give the same answer, also with a
    padding_idx given to from_pretrained."""
    ids = ids_tensor([[1, 3, 2], [0, 2, 1]])
    token_weight, position_weight = tables(4, 3, 3)
    module = FusedInputEmbedding.from_pretrained(token_weight, position_weight, freeze=False)
    assert torch.equal(module(ids), ours(backend, ids, token_weight, position_weight))
    padded = FusedInputEmbedding.from_pretrained(token_weight, position_weight, padding_idx=2)
    assert torch.equal(padded(ids), ours(backend, ids, token_weight, position_weight, padding_idx=2))
    assert torch.equal(padded(ids), oracle(ids, token_weight, position_weight, padding_idx=2))


# --- the OpInfo: sample_inputs_embedding ----------------------------------------------------------------
# Its samples (M=20 rows, S=5): 1-D and 2-D ids; padding_idx 2 and -1 with that row looked up twice;
# max_norm=1 (and with norm_type=1) on tables scaled by 2; scale_grad_by_freq with one id repeated; sparse.
# Each runs on the token table and, with the same options and an id pattern of its own, on the position
# table (per-row position_ids), in every dtype the OpInfo lists, forward and gradients.

def _sample(name):
    """(ids, position ids, vocab, options, table scale) of one OpInfo sample."""
    ids = torch.randint(0, 5, (2, 2))
    position_ids = torch.randint(0, 5, (2, 2))
    if name == "1-D ids":
        return torch.randint(0, 20, (5,)), torch.randint(0, 20, (5,)), 20, {}, 1.0
    if name == "2-D ids":
        return torch.randint(0, 20, (5, 5)), torch.randint(0, 20, (5, 5)), 20, {}, 1.0
    if name.startswith("padding_idx"):
        row = 2 if name == "padding_idx=2" else 4
        for t in (ids, position_ids):
            t[0, 0] = t[1, 1] = row
        return ids, position_ids, 5, {"padding_idx": 2 if row == 2 else -1}, 1.0
    if name == "max_norm":
        return ids, position_ids, 5, {"max_norm": 1.0}, 2.0
    if name == "max_norm, norm_type=1":
        return ids, position_ids, 5, {"max_norm": 1.0, "norm_type": 1.0}, 2.0
    if name == "scale_grad_by_freq":
        for t in (ids, position_ids):
            t[0, 0] = t[0, 1] = 1
        return ids, position_ids, 5, {"scale_grad_by_freq": True}, 1.0
    assert name == "sparse"
    return ids, position_ids, 5, {"sparse": True}, 1.0


SAMPLES = ["1-D ids", "2-D ids", "padding_idx=2", "padding_idx=-1", "max_norm", "max_norm, norm_type=1",
           "scale_grad_by_freq", "sparse"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("sample", SAMPLES)
def test_opinfo_samples(backend, sample, dtype):
    ids, position_ids, vocab_size, options, scale = _sample(sample)
    token_weight, position_weight = tables(vocab_size, vocab_size, 5, dtype, scale=scale)
    compare(backend, ids.to(DEVICE), token_weight, position_weight, position_ids.to(DEVICE), **mirrored(options))


def test_opinfo_zero_dim_ids_are_rejected(backend):
    """The OpInfo's first sample looks up a 0-D index; F.embedding gives one row. Difference (1): this op
    takes [T] or [B, T] ids (a sequence has a position) and raises its own ValueError."""
    token_weight, position_weight = tables(20, 5, 5)
    idx = torch.tensor(7, device=DEVICE)
    assert F.embedding(idx, token_weight).shape == (5,)
    with pytest.raises(ValueError, match=r"input_ids must be \[T\] or \[B, T\], got shape \(\)"):
        ours(backend, idx, token_weight, position_weight)


def test_opinfo_all_options_sample(backend):
    """The OpInfo's last sample: sparse + scale_grad_by_freq + padding_idx + max_norm. Forward (and the
    renormalised tables) as nn.Embedding; its backward fails exactly as nn.Embedding's does."""
    ids = torch.randint(0, 5, (3, 3))
    ids[0, 0] = ids[0, 1] = 1
    ids[1, 0] = 0
    ids = ids.to(DEVICE)
    options = dict(sparse=True, scale_grad_by_freq=True, padding_idx=0, max_norm=1.0)
    token_weight, position_weight = tables(5, 3, 5, requires_grad=False, scale=2.0)
    compare(backend, ids, token_weight, position_weight, **options)
    token_weight.requires_grad_(True)
    message = "scale_grad_by_freq not supported with sparse gradients"
    with pytest.raises(RuntimeError, match=message):
        oracle(ids, token_weight, position_weight, **options).sum().backward()
    with pytest.raises(RuntimeError, match=message):
        ours(backend, ids, token_weight, position_weight, **options).sum().backward()


@pytest.mark.parametrize("table", ["token", "position"])
@pytest.mark.parametrize("shape", [(), (1, 1, 1)])
def test_opinfo_error_inputs_weight_must_be_2d(backend, table, shape):
    """error_inputs_embedding: 0-D and 3-D weights. Difference (1): F.embedding's RuntimeError
    "'weight' must be 2-D" is this op's ValueError naming the table."""
    ids = torch.rand(2, 2, device=DEVICE).long()
    bad = torch.ones(shape, device=DEVICE)
    with pytest.raises(RuntimeError, match="'weight' must be 2-D"):
        F.embedding(ids, bad)
    token_weight, position_weight = tables(4, 4, 1)
    args = (bad, position_weight) if table == "token" else (token_weight, bad)
    with pytest.raises(ValueError, match=rf"{table}_weight must be 2-D \[num_rows, embedding_dim\]"):
        ours(backend, ids, *args)


# --- gradcheck family: test_embedding_dense_grad and the OpInfo's autograd flags ---------------------------
# test_embedding_dense_grad runs gradcheck and gradgradcheck on a float64 table with repeated ids; the
# OpInfo declares supports_forward_ad and supports_fwgrad_bwgrad, so PyTorch also checks forward AD
# against finite differences and forward-over-reverse. Both tables are differentiated here.

GRAD_IDS = [[0, 1, 1, 2], [3, 5, 1, 4]]


def _float64_tables():
    return tables(6, 4, 2, torch.float64)


@pytest.mark.parametrize("check", ["gradcheck", "gradgradcheck", "forward AD", "forward over reverse"])
def test_gradcheck_float64(backend, check):
    ids = ids_tensor(GRAD_IDS)
    fn = lambda w, p: ours(backend, ids, w, p)  # noqa: E731
    if check == "gradcheck":
        assert torch.autograd.gradcheck(fn, _float64_tables())
    elif check == "gradgradcheck":
        assert torch.autograd.gradgradcheck(fn, _float64_tables())
    elif check == "forward AD":
        assert torch.autograd.gradcheck(fn, _float64_tables(), check_forward_ad=True, check_backward_ad=False)
    else:
        # fast mode (PyTorch's own test wrapper's default): the full second-order Jacobians take ~9 s here
        assert torch.autograd.gradgradcheck(fn, _float64_tables(), check_fwd_over_rev=True, fast_mode=True)


@pytest.mark.parametrize("options", [dict(padding_idx=1), dict(scale_grad_by_freq=True)], ids=["padding_idx",
                                                                                              "scale_grad_by_freq"])
def test_gradcheck_rules_that_differ_from_the_numerical_gradient(backend, options):
    """The OpInfo yields its padding_idx / scale_grad_by_freq samples only without requires_grad: the
    backward rule (no gradient to the padding row, 1/count) is not the derivative of the forward, so
    gradcheck's backward check fails, on F.embedding and on this op alike. Difference (4): forward AD
    gathers the tangent as nn.Embedding's does, so the forward-AD check passes for both."""
    ids = ids_tensor(GRAD_IDS)
    position_weight = _float64_tables()[1].detach()
    for fn in (lambda w: F.embedding(ids, w, **options),
               lambda w: ours(backend, ids, w, position_weight, **options)):
        assert not torch.autograd.gradcheck(fn, (_float64_tables()[0],), raise_exception=False)
        assert torch.autograd.gradcheck(fn, (_float64_tables()[0],), check_forward_ad=True, check_backward_ad=False)


def test_scale_grad_by_freq_double_backward(backend):
    """Difference (3): PyTorch's double backward drops scale_grad_by_freq's 1/count (gradgradcheck fails on
    F.embedding); the plain-PyTorch path is PyTorch's own, the Triton path's is exact."""
    ids = ids_tensor(GRAD_IDS)
    assert not torch.autograd.gradgradcheck(lambda w: F.embedding(ids, w, scale_grad_by_freq=True),
                                            (_float64_tables()[0],), raise_exception=False)
    fn = lambda w, p: ours(backend, ids, w, p, scale_grad_by_freq=True,  # noqa: E731
                           position_scale_grad_by_freq=True)
    assert torch.autograd.gradgradcheck(fn, _float64_tables(), raise_exception=False) == (backend == "triton")


# gradcheck's batched checks (check_batched_grad: on by default in PyTorch's own test wrapper of
# gradcheck and gradgradcheck; check_batched_forward_grad: on for the embedding OpInfo) run the
# backward / jvp under the legacy torch._vmap_internals vmap, whose batched tensors have no storage
# for a kernel: the Triton path takes PyTorch's own ops for them (found by this port; fixed).
@pytest.mark.parametrize("check", ["batched grad", "batched forward grad", "batched gradgrad"])
def test_batched_gradchecks(backend, check):
    """The batched-gradient checks PyTorch's OpInfo gradcheck enables for embedding, float64, fast mode
    (the mode PyTorch's test wrapper defaults to)."""
    ids = ids_tensor(GRAD_IDS)
    kwargs = {"batched grad": dict(check_batched_grad=True),
              "batched forward grad": dict(check_forward_ad=True, check_backward_ad=False,
                                           check_batched_forward_grad=True)}.get(check)
    for fn in (lambda w, p: oracle(ids, w, p), lambda w, p: ours(backend, ids, w, p)):
        if kwargs is None:
            assert torch.autograd.gradgradcheck(fn, _float64_tables(), check_batched_grad=True, fast_mode=True)
        else:
            assert torch.autograd.gradcheck(fn, _float64_tables(), fast_mode=True, **kwargs)


# A table with the negative bit set (torch._neg_view, or z.conj().imag of a complex z) reads
# negated; the kernels read storage, so the Triton path resolves it first (found by this port;
# fixed). PyTorch's TestMathBits.test_neg_view runs the embedding OpInfo on CPU.
@pytest.mark.parametrize("table", ["token", "position"])
def test_math_bits_negative_view_table(backend, table):
    ids = ids_tensor([[0, 1, 2], [3, 4, 0]])
    token_weight, position_weight = tables(5, 3, 3, requires_grad=False)
    if table == "token":
        token_weight = torch._neg_view(token_weight)
    else:
        position_weight = torch._neg_view(position_weight)
    assert token_weight.is_neg() or position_weight.is_neg()
    expected = oracle(ids, token_weight, position_weight)
    torch.testing.assert_close(expected, oracle(ids, token_weight.resolve_neg(), position_weight.resolve_neg()))
    torch.testing.assert_close(ours(backend, ids, token_weight, position_weight), expected)


# --- test_embedding.py: sparse gradients -------------------------------------------------------------------

def test_sparse_basic(backend):
    """test_embedding_sparse_basic: sparse=True gives a sparse gradient of the table's shape (both tables)."""
    token_weight, position_weight = tables(10, 4, 20)
    out = compare(backend, ids_tensor([[0, 2, 4, 5], [4, 3, 0, 9]]), token_weight, position_weight, sparse=True,
                  position_sparse=True)
    assert out.shape == (2, 4, 20)


@pytest.mark.parametrize("vocab_size, dim, ids", [(0, 0, []), (10, 0, [[0, 2, 4, 5], [4, 3, 0, 9]])])
def test_sparse_empty_tensor(backend, vocab_size, dim, ids):
    """test_embedding_sparse_empty_tensor: an empty table / zero-width rows still give a sparse gradient of
    the table's shape."""
    token_weight, position_weight = tables(vocab_size, 4, dim)
    ids = ids_tensor(ids)
    out = ours(backend, ids, token_weight, position_weight, sparse=True, position_sparse=True)
    assert out.shape == tuple(ids.shape) + (dim,)
    out.sum().backward()
    for weight in (token_weight, position_weight):
        assert weight.grad.is_sparse and weight.grad.shape == weight.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_gradients_accumulate_like_nn_embedding(backend, dtype):
    """test_embedding_backward: a sparse gradient lists the looked-up ids and upstream rows; two backward
    calls accumulate by concatenation, also after the ids changed in place between them. (Its float16 case
    is CUDA-only there: on the CPU, adding sparse half gradients has no kernel, for nn.Embedding too.)"""
    token_weight, position_weight = tables(10, 3, 3, dtype)
    ids = ids_tensor([7, 1, 3])
    ones = torch.ones(3, 3, dtype=dtype, device=DEVICE)
    ours(backend, ids, token_weight, position_weight, sparse=True).sum().backward()
    assert token_weight.grad._indices().tolist() == [[7, 1, 3]]
    assert torch.equal(token_weight.grad._values(), ones)
    ours(backend, ids, token_weight, position_weight, sparse=True).sum().backward()
    assert token_weight.grad._indices().tolist() == [[7, 1, 3, 7, 1, 3]]
    assert torch.equal(token_weight.grad._values(), torch.cat([ones, ones]))
    token_weight.grad = None
    ours(backend, ids, token_weight, position_weight, sparse=True).sum().backward()
    ids[0] = 8
    ours(backend, ids, token_weight, position_weight, sparse=True).sum().backward()
    assert token_weight.grad._indices().tolist() == [[7, 1, 3, 8, 1, 3]]
    assert torch.equal(token_weight.grad._values(), torch.cat([ones, ones]))
    assert not position_weight.grad.is_sparse and torch.equal(position_weight.grad, 4 * ones)


# --- test_embedding.py: max_norm ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_max_norm(backend, dtype):
    """test_embedding_max_norm / test_embedding_max_norm_device: a row looked up twice gives the same
    output twice, and every looked-up row has norm <= max_norm afterwards (both tables), as nn.Embedding's."""
    token_weight, position_weight = tables(22, 3, 5, dtype, scale=2.0)
    start = copies(token_weight, position_weight)
    ids = ids_tensor([2, 8, 8, 6])
    position_ids = ids_tensor([0, 1, 1, 2])
    out = ours(backend, ids, token_weight, position_weight, position_ids, max_norm=1.0, position_max_norm=1.0)
    assert torch.equal(out[1], out[2])
    for weight, rows in ((token_weight, ids), (position_weight, position_ids)):
        assert (weight.detach()[rows].double().norm(dim=1) <= 1.0 + 1e-2).all()
    compare(backend, ids, *start, position_ids, max_norm=1.0, position_max_norm=1.0)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 0.5, float("inf")])
def test_max_norm_renormalises_looked_up_rows_in_place_then_backward(backend, norm_type):
    """max_norm in nn.Embedding: the looked-up rows, and only those, are renormalised in place, before the
    lookup; the gradient is then taken as for a plain lookup (the OpInfo's note: that is why gradcheck does
    not apply). Same rows changed by the same amounts (bitwise), on both tables."""
    token_weight, position_weight = tables(12, 6, 4, scale=2.0)
    ids = ids_tensor([[3, 3, 7], [0, 11, 7]])
    start_token, start_position = token_weight.detach().clone(), position_weight.detach().clone()
    pointer = token_weight.data_ptr()
    out = ours(backend, ids, token_weight, position_weight, past_length=2, max_norm=1.0, norm_type=norm_type,
               position_max_norm=0.7, position_norm_type=norm_type)
    assert token_weight.data_ptr() == pointer  # in place, not a new tensor
    for weight, start, rows in ((token_weight, start_token, ids.flatten()),
                                (position_weight, start_position, torch.arange(2, 5))):
        looked_up = torch.zeros(weight.shape[0], dtype=torch.bool)
        looked_up[rows.cpu()] = True
        changed = (weight.detach() != start).any(dim=1).cpu()
        assert changed.any() and not changed[~looked_up].any()
    compare(backend, ids, start_token.requires_grad_(), start_position.requires_grad_(), past_length=2,
            max_norm=1.0, norm_type=norm_type, position_max_norm=0.7, position_norm_type=norm_type)
    assert out.shape == (2, 3, 4)


def test_max_norm_unsorted_repeating_indices(backend):
    """test_embedding_max_norm_unsorted_repeating_indices (CUDA against CPU there): ids 0, 1, 0, 1, ...
    renormalise each row once, as nn.Embedding does."""
    reference = nn.Embedding(20, 16, max_norm=1.0).to(DEVICE)
    module = FusedInputEmbedding.from_embeddings(copy.deepcopy(reference), nn.Embedding(1, 16).to(DEVICE))
    ids = torch.arange(2, device=DEVICE).repeat(200)
    out = module(ids, position_ids=torch.zeros_like(ids))
    expected = reference(ids) + module.pos_emb(torch.zeros_like(ids))
    assert torch.equal(module.tok_emb.weight, reference.weight)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


def test_max_norm_backward(backend):
    """test_embedding_max_norm_backward: after the renorm, row r's gradient is its count (ones upstream)."""
    token_weight = (torch.randn(4, 4, device=DEVICE) * 2).requires_grad_()
    position_weight = torch.randn(4, 4, device=DEVICE, requires_grad=True)
    ours(backend, ids_tensor([0, 1, 2, 2]), token_weight, position_weight, max_norm=1.0).sum().backward()
    expected = torch.tensor([[1.0, 1.0, 2.0, 0.0]], device=DEVICE).t().expand(4, 4)
    assert torch.equal(token_weight.grad, expected)
    assert torch.equal(position_weight.grad, torch.ones(4, 4, device=DEVICE))


def test_max_norm_forward_ad(backend):
    """test_embedding_max_norm_fwd_AD: the tangent of a lookup with max_norm is the gathered tangent (ones);
    the renorm touches the primal only."""
    token_weight = torch.randn(4, 4, device=DEVICE) * 2
    position_weight = torch.randn(2, 4, device=DEVICE)
    with fwAD.dual_level():
        dual = fwAD.make_dual(token_weight, torch.ones(4, 4, device=DEVICE))
        out = ours(backend, ids_tensor([[0, 1], [2, 2]]), dual, position_weight, max_norm=1.0)
        tangent = fwAD.unpack_dual(out).tangent
    assert torch.equal(tangent, torch.ones(2, 2, 4, device=DEVICE))
    assert (token_weight[:3].norm(dim=1) <= 1.0 + 1e-6).all()


# --- test_embedding.py: from_pretrained ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32,
                                   torch.float64])
def test_from_pretrained(backend, dtype):
    """test_embedding_from_pretrained: the module holds the given tables and looks them up. Difference (1):
    nn.Embedding also looks up integer tables; this op takes floating-point tables only (README: fp32, fp16,
    bf16, fp64) and raises its TypeError at the call."""
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).to(DEVICE, dtype)
    positions = torch.tensor([[0.5, 0.25, 0.0], [1.0, 0.0, 2.0]]).to(DEVICE, dtype)
    module = FusedInputEmbedding.from_pretrained(a, positions)
    assert torch.equal(module.tok_emb.weight.data, a) and torch.equal(module.pos_emb.weight.data, positions)
    ids = ids_tensor([0, 1])
    expected = (nn.Embedding.from_pretrained(a)(ids)
                + nn.Embedding.from_pretrained(positions)(torch.arange(2, device=DEVICE)))
    if dtype.is_floating_point:
        assert torch.equal(module(ids), expected)
    else:
        with pytest.raises(TypeError, match=f"token_weight must be a floating-point tensor, got {dtype}"):
            module(ids)


def test_from_pretrained_padding_idx(backend):
    """test_embedding_from_pretrained_padding_idx: the padding row keeps its pretrained value (not zeroed),
    is what the lookup returns, and gets no gradient (both tables)."""
    token_weight, position_weight = tables(4, 3, 3, requires_grad=False)
    with torch.no_grad():
        token_weight[2] = 7.0
        position_weight[1] = -3.0
    module = FusedInputEmbedding.from_pretrained(token_weight, position_weight, freeze=False, padding_idx=2,
                                                 position_padding_idx=1)
    assert torch.equal(module.tok_emb.weight[2], torch.full((3,), 7.0, device=DEVICE))
    out = module(ids_tensor([[2, 0, 2]]))
    assert torch.equal(out[0, 0], torch.full((3,), 7.0, device=DEVICE) + position_weight[0])
    assert torch.equal(out[0, 1], token_weight[0] + torch.full((3,), -3.0, device=DEVICE))
    out.sum().backward()
    assert torch.count_nonzero(module.tok_emb.weight.grad[2]) == 0
    assert torch.count_nonzero(module.pos_emb.weight.grad[1]) == 0


def test_from_pretrained_options(backend):
    """test_embedding_from_pretrained_options: max_norm=2, norm_type=0.5, sparse, float64; the output is the
    (shared, renormalised in place) table, and its rows' norms are <= max_norm."""
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64, device=DEVICE)
    positions = torch.zeros(2, 3, dtype=torch.float64, device=DEVICE)
    module = FusedInputEmbedding.from_pretrained(a, positions, max_norm=2.0, norm_type=0.5, sparse=True)
    reference = nn.Embedding.from_pretrained(a.clone(), max_norm=2.0, norm_type=0.5, sparse=True)
    out = module(ids_tensor([0, 1]))
    assert torch.equal(out, a) and torch.equal(a, reference(ids_tensor([0, 1])))
    assert a.ne(torch.arange(1, 7, dtype=a.dtype, device=DEVICE).view(2, 3)).all()
    assert (out.norm(p=0.5, dim=1) <= 2.0 + 1e-12).all()
    assert module.tok_emb.sparse and module.tok_emb.max_norm == 2.0 and module.tok_emb.norm_type == 0.5


# --- test_embedding.py: padding_idx ----------------------------------------------------------------------------

@pytest.mark.parametrize("padding_idx, ids, padded", [
    (0, [[0, 2, 4, 5], [4, 3, 0, 9]], [(0, 0), (1, 2)]),
    (-2, [[0, 2, 8, 5], [4, 8, 0, 9]], [(0, 2), (1, 1)]),  # -2 of 10 rows: row 8
])
@pytest.mark.parametrize("sparse", [False, True])
def test_padding_idx_output(backend, padding_idx, ids, padded, sparse):
    """test_embedding_padding_idx: nn.Embedding zeroes the padding row at construction, so the token part of
    a padded position is zero: the output there is the position row alone (dense and sparse)."""
    module = FusedInputEmbedding(10, 4, 20, padding_idx=padding_idx, sparse=sparse, device=DEVICE)
    out = module(ids_tensor(ids))
    for b, t in padded:
        assert torch.equal(out[b, t], module.pos_emb.weight[t])
    assert module.tok_emb.padding_idx == padding_idx % 10


def test_padding_idx_changed_padding_vector(backend):
    """test_embedding_padding_idx ('change padding vector'): a padding row set by hand is what the lookup
    returns."""
    module = FusedInputEmbedding(10, 2, 20, padding_idx=2, sparse=True, device=DEVICE)
    with torch.no_grad():
        module.tok_emb.weight[2] = 1.0
    out = module(ids_tensor([0, 2]))
    assert torch.equal(out[1], torch.ones(20, device=DEVICE) + module.pos_emb.weight[1])


@pytest.mark.parametrize("padding_idx", [25, -25])
def test_padding_idx_out_of_bounds(padding_idx):
    """test_embedding_padding_idx (out of bounds). Difference (1): nn.Embedding's AssertionError is this
    library's ValueError naming the table, for the module and the functional op."""
    with pytest.raises(AssertionError):
        nn.Embedding(10, 20, padding_idx=padding_idx)
    message = rf"token padding_idx {padding_idx} is outside the token table of 10 rows"
    with pytest.raises(ValueError, match=message):
        FusedInputEmbedding(10, 4, 20, padding_idx=padding_idx)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=message):
            ours(backend, ids_tensor([0]), *tables(10, 4, 20), padding_idx=padding_idx)


@pytest.mark.parametrize("repeats", [1, 2, 40])  # 40 > 32: a long segment, summed in chunks on the Triton path
@pytest.mark.parametrize("other_ids", [[], [1, 3], [2]])
def test_padding_idx_gets_no_gradient_nor_double_backward_gradient(backend, repeats, other_ids):
    """test_embedding_padding_idx: weight + grad at the padding row equals the row before, for many repeats
    of the padding id, after a backward and after a double backward (create_graph; the gradient's own
    gradient flows back into the table too). Token and position tables."""
    module = FusedInputEmbedding(5, 48, 2, padding_idx=0, position_padding_idx=1, device=DEVICE)
    ids = ids_tensor(other_ids + [0] * repeats)
    position_ids = torch.ones_like(ids)
    position_ids[0] = 0
    before = module.tok_emb.weight[0].clone(), module.pos_emb.weight[1].clone()
    module(ids, position_ids=position_ids).sum().backward()
    assert torch.equal((module.tok_emb.weight + module.tok_emb.weight.grad)[0], before[0])
    assert torch.equal((module.pos_emb.weight + module.pos_emb.weight.grad)[1], before[1])
    module.zero_grad()
    out = module(ids, position_ids=position_ids)
    grads = torch.autograd.grad((out * out).sum(), list(module.parameters()), create_graph=True)
    (sum(g.pow(2).sum() for g in grads) + out.sum()).backward()
    assert torch.count_nonzero(module.tok_emb.weight.grad[0]) == 0
    assert torch.count_nonzero(module.pos_emb.weight.grad[1]) == 0


# --- dtypes, id dtypes, shapes, strides --------------------------------------------------------------------
# The OpInfo's dtypes (float32, float64, float16, bfloat16) with int64 and int32 ids (nn.Embedding takes
# both), 1-D and 2-D ids, empty ids, and non-contiguous ids and tables (ModuleInfo's 'discontiguous' ids,
# test_embedding_bag_non_contiguous_weight's sliced table, TestCommon's noncontiguous samples).

@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(6,), (3, 6)])
def test_dtypes_and_id_dtypes(backend, dtype, id_dtype, shape):
    """Forward and both gradients; on the Triton path fp16/bf16 gradients are summed in fp32 and rounded
    once (difference 2), so they are held to one rounding of the exact sum, not to nn.Embedding's bits."""
    token_weight, position_weight = tables(5, 6, 7, dtype)
    ids = torch.randint(0, 5, shape).to(DEVICE, id_dtype)
    compare(backend, ids, token_weight, position_weight)


@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 3)])
@pytest.mark.parametrize("options", [{}, dict(sparse=True), dict(scale_grad_by_freq=True), dict(max_norm=1.0)],
                         ids=["plain", "sparse", "scale_grad_by_freq", "max_norm"])
def test_empty_ids(backend, shape, options):
    """Empty index tensors (the OpInfo / ModuleInfo shapes with a zero dim): an empty output and all-zero
    gradients, whatever the options."""
    token_weight, position_weight = tables(5, 4, 3)
    ids = torch.zeros(shape, dtype=torch.int64, device=DEVICE)
    out = compare(backend, ids, token_weight, position_weight, **mirrored(options))
    assert out.shape == shape + (3,)


LAYOUTS = {
    # name: (ids, token table storage shape, the table as a view of its storage)
    "expanded ids": (lambda: torch.randint(0, 4, (1, 5)).expand(3, 5), (4, 3), lambda s: s),
    "transposed ids": (lambda: torch.randint(0, 4, (5, 3)).t(), (4, 3), lambda s: s),
    "sliced table": (lambda: torch.randint(0, 4, (3, 5)), (4, 5), lambda s: s[:, :3]),
    "row-strided table": (lambda: torch.randint(0, 4, (3, 5)), (12, 3), lambda s: s[::3]),
    "transposed table": (lambda: torch.randint(0, 4, (3, 5)), (3, 4), lambda s: s.t()),
    "expanded table": (lambda: torch.randint(0, 4, (3, 5)), (1, 3), lambda s: s.expand(4, 3)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_contiguous_ids_and_tables(backend, layout):
    """Forward and gradients (into the tables' storage) with strided ids and table views, the position
    table a row-strided view too; and the same answer as with contiguous copies."""
    make_ids, storage_shape, view = LAYOUTS[layout]
    ids = make_ids().to(DEVICE)
    token_storage = torch.randn(storage_shape, device=DEVICE, requires_grad=True)
    position_storage = torch.randn(10, 3, device=DEVICE, requires_grad=True)
    ref_token_storage, ref_position_storage = copies(token_storage, position_storage)
    token_weight, position_weight = view(token_storage), position_storage[::2]
    assert not (ids.is_contiguous() and token_weight.is_contiguous())
    out = ours(backend, ids, token_weight, position_weight)
    expected = oracle(ids, view(ref_token_storage), ref_position_storage[::2])
    grad_out = torch.randn_like(expected)
    out.backward(grad_out)
    expected.backward(grad_out)
    tolerance = dict(rtol=0, atol=0) if backend == "torch" else TOLERANCES[torch.float32]
    torch.testing.assert_close(out, expected, **tolerance)
    torch.testing.assert_close(token_storage.grad, ref_token_storage.grad, **tolerance)
    torch.testing.assert_close(position_storage.grad, ref_position_storage.grad, **tolerance)
    with torch.no_grad():
        contiguous = ours(backend, ids.contiguous(), token_weight.contiguous(), position_weight.contiguous())
    assert torch.equal(out.detach(), contiguous)


# --- scale_grad_by_freq ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("position_ids", [None, [0, 0, 2, 0], [[0, 1, 1, 3], [2, 2, 2, 2]]],
                         ids=["default positions", "shared positions", "per-row positions"])
@pytest.mark.parametrize("padding_idx", [None, 1])
def test_scale_grad_by_freq(backend, position_ids, padding_idx):
    """The OpInfo's scale_grad_by_freq sample, widened: each row's gradient divided by its count in the
    looked-up tensor (for positions shared by the batch, the [T] positions, as pos_emb(arange(T)) counts
    them), with a padding row too."""
    token_weight, position_weight = tables(6, 4, 3)
    ids = ids_tensor([[1, 1, 3, 1], [0, 1, 3, 5]])
    position_ids = None if position_ids is None else ids_tensor(position_ids)
    compare(backend, ids, token_weight, position_weight, position_ids, padding_idx=padding_idx,
            scale_grad_by_freq=True, position_padding_idx=padding_idx, position_scale_grad_by_freq=True)


# --- torch.func: the OpInfo's "functorch" variant -----------------------------------------------------------------

TRANSFORMS = ["vmap over ids", "vmap over tables", "grad", "jacrev", "jvp", "vmap(grad): per-sample gradients"]


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_torch_func_transforms(backend, transform):
    """functorch's embedding OpInfo (padding_idx, scale_grad_by_freq samples included): each torch.func
    transform of this op equals the same transform of the two F.embedding calls summed."""
    from torch.func import grad, jacrev, jvp, vmap
    ids = ids_tensor([[1, 4, 4, 0], [2, 4, 1, 1]])
    token_weight, position_weight = (t.detach() for t in tables(5, 4, 3, torch.float64))
    options = dict(padding_idx=4, scale_grad_by_freq=True, position_padding_idx=2)
    position_tables = torch.randn(3, 4, 3, dtype=torch.float64, device=DEVICE)
    tangents = (torch.randn_like(token_weight), torch.randn_like(position_weight))
    results = []
    for fn in (lambda i, w, p: ours(backend, i, w, p, **options), lambda i, w, p: oracle(i, w, p, **options)):
        if transform == "vmap over ids":
            results.append(vmap(lambda row: fn(row, token_weight, position_weight))(ids))
        elif transform == "vmap over tables":
            results.append(vmap(lambda p: fn(ids, token_weight, p))(position_tables))
        elif transform == "grad":
            results.append(grad(lambda w, p: fn(ids, w, p).pow(2).sum(), argnums=(0, 1))(token_weight,
                                                                                     position_weight))
        elif transform == "jacrev":
            results.append(jacrev(lambda w, p: fn(ids, w, p), argnums=(0, 1))(token_weight, position_weight))
        elif transform == "jvp":
            results.append(jvp(lambda w, p: fn(ids, w, p), (token_weight, position_weight), tangents))
        else:
            per_sample = vmap(grad(lambda w, row: fn(row, w, position_weight).pow(2).sum()), in_dims=(None, 0))
            results.append(per_sample(token_weight, ids))
    torch.testing.assert_close(results[0], results[1], **TOLERANCES[torch.float64])


# --- deterministic backward ------------------------------------------------------------------------------------

def test_deterministic_backward(backend):
    """Under torch.use_deterministic_algorithms(True) (PyTorch's alert_nondeterministic tests) the backward
    runs without an alert and repeated backward passes give bit-identical gradients, equal to nn.Embedding's
    (to the path's tolerance), with heavily repeated ids."""
    token_weight, position_weight = tables(5, 64, 3)
    ids = torch.randint(0, 5, (4, 64), device=DEVICE)
    grad_out = torch.randn(4, 64, 3, device=DEVICE)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            tw, pw = copies(token_weight, position_weight)
            ours(backend, ids, tw, pw, scale_grad_by_freq=True).backward(grad_out)
            runs.append((tw.grad, pw.grad))
        compare(backend, ids, token_weight, position_weight, grad_out=grad_out, scale_grad_by_freq=True)
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# --- errors: ModuleInfo's module_error_inputs_torch_nn_Embedding ---------------------------------------------------

@pytest.mark.parametrize("check_ids", [True, "sync"])
def test_out_of_range_id(backend, check_ids):
    """An id past the table: nn.Embedding raises IndexError ('index out of range in self') in the forward.
    Difference (1): this op's IndexError names the id and the vocab size. Difference (5): with check_ids=True
    the Triton path raises it at the latest in the call's backward; check_ids='sync' raises in the forward."""
    ids = ids_tensor([0, 5, 15])
    with pytest.raises(IndexError, match="index out of range in self"):
        nn.Embedding(10, 3)(ids)
    token_weight, position_weight = tables(10, 3, 3)
    message = r"token id 15 is out of range for vocab size 10 \(valid ids are 0\.\.9\)"
    forward_raises = backend == "torch" or check_ids == "sync"
    with pytest.raises(IndexError, match=message):
        out = ours(backend, ids, token_weight, position_weight, check_ids=check_ids)
        assert not forward_raises, "the forward should have raised"
        out.sum().backward()
    assert token_weight.grad is None
    with torch.no_grad():  # an inference call: raised by the next call on the device at the latest
        with pytest.raises(IndexError, match=message):
            ours(backend, ids, token_weight, position_weight, check_ids=check_ids)
            ours(backend, ids_tensor([0, 1, 2]), token_weight, position_weight, check_ids=check_ids)


def test_float_ids_are_rejected(backend):
    """Float indices: nn.Embedding's RuntimeError (expected Long or Int). Difference (1): this op's TypeError."""
    ids = torch.tensor([1.5, 2.5], device=DEVICE)
    with pytest.raises(RuntimeError, match=r"Expected tensor for argument.*indices.*Long.*Int"):
        nn.Embedding(10, 3)(ids)
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor \(torch.int64 or torch.int32\)"):
        ours(backend, ids, *tables(10, 3, 3))


def test_negative_num_embeddings_fails_at_construction_as_nn_embedding():
    """Negative num_embeddings: the same RuntimeError as nn.Embedding (the module builds nn.Embeddings)."""
    message = "Trying to create tensor with negative dimension"
    with pytest.raises(RuntimeError, match=message):
        nn.Embedding(-1, 3)
    with pytest.raises(RuntimeError, match=message):
        FusedInputEmbedding(-1, 4, 3)
    with pytest.raises(RuntimeError, match=message):
        FusedInputEmbedding(4, -1, 3)


# --- module hygiene: test_move_sparse_half_embedding and ModuleInfo's generic checks --------------------------------

def test_module_moves_dtype_and_keeps_options(backend):
    """test_move_sparse_half_embedding: .to(float16) of a sparse module changes the dtype only; the module
    still runs and gives a half sparse gradient. Also .double(), repr and state_dict as nn.Embedding's."""
    module = FusedInputEmbedding(10, 4, 3, sparse=True, padding_idx=1)
    assert module.tok_emb.weight.dtype == torch.get_default_dtype()
    module.to(torch.float16)
    assert module.tok_emb.weight.dtype == module.pos_emb.weight.dtype == torch.float16
    assert (module.vocab_size, module.context_length, module.embedding_dim) == (10, 4, 3)
    module.to(DEVICE)
    out = module(ids_tensor([[1, 2, 9]]))
    out.float().sum().backward()
    assert out.dtype == torch.float16
    assert module.tok_emb.weight.grad.is_sparse and module.tok_emb.weight.grad.dtype == torch.float16
    assert module.double().tok_emb.weight.dtype == torch.float64
    assert "Embedding(10, 3, padding_idx=1, sparse=True)" in repr(module)
    assert "vocab_size=10, context_length=4, embedding_dim=3" in repr(module)
    tok, pos = nn.Embedding(10, 3, padding_idx=1, dtype=torch.float64), nn.Embedding(4, 3, dtype=torch.float64)
    tok.load_state_dict({"weight": module.state_dict()["tok_emb.weight"]})
    pos.load_state_dict({"weight": module.state_dict()["pos_emb.weight"]})
    assert sorted(module.state_dict()) == ["pos_emb.weight", "tok_emb.weight"]
    ids = ids_tensor([[3, 1, 0]])
    torch.testing.assert_close(module(ids), tok(ids) + pos(torch.arange(3, device=DEVICE)),
                               **TOLERANCES[torch.float64])

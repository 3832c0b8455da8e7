"""Every nn.Embedding option means the same here, on both paths, with nn.Embedding as the oracle.

Property-based: hypothesis draws table sizes, dims, batch shape, dtypes, options, position mode
and id distribution; each example is checked against two nn.Embedding modules summed (outputs
and gradients against their float64 versions, renormalised tables bit for bit).
"""
import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import BACKENDS, TRITON_DEVICE
from helpers import TOLERANCES, assert_exact_within
from tokemb_fast import FusedInputEmbedding

DEVICE = TRITON_DEVICE.type
ID_KINDS = ["uniform", "all_equal", "distinct", "zipf", "edges", "padding"]


@st.composite
def table_options(draw, num_rows, allow_sparse):
    sparse = draw(st.booleans()) if allow_sparse else False
    return dict(
        padding_idx=draw(st.one_of(st.none(), st.integers(-num_rows, num_rows - 1))),
        max_norm=draw(st.one_of(st.none(), st.floats(0.05, 3.0))),
        norm_type=draw(st.sampled_from([1.0, 2.0, 3.5])),
        # nn.Embedding rejects scale_grad_by_freq with sparse (in backward): tested on its own.
        scale_grad_by_freq=False if sparse else draw(st.booleans()),
        sparse=sparse,
    )


@st.composite
def cases(draw):
    vocab_size = draw(st.integers(1, 40))
    context_length = draw(st.integers(1, 12))
    case = dict(
        vocab_size=vocab_size, context_length=context_length,
        dim=draw(st.integers(1, 19)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])),
        id_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        batch=draw(st.one_of(st.none(), st.integers(0, 4))),  # None: 1-D ids [T]
        seq_len=draw(st.integers(0, context_length)),
        position_mode=draw(st.sampled_from(["default", "past_length", "shared", "per_row"])),
        id_kind=draw(st.sampled_from(ID_KINDS)),
        token=draw(table_options(vocab_size, allow_sparse=True)),
        position=draw(table_options(context_length, allow_sparse=True)),
        freeze_token=draw(st.booleans()), freeze_position=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if case["position_mode"] == "per_row" and case["batch"] is None:
        case["position_mode"] = "shared"
    if case["position_mode"] == "past_length":
        case["past_length"] = draw(st.integers(0, context_length - case["seq_len"]))
    return case


def make_ids(case, generator):
    shape = (case["seq_len"],) if case["batch"] is None else (case["batch"], case["seq_len"])
    n, vocab_size = int(torch.tensor(shape).prod()), case["vocab_size"]
    kind = case["id_kind"]
    if kind == "all_equal":
        ids = torch.full((n,), int(torch.randint(0, vocab_size, (), generator=generator)))
    elif kind == "distinct" and n <= vocab_size:
        ids = torch.randperm(vocab_size, generator=generator)[:n]
    elif kind == "zipf":
        weights = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
        ids = torch.multinomial(weights, n, replacement=True, generator=generator) if n else torch.zeros(0)
    elif kind == "edges":
        ids = torch.tensor([0, vocab_size - 1])[torch.randint(0, 2, (n,), generator=generator)]
    elif kind == "padding" and case["token"]["padding_idx"] is not None:
        ids = torch.full((n,), case["token"]["padding_idx"] % vocab_size)
        ids[: n // 3] = torch.randint(0, vocab_size, (n // 3,), generator=generator)
    else:
        ids = torch.randint(0, vocab_size, (n,), generator=generator)
    return ids.reshape(shape).to(device=DEVICE, dtype=case["id_dtype"])


def position_arguments(case, ids, generator):
    mode, seq_len, context_length = case["position_mode"], case["seq_len"], case["context_length"]
    if mode == "default":
        return {}, torch.arange(seq_len, device=DEVICE)
    if mode == "past_length":
        past = case["past_length"]
        return {"past_length": past}, torch.arange(past, past + seq_len, device=DEVICE)
    shape = (seq_len,) if mode == "shared" else tuple(ids.shape)
    position_ids = torch.randint(0, context_length, shape, generator=generator).to(DEVICE)
    if case["position"]["padding_idx"] is not None and position_ids.numel():
        position_ids.view(-1)[0] = case["position"]["padding_idx"] % context_length
    return {"position_ids": position_ids}, position_ids


def oracle_embedding(weight, options, freeze):
    return nn.Embedding.from_pretrained(weight.clone(), freeze=freeze, **options)


def check_case(case, backend, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", backend)
    generator = torch.Generator().manual_seed(case["seed"])
    dtype, dim = case["dtype"], case["dim"]
    token_weight = torch.randn(case["vocab_size"], dim, generator=generator).to(DEVICE, dtype)
    position_weight = torch.randn(case["context_length"], dim, generator=generator).to(DEVICE, dtype)
    tok_o = oracle_embedding(token_weight, case["token"], case["freeze_token"])
    position_options = dict(case["position"])
    pos_o = oracle_embedding(position_weight, position_options, case["freeze_position"])
    ours = FusedInputEmbedding.from_embeddings(copy.deepcopy(tok_o), copy.deepcopy(pos_o))

    ids = make_ids(case, generator)
    kwargs, looked_up_positions = position_arguments(case, ids, generator)
    # nn.Embedding itself fails on CUDA ("invalid argument") for max_norm or scale_grad_by_freq
    # with an empty index tensor, where both have nothing to do: the oracle drops them there,
    # while ours keeps them (tokemb_fast must not fail).
    for oracle, looked_up in ((tok_o, ids), (pos_o, looked_up_positions)):
        if looked_up.numel() == 0:
            oracle.max_norm, oracle.scale_grad_by_freq = None, False
    expected = tok_o(ids) + pos_o(looked_up_positions)
    got = ours(ids, **kwargs)

    # max_norm renormalises the same rows by the same amounts (the same function, same dtype).
    assert torch.equal(ours.tok_emb.weight, tok_o.weight)
    assert torch.equal(ours.pos_emb.weight, pos_o.weight)
    assert got.shape == expected.shape and got.dtype == dtype
    exact = (nn.functional.embedding(ids, tok_o.weight.double())
             + nn.functional.embedding(looked_up_positions, pos_o.weight.double()))
    assert_exact_within(got, exact, dtype, "output")
    if backend == "torch":  # the fallback is nn.Embedding's own arithmetic: bit for bit
        assert torch.equal(got, expected)

    if not got.requires_grad:
        assert case["freeze_token"] and case["freeze_position"]
        return
    grad_out = torch.randn(got.shape, generator=generator).to(DEVICE, dtype)
    got.backward(grad_out)
    expected.backward(grad_out)
    # Gradients of a lookup do not depend on the table values: float64 twins give exact ones.
    for name, mine, theirs, frozen, options, looked_up in (
            ("token", ours.tok_emb, tok_o, case["freeze_token"], case["token"], ids),
            ("position", ours.pos_emb, pos_o, case["freeze_position"], position_options, looked_up_positions)):
        if frozen:
            assert mine.weight.grad is None, f"frozen {name} table got a gradient"
            continue
        assert mine.weight.grad.is_sparse == options["sparse"] == theirs.weight.grad.is_sparse
        # Nothing to scale in an empty lookup, where PyTorch's CUDA backward fails ("invalid argument").
        scale_grad_by_freq = options["scale_grad_by_freq"] and looked_up.numel() > 0
        twin = nn.Embedding.from_pretrained(theirs.weight.detach().double(), freeze=False,
                                            padding_idx=options["padding_idx"], scale_grad_by_freq=scale_grad_by_freq)
        exact_out = (twin(looked_up) if name == "position" else twin(ids))
        exact_grad_out = grad_out.double()
        if name == "position" and looked_up.dim() == 1 and grad_out.dim() == 3:
            exact_grad_out = exact_grad_out.sum(0)
        exact_out.backward(exact_grad_out)
        mine_dense = mine.weight.grad.coalesce().to_dense() if options["sparse"] else mine.weight.grad
        theirs_dense = theirs.weight.grad.coalesce().to_dense() if options["sparse"] else theirs.weight.grad
        if backend == "torch":
            assert torch.equal(mine_dense, theirs_dense), f"{name} gradient differs from nn.Embedding's"
        elif options["sparse"]:
            # Built by nn.Embedding's own sparse backward; positions shared by the batch are summed
            # over it first, as autograd does for the broadcast (possibly in another order).
            torch.testing.assert_close(mine_dense, theirs_dense, **TOLERANCES[dtype])
        else:
            # The kernels sum in fp32 and round once: within one rounding of the exact result.
            assert_exact_within(mine_dense, twin.weight.grad, dtype, f"{name} gradient")


SUITE_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                            HealthCheck.too_slow])
# bench/gpu_check.sh asks for fewer: on a GPU each new dim/dtype/option mix compiles its kernels,
# and device time is scarce.
EXAMPLES = int(os.environ.get("TOKEMB_FAST_HYPOTHESIS_EXAMPLES", "200"))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=EXAMPLES, **SUITE_SETTINGS)
@given(case=cases())
def test_matches_two_nn_embeddings(backend, case, monkeypatch):
    check_case(case, backend, monkeypatch)

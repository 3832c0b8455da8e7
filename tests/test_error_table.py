"""Every row of the README's error table, on both paths: each bad input it names raises the exception
it promises, with a message naming the problem, and leaves the tables as they were. The README's
rows are read from the README itself, so a row added there without a case here fails."""
import os

import pytest
import torch

from conftest import TRITON_DEVICE
from tokemb_fast import fused_encoder_embedding, fused_input_embedding

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_rows():
    text = open(README, encoding="utf-8").read()
    table = text.split("| bad input | exception |")[1].split("\n\n")[0]
    rows = {}
    for line in table.strip().splitlines()[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1]
    return rows


def tables(vocab_size=10, num_positions=6, dim=4, dtype=torch.float32, device=None):
    device = TRITON_DEVICE if device is None else device
    return (torch.randn(vocab_size, dim, dtype=dtype, device=device, requires_grad=True),
            torch.randn(num_positions, dim, dtype=dtype, device=device, requires_grad=True))


def ids(*values):
    return torch.tensor([list(values)], device=TRITON_DEVICE)


def call(ids_, token_weight=None, position_weight=None, **kwargs):
    defaults = tables()
    out = fused_input_embedding(ids_, defaults[0] if token_weight is None else token_weight,
                                defaults[1] if position_weight is None else position_weight, **kwargs)
    out.float().sum().backward()  # a deferred id check raises by the end of the backward


def encoder_call(ids_, token_type_weight="default", **kwargs):
    token_weight, position_weight = tables()
    types = torch.randn(2, 4, device=TRITON_DEVICE, requires_grad=True) if token_type_weight == "default" \
        else token_type_weight
    out = fused_encoder_embedding(ids_, token_weight, position_weight, types, **kwargs)
    out.float().sum().backward()


ZERO = torch.zeros(1, 3, dtype=torch.int64, device=TRITON_DEVICE)
CASES = {
    "ids not int64/int32; a table not a floating-point tensor; ids or a table not dense (sparse, nested); "
    "past_length, padding_idx or dropout_p of the wrong type": [
        (lambda: call(ZERO.to_sparse()), TypeError, r"input_ids must be a dense \(strided\) tensor"),
        (lambda: call(ZERO, tables()[0].detach().to_sparse()), TypeError,
         r"token_weight must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
        (lambda: call(ZERO.float()), TypeError, "input_ids must be an integer tensor"),
        (lambda: call(ZERO.to(torch.uint8)), TypeError, "input_ids must be an integer tensor"),
        (lambda: call(ZERO, torch.zeros(10, 4, dtype=torch.int64, device=TRITON_DEVICE)), TypeError,
         "token_weight must be a floating-point tensor"),
        (lambda: call(ZERO, [[0.0] * 4] * 10), TypeError, "token_weight must be a torch.Tensor"),
        (lambda: call(ZERO, past_length=1.0), TypeError, "past_length must be an int"),
        (lambda: call(ZERO, padding_idx=1.5), TypeError, "token padding_idx must be an int"),
        (lambda: call(ZERO, dropout_p="0.1"), TypeError, "dropout_p must be a number"),
    ],
    "an id `< 0` or `>= vocab_size`; a token table with no rows": [
        (lambda: call(ids(1, 10)), IndexError, r"token id 10 is out of range for vocab size 10"),
        (lambda: call(ids(-3, 1)), IndexError, r"token id -3 is out of range for vocab size 10"),
        (lambda: call(ids(1, 2), torch.empty(0, 4, device=TRITON_DEVICE)), IndexError,
         r"the token table has no rows \(vocab size 0\)"),
    ],
    "`past_length + T > context_length`, or a position id outside the table": [
        (lambda: call(torch.zeros(1, 7, dtype=torch.int64, device=TRITON_DEVICE)), IndexError,
         r"context_length is 6, so past_length \+ T must be <= 6"),
        (lambda: call(ZERO, past_length=4), IndexError, r"context_length is 6"),
        (lambda: call(ZERO, position_ids=ids(0, 6, 1)), IndexError, "position id 6 is out of range for a position "
                                                                    "table of 6 rows"),
    ],
    "tables of different dtypes, devices or embedding dims; ids on another device; a table not 2-D; "
    "`past_length < 0`": [
        (lambda: call(ZERO, None, tables(dtype=torch.float64)[1]), ValueError,
         "token_weight is torch.float32 but position_weight is torch.float64"),
        (lambda: call(ZERO, None, tables(dim=5)[1]), ValueError, "embedding_dim 4 but position_weight has 5"),
        (lambda: call(ZERO, None, torch.empty(6, 4, device="meta")), ValueError, "position_weight is on meta"),
        (lambda: call(ZERO.to("meta")), ValueError, "input_ids is on meta but the embedding tables are on"),
        (lambda: call(ZERO, torch.randn(10, device=TRITON_DEVICE)), ValueError, r"token_weight must be 2-D"),
        (lambda: call(ZERO, past_length=-1), ValueError, "past_length must be >= 0, got -1"),
    ],
    "a device the chosen path cannot run on (e.g. `meta` with `backend=\"triton\"`); an unknown backend": [
        (lambda: fused_input_embedding(ZERO.to("meta"), *tables(device="meta"), backend="triton"), ValueError,
         "backend 'triton' runs on CUDA tensors .*not on meta tensors"),
        (lambda: call(ZERO, backend="cuda"), ValueError, "backend must be one of"),
    ],
    "`padding_idx` outside the table, `max_norm <= 0`, `norm_type <= 0`, `dropout_p` outside [0, 1], a "
    "non-finite `token_scale`, `check_ids` not True/False/\"sync\"": [
        (lambda: call(ZERO, padding_idx=10), ValueError, "token padding_idx 10 is outside the token table of 10"),
        (lambda: call(ZERO, position_padding_idx=-7), ValueError, "position padding_idx -7 is outside"),
        (lambda: call(ZERO, max_norm=0.0), ValueError, "token max_norm must be a number > 0"),
        (lambda: call(ZERO, norm_type=-1.0), ValueError, "token norm_type must be a number > 0"),
        (lambda: call(ZERO, dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
        (lambda: call(ZERO, token_scale=float("inf")), ValueError, "token_scale must be a finite number"),
        (lambda: call(ZERO, token_scale=torch.tensor(2.0)), ValueError, r"a Python int or float\), got tensor"),
        (lambda: call(ZERO, check_ids="yes"), ValueError, "check_ids must be True"),
    ],
    "ids with more than 2 dims (or 0); position_ids of the wrong shape; both position_ids and past_length": [
        (lambda: call(ZERO[None]), ValueError, r"input_ids must be \[T\] or \[B, T\]"),
        (lambda: call(ZERO[0, 0]), ValueError, r"input_ids must be \[T\] or \[B, T\]"),
        (lambda: call(ZERO, position_ids=torch.zeros(4, dtype=torch.int64, device=TRITON_DEVICE)), ValueError,
         "position_ids must have shape"),
        (lambda: call(ZERO, position_ids=ids(0, 1, 2), past_length=1), ValueError,
         "either position_ids or past_length, not both"),
    ],
    "the encoder op: `layer_norm` not a bool; `pad_position_id` not an int; a token-type table or LayerNorm "
    "weight that is not a tensor": [
        (lambda: encoder_call(ZERO, layer_norm=1), TypeError, "layer_norm must be True or False"),
        (lambda: encoder_call(ZERO, pad_position_id=1.0), TypeError, "pad_position_id must be an int"),
        (lambda: encoder_call(ZERO, token_type_weight=[[0.0] * 4] * 2), TypeError,
         "token_type_weight must be a torch.Tensor"),
        (lambda: encoder_call(ZERO, layer_norm_weight=[1.0] * 4), TypeError, "layer_norm_weight must be a torch.Tensor"),
    ],
    "the encoder op: a token type id outside the token-type table": [
        (lambda: encoder_call(ZERO, token_type_ids=ids(0, 2, 1)), IndexError,
         r"token type id 2 is out of range for a token-type table of 2 rows"),
        (lambda: encoder_call(ZERO, token_type_ids=ids(-1, 0, 1)), IndexError, r"token type id -1 is out of range"),
    ],
    "the encoder op: `token_type_ids` or `token_type_padding_idx` without a token-type table, or ids of the wrong "
    "shape; a token-type table of another dtype, device or D; a LayerNorm weight or bias not a floating-point `[D]` "
    "tensor on the tables' device, of another dtype than the tables' (fp32 with fp16/bf16 tables excepted, as "
    "PyTorch's layer_norm allows), or given with `layer_norm=False`; `layer_norm_eps` negative or not finite; "
    "`pad_position_id` negative": [
        (lambda: encoder_call(ZERO, None, token_type_padding_idx=0), ValueError,
         "token_type_padding_idx was given but there is no token_type_weight"),
        (lambda: encoder_call(ZERO, layer_norm_weight=torch.ones(4, dtype=torch.float64, device=TRITON_DEVICE)),
         ValueError, "layer_norm_weight is torch.float64 but the tables are torch.float32"),
        (lambda: encoder_call(ZERO, pad_position_id=-1), ValueError, "pad_position_id must be the pad token id"),
        (lambda: encoder_call(ZERO, None, token_type_ids=ZERO), ValueError,
         "token_type_ids were given but there is no token_type_weight"),
        (lambda: encoder_call(ZERO, token_type_ids=torch.zeros(5, dtype=torch.int64, device=TRITON_DEVICE)),
         ValueError, "token_type_ids must have shape"),
        (lambda: encoder_call(ZERO, torch.randn(2, 4, dtype=torch.float64, device=TRITON_DEVICE)), ValueError,
         "token_type_weight is torch.float64 .* the tables must match"),
        (lambda: encoder_call(ZERO, torch.randn(2, 5, device=TRITON_DEVICE)), ValueError,
         r"token_type_weight must be \[type_vocab_size, 4\]"),
        (lambda: encoder_call(ZERO, layer_norm_bias=torch.zeros(5, device=TRITON_DEVICE)), ValueError,
         r"layer_norm_bias must be a floating-point \[4\] tensor"),
        (lambda: encoder_call(ZERO, layer_norm=False, layer_norm_weight=torch.ones(4, device=TRITON_DEVICE)),
         ValueError, "layer_norm_weight was given with layer_norm=False"),
        (lambda: encoder_call(ZERO, layer_norm_eps=-1e-5), ValueError, "layer_norm_eps must be a finite number >= 0"),
    ],
}


def test_every_readme_row_has_cases():
    rows = readme_rows()
    assert set(rows) - {"`backend=\"triton\"` without Triton, or on CPU tensors without `TRITON_INTERPRET=1`"} == \
        set(CASES), "the README's error table and this file's cases differ"
    for row, cases in CASES.items():
        promised = rows[row]
        for _, error, _ in cases:
            assert f"`{error.__name__}`" in promised, (row, error)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("row", list(CASES))
def test_each_row_raises_what_it_promises(backend, row, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", backend)
    for make_call, error, message in CASES[row]:
        with pytest.raises(error, match=message):
            make_call()


def test_triton_without_the_interpreter_says_how_to_fix(monkeypatch):
    # The last row: an environment problem, RuntimeError (the Triton import itself is tested in
    # test_backend_choice.py).
    rows = readme_rows()
    assert rows["`backend=\"triton\"` without Triton, or on CPU tensors without `TRITON_INTERPRET=1`"] == \
        "`RuntimeError` saying how to fix it"
    from tokemb_fast import triton_ops
    monkeypatch.setattr(triton_ops, "INTERPRETED", False)
    from tokemb_fast import functional
    monkeypatch.setattr(functional, "_prepared", {})  # checks cached by an earlier call with the interpreter on
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 in the environment before importing tokemb_fast"):
        fused_input_embedding(ZERO.cpu(), *tables(device="cpu"), backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_rejected_call_changes_nothing(backend, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", backend)
    token_weight, position_weight = tables()
    before = token_weight.detach().clone(), position_weight.detach().clone()
    for bad in ({"position_ids": ids(0, 9, 1)}, {"padding_idx": 11}):
        with pytest.raises((IndexError, ValueError)):
            call(ids(1, 2, 3), token_weight, position_weight, max_norm=0.1, **bad)
    assert torch.equal(token_weight.detach(), before[0]) and torch.equal(position_weight.detach(), before[1])
    assert token_weight.grad is None and position_weight.grad is None

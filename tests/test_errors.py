"""Bad input gets a clear Python exception naming the problem, on both paths."""
import pytest
import torch

from conftest import TRITON_DEVICE
from tokemb_fast import FusedInputEmbedding, fused_input_embedding

BACKENDS = ["torch", "triton"]


def tables(vocab_size=10, num_positions=6, dim=4, dtype=torch.float32, device=None):
    device = TRITON_DEVICE if device is None else device
    return (torch.randn(vocab_size, dim, dtype=dtype, device=device, requires_grad=True),
            torch.randn(num_positions, dim, dtype=dtype, device=device, requires_grad=True))


def call(backend, ids, token_weight, position_weight, **kwargs):
    return fused_input_embedding(ids, token_weight, position_weight, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8, torch.int16, torch.bool])
def test_non_integer_or_unsupported_ids_raise_type_error(backend, dtype):
    ids = torch.zeros(2, 3, device=TRITON_DEVICE).to(dtype)
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor \(torch.int64 or torch.int32\)"):
        call(backend, ids, *tables())


def call_and_backward(backend, ids, token_weight, position_weight, **kwargs):
    """A training step's use of the op: a bad id raises by the end of the backward at the latest
    (check_ids=True on the Triton path: found by the kernel, raised in the backward)."""
    out = call(backend, ids, token_weight, position_weight, **kwargs)
    out.float().sum().backward()


CHECK_MODES = [True, "sync"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("check_ids", CHECK_MODES)
@pytest.mark.parametrize("bad_id", [10, 11, 2**40, -1, -7])
def test_ids_out_of_range_raise_index_error_naming_id_and_vocab(backend, check_ids, bad_id):
    ids = torch.tensor([[1, 2, bad_id, 3]], device=TRITON_DEVICE)
    token_weight, position_weight = tables()
    before = token_weight.detach().clone()
    with pytest.raises(IndexError, match=rf"token id {bad_id} is out of range for vocab size 10 "
                                         r"\(valid ids are 0\.\.9\)"):
        call_and_backward(backend, ids, token_weight, position_weight, check_ids=check_ids)
    assert torch.equal(token_weight.detach(), before)
    assert token_weight.grad is None, "a gradient was returned for a call with a bad id"
    # Nothing is broken afterwards.
    ok = call(backend, ids.clamp(0, 9), token_weight, position_weight, check_ids=check_ids)
    assert torch.isfinite(ok).all()
    ok.sum().backward()
    assert torch.isfinite(token_weight.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("check_ids", CHECK_MODES)
def test_int32_ids_out_of_range(backend, check_ids):
    ids = torch.tensor([3, 2**31 - 1], dtype=torch.int32, device=TRITON_DEVICE)
    with pytest.raises(IndexError, match=r"token id 2147483647 is out of range for vocab size 10"):
        call_and_backward(backend, ids, *tables(), check_ids=check_ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq_len, past_length", [(7, 0), (6, 1), (1, 6), (3, 100)])
def test_positions_past_the_table_raise_index_error(backend, seq_len, past_length):
    ids = torch.zeros(2, seq_len, dtype=torch.int64, device=TRITON_DEVICE)
    with pytest.raises(IndexError, match=r"context_length is 6, so past_length \+ T must be <= 6"):
        call(backend, ids, *tables(), past_length=past_length)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("check_ids", CHECK_MODES)
@pytest.mark.parametrize("bad_position", [6, -1, 1000])
def test_position_ids_out_of_range_raise_index_error(backend, check_ids, bad_position):
    ids = torch.zeros(2, 3, dtype=torch.int64, device=TRITON_DEVICE)
    position_ids = torch.tensor([[0, 1, 2], [0, bad_position, 1]], device=TRITON_DEVICE)
    with pytest.raises(IndexError, match=rf"position id {bad_position} is out of range for a position table "
                                         r"of 6 rows \(context_length 6, valid positions are 0\.\.5\)"):
        call_and_backward(backend, ids, *tables(), position_ids=position_ids, check_ids=check_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_position_ids_arguments(backend):
    ids = torch.zeros(2, 3, dtype=torch.int64, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match=r"position_ids must have shape \[3\] or \[1, 3\] or \[2, 3\]"):
        call(backend, ids, *tables(), position_ids=torch.zeros(4, dtype=torch.int64, device=TRITON_DEVICE))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        call(backend, ids, *tables(), position_ids=torch.zeros(2, 3, 1, dtype=torch.int64, device=TRITON_DEVICE))
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        call(backend, ids, *tables(), position_ids=torch.zeros(3, device=TRITON_DEVICE))
    with pytest.raises(ValueError, match="either position_ids or past_length, not both"):
        call(backend, ids, *tables(), position_ids=torch.zeros(3, dtype=torch.int64, device=TRITON_DEVICE),
             past_length=1)
    with pytest.raises(ValueError, match="past_length must be >= 0, got -1"):
        call(backend, ids, *tables(), past_length=-1)
    with pytest.raises(TypeError, match="past_length must be an int, got float"):
        call(backend, ids, *tables(), past_length=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_tables_raise_value_error(backend):
    ids = torch.zeros(2, 3, dtype=torch.int64, device=TRITON_DEVICE)
    token_weight, position_weight = tables()
    with pytest.raises(ValueError, match="token_weight is torch.float32 but position_weight is torch.float64"):
        call(backend, ids, token_weight, position_weight.double())
    with pytest.raises(ValueError, match="token_weight has embedding_dim 4 but position_weight has 5"):
        call(backend, ids, token_weight, torch.randn(6, 5, device=TRITON_DEVICE))
    with pytest.raises(ValueError, match=r"token_weight is on .* but position_weight is on meta"):
        call(backend, ids, token_weight, torch.empty(6, 4, device="meta"))
    with pytest.raises(ValueError, match="input_ids is on meta but the embedding tables are on"):
        call(backend, ids.to("meta"), token_weight, position_weight)
    with pytest.raises(ValueError, match=r"token_weight must be 2-D \[num_rows, embedding_dim\]"):
        call(backend, ids, token_weight[0], position_weight)
    with pytest.raises(TypeError, match="position_weight must be a floating-point tensor"):
        call(backend, ids, token_weight, torch.zeros(6, 4, dtype=torch.int64, device=TRITON_DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 1, 1, 1), ()])
def test_ids_with_wrong_rank_raise_value_error(backend, shape):
    ids = torch.zeros(shape, dtype=torch.int64, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match=r"input_ids must be \[T\] or \[B, T\]"):
        call(backend, ids, *tables())


def test_unknown_backend_is_rejected(monkeypatch):
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_input_embedding(ids, *tables(device="cpu"), backend="cuda")
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="got 'fast'"):
        fused_input_embedding(ids, *tables(device="cpu"))


def test_module_survives_errors():
    module = FusedInputEmbedding(10, 6, 4).to(TRITON_DEVICE)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    for bad in (torch.tensor([[10]]), torch.tensor([[0.5]]), torch.zeros(1, 7, dtype=torch.int64)):
        with pytest.raises((IndexError, TypeError)):
            module(bad.to(TRITON_DEVICE))
    out = module(torch.tensor([[1, 2]], device=TRITON_DEVICE))
    assert out.shape == (1, 2, 4)
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key])

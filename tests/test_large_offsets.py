"""64-bit offsets: tables and outputs with more than 2^31 elements."""
import pytest
import torch

from conftest import TRITON_DEVICE
from tokemb_fast import fused_input_embedding


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_table_rows_past_2_to_the_31_elements(id_dtype):
    # V * D = 2^31 + 10 elements, so the last rows sit past a 32-bit element offset (and past
    # 4 GiB in bytes). torch.empty does not touch the pages: only the rows written here cost memory.
    dim = 2
    vocab_size = 2**30 + 5
    token_weight = torch.empty(vocab_size, dim, dtype=torch.float16, device=TRITON_DEVICE)
    token_weight[-3:] = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float16)
    token_weight[:2] = 0.5
    position_weight = torch.ones(4, dim, dtype=torch.float16, device=TRITON_DEVICE)
    ids = torch.tensor([[vocab_size - 1, vocab_size - 3, 1, vocab_size - 2]], dtype=id_dtype, device=TRITON_DEVICE)
    out = fused_input_embedding(ids, token_weight, position_weight, backend="triton")
    expected = torch.tensor([[[6.0, 7.0], [2.0, 3.0], [1.5, 1.5], [4.0, 5.0]]], dtype=torch.float16)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and ~17 GB for 4 GiB tensors; the "
                    "CPU test above covers 64-bit table offsets, output offsets use the same int64 arithmetic")
def test_output_and_gradient_past_2_to_the_31_elements():
    # B*T*D = 2^31 + 2^20 elements of output (4 GiB in fp16) and a gradient table of the same size.
    batch, seq_len, dim = 2**16 + 32, 8, 4096
    vocab_size = batch * seq_len
    token_weight = torch.randn(vocab_size, dim, dtype=torch.float16, device="cuda", requires_grad=True)
    position_weight = torch.randn(seq_len, dim, dtype=torch.float16, device="cuda", requires_grad=True)
    ids = torch.randperm(vocab_size, device="cuda").reshape(batch, seq_len)
    out = fused_input_embedding(ids, token_weight, position_weight)
    last = ids[-1, -1]
    torch.testing.assert_close(out[-1, -1], token_weight[last] + position_weight[-1])
    del out
    grad = torch.ones(batch, seq_len, dim, dtype=torch.float16, device="cuda")
    out = fused_input_embedding(ids, token_weight, position_weight)
    (grad_tok,) = torch.autograd.grad(out, (token_weight,), grad)
    # Every id appears once: every row of the gradient is ones, the last rows included.
    assert torch.equal(grad_tok[-5:], torch.ones(5, dim, dtype=torch.float16, device="cuda"))
    assert int((grad_tok != 1).sum()) == 0

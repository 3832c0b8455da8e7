"""What the backward allocates, and that deterministic mode gets it (there is no other variant)."""
import torch

from conftest import TRITON_DEVICE
from helpers import id_distribution, random_tables
from tokemb_fast import fused_input_embedding, triton_ops


def record_allocations(fn):
    sizes = []
    original = torch.empty

    def empty(*args, **kwargs):
        tensor = original(*args, **kwargs)
        sizes.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    torch.empty = empty
    try:
        fn()
    finally:
        torch.empty = original
    return sizes


def test_backward_allocates_gradients_plus_small_index_buffers_only():
    # bf16 tables: the gradient must be written in bf16 directly, with no fp32 V x D scratch.
    vocab_size, num_positions, dim, batch, seq_len = 300, 64, 48, 4, 64
    token_weight, position_weight = random_tables(vocab_size, num_positions, dim, torch.bfloat16, TRITON_DEVICE)
    ids = id_distribution("zipf", (batch, seq_len), vocab_size, device=TRITON_DEVICE)
    out = fused_input_embedding(ids, token_weight, position_weight, backend="triton")
    grad_out = torch.randn_like(out)
    allocations = record_allocations(lambda: torch.autograd.grad(out, (token_weight, position_weight), grad_out))
    n_entries = batch * seq_len
    table_sized = [a for a in allocations if len(a[0]) == 2 and a[0][0] in (vocab_size, num_positions)]
    assert table_sized == [((vocab_size, dim), torch.bfloat16), ((num_positions, dim), torch.bfloat16)]
    for shape, dtype in allocations:
        if (shape, dtype) in table_sized:
            continue
        elements = 1
        for s in shape:
            elements *= s
        # Index buffers are O(B*T) or O(rows); partial sums are (B*T / CHUNK) x D in fp32.
        assert elements <= max(vocab_size + 1, n_entries) or \
            shape == (n_entries // triton_ops.GRAD_CHUNK, dim), (shape, dtype)


def test_deterministic_algorithms_mode_runs_the_same_backward():
    ids = id_distribution("all_equal", (2, 50), 30, device=TRITON_DEVICE)
    token_weight, position_weight = random_tables(30, 50, 8, torch.float32, TRITON_DEVICE)
    grad_out = torch.randn(2, 50, 8, device=TRITON_DEVICE)

    def grads():
        out = fused_input_embedding(ids, token_weight, position_weight, backend="triton")
        return torch.autograd.grad(out, (token_weight, position_weight), grad_out)

    default = grads()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        strict = grads()
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(default, strict):
        assert torch.equal(a, b)

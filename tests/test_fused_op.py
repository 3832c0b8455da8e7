"""The Triton path (real kernels: compiled on CUDA, interpreted on CPU) against a float64 oracle."""
import pytest
import torch

from conftest import TRITON_DEVICE, requires_cuda
from helpers import (FLOAT_DTYPES, assert_exact_within, exact_reference, id_distribution, poisoned_allocations,
                     random_tables)
from tokemb_fast import FusedInputEmbeddingFunction, LookupOptions, fused_input_embedding, triton_ops


def run_fused(input_ids, token_weight, position_weight, grad_out, **kwargs):
    out = fused_input_embedding(input_ids, token_weight, position_weight, backend="triton", **kwargs)
    grads = torch.autograd.grad(out, (token_weight, position_weight), grad_out)
    return out, grads


def check_against_oracle(input_ids, dtype, vocab_size, num_positions, dim, position_ids=None, past_length=0,
                         **options):
    token_weight, position_weight = random_tables(vocab_size, num_positions, dim, dtype, TRITON_DEVICE)
    batch_shape = tuple(input_ids.shape)
    grad_out = torch.randn(*batch_shape, dim, device=TRITON_DEVICE).to(dtype)
    with poisoned_allocations():
        out, (grad_tok, grad_pos) = run_fused(input_ids, token_weight, position_weight, grad_out,
                                              position_ids=position_ids, past_length=past_length, **options)
    exact_out, exact_tok, exact_pos = exact_reference(input_ids, token_weight, position_weight, grad_out,
                                                      position_ids, past_length, **options)
    assert out.shape == (*batch_shape, dim)
    assert_exact_within(out, exact_out, dtype, "output")
    assert_exact_within(grad_tok, exact_tok, dtype, "token-table gradient")
    assert_exact_within(grad_pos, exact_pos, dtype, "position-table gradient")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("batch_shape", [(1, 1), (1,), (2, 5), (3, 37), (70,)])
def test_dtypes_and_shapes(dtype, id_dtype, batch_shape):
    vocab_size, num_positions, dim = 29, 80, 100
    ids = torch.randint(0, vocab_size, batch_shape, dtype=id_dtype, device=TRITON_DEVICE)
    check_against_oracle(ids, dtype, vocab_size, num_positions, dim)


@pytest.mark.parametrize("dim", [1, 3, 17, 100, 256, 300, 1100])
def test_odd_embedding_dims(dim):
    ids = torch.randint(0, 11, (2, 9), device=TRITON_DEVICE)
    check_against_oracle(ids, torch.float32, 11, 12, dim)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autotuned_forward(dtype):
    # Calls of at least AUTOTUNE_MIN_ELEMENTS outputs take the autotuned kernel on a GPU; every other
    # test here (and the interpreter) runs the fixed config, which test_forward_config_choice pins.
    batch, seq_len, dim = 4, 520, 512
    assert batch * seq_len * dim >= triton_ops.AUTOTUNE_MIN_ELEMENTS
    ids = torch.randint(0, 1000, (batch, seq_len), device=TRITON_DEVICE)
    check_against_oracle(ids, dtype, 1000, seq_len, dim)
    with_dropout = fused_input_embedding(ids, *random_tables(1000, seq_len, dim, dtype, TRITON_DEVICE),
                                         dropout_p=0.5, backend="triton")
    assert 0.45 < (with_dropout == 0).double().mean().item() < 0.55


def test_forward_config_choice():
    kernel, config = triton_ops._forward_launch(triton_ops.AUTOTUNE_MIN_ELEMENTS - 1)
    assert kernel.kernel is triton_ops.input_embedding_fwd_kernel
    assert config == {"TILE": triton_ops.TILE, "num_warps": 4}
    kernel, config = triton_ops._forward_launch(triton_ops.AUTOTUNE_MIN_ELEMENTS)
    if triton_ops.INTERPRETED:  # the interpreter never autotunes
        assert kernel.kernel is triton_ops.input_embedding_fwd_kernel
    else:
        assert kernel.kernel is not triton_ops.input_embedding_fwd_kernel and config == {}
        assert kernel.kernel.fn is triton_ops.input_embedding_fwd_kernel


@pytest.mark.parametrize("mode", ["past_length", "shared", "shared_1xT", "per_row", "repeated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_position_modes(mode, dtype):
    batch, seq_len, num_positions = 3, 11, 40
    ids = torch.randint(0, 50, (batch, seq_len), device=TRITON_DEVICE)
    kwargs = {}
    if mode == "past_length":
        kwargs["past_length"] = num_positions - seq_len  # the last positions of the table
    elif mode == "shared":
        kwargs["position_ids"] = torch.randperm(num_positions, device=TRITON_DEVICE)[:seq_len]
    elif mode == "shared_1xT":
        kwargs["position_ids"] = torch.arange(5, 5 + seq_len, device=TRITON_DEVICE)[None, :]
    elif mode == "per_row":
        # Left-padded batch: each row starts counting where its real tokens start.
        pad = torch.tensor([0, 4, 7], device=TRITON_DEVICE)
        kwargs["position_ids"] = (torch.arange(seq_len, device=TRITON_DEVICE)[None, :] - pad[:, None]).clamp_min(0)
    else:
        kwargs["position_ids"] = torch.randint(0, 3, (batch, seq_len), device=TRITON_DEVICE, dtype=torch.int32)
    check_against_oracle(ids, dtype, 50, num_positions, 24, **kwargs)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("options", [{}, {"padding_idx": 3, "scale_grad_by_freq": True}], ids=["plain", "options"])
def test_token_scale(dtype, options):
    # BioGPT's scaled word embedding: scale * W[ids] + P[pos], the scale fused into the forward
    # and the token-table gradient. sqrt(D) is not a power of two, so every product rounds.
    ids = id_distribution("zipf", (3, 20), 40, device=TRITON_DEVICE)
    check_against_oracle(ids, dtype, 40, 24, 24, token_scale=24 ** 0.5, **options)


def test_token_scale_with_sparse_gradient_and_dropout():
    ids = torch.randint(0, 30, (3, 7), device=TRITON_DEVICE)
    token_weight, position_weight = random_tables(30, 10, 8, torch.float64, TRITON_DEVICE)
    out = fused_input_embedding(ids, token_weight, position_weight, token_scale=3.0, sparse=True, backend="triton")
    grad_out = torch.randn_like(out)
    grad_tok, = torch.autograd.grad(out, token_weight, grad_out)
    reference_weight = token_weight.detach().requires_grad_()
    reference = torch.nn.functional.embedding(ids, reference_weight, sparse=True) * 3.0
    expected, = torch.autograd.grad(reference, reference_weight, grad_out)
    assert grad_tok.is_sparse
    torch.testing.assert_close(grad_tok.to_dense(), expected.to_dense())
    dropped = fused_input_embedding(ids, token_weight, position_weight, token_scale=3.0, dropout_p=0.5,
                                    backend="triton")
    kept = dropped != 0
    assert 0 < kept.double().mean() < 1
    plain = (3.0 * token_weight[ids] + position_weight[:7]) / 0.5
    torch.testing.assert_close(dropped[kept], plain[kept])


def test_decode_step_one_token():
    # KV-cache decoding: T=1 at a running offset, per batch row positions.
    ids = torch.randint(0, 40, (8, 1), device=TRITON_DEVICE)
    check_against_oracle(ids, torch.float32, 40, 64, 32, past_length=63)
    check_against_oracle(ids, torch.float32, 40, 64, 32, position_ids=torch.randint(0, 64, (8, 1)).to(TRITON_DEVICE))


@pytest.mark.parametrize("kind", ["uniform", "all_equal", "distinct", "zipf", "edges"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gradient_id_distributions(kind, dtype):
    # 4 x 50 = 200 entries: several whole CHUNKs, so long segments take the chunk-sum path.
    assert 200 > 3 * triton_ops.GRAD_CHUNK
    ids = id_distribution(kind, (4, 50), 257, device=TRITON_DEVICE)
    check_against_oracle(ids, dtype, 257, 50, 40)


def test_segment_splitting_boundaries():
    # Segments of every length around the chunk size, at every alignment, in one batch.
    chunk = triton_ops.GRAD_CHUNK
    short = triton_ops.GRAD_SHORT
    lengths = [1, chunk - 1, chunk, chunk + 1, 2 * chunk - 1, 2 * chunk, 2 * chunk + 1, 3 * chunk + 5, 2, short - 1,
               short, short + 1, short + 2, 40 * chunk + 3]
    # The longest covers more chunks than one long-path load takes, and heads/tails longer than one.
    assert 40 > triton_ops.GRAD_LONG_TILE and chunk - 1 > triton_ops.GRAD_LONG_TILE
    ids = torch.cat([torch.full((n,), row) for row, n in enumerate(lengths)])
    ids = ids[torch.randperm(ids.numel())].reshape(1, -1).to(TRITON_DEVICE)
    check_against_oracle(ids, torch.float32, len(lengths) + 3, ids.shape[1], 8)
    # Default positions with a batch longer than a chunk: the position segments are long too.
    ids = torch.randint(0, 5, (3 * chunk + 7, 2), device=TRITON_DEVICE)
    check_against_oracle(ids, torch.float32, 5, 4, 8, past_length=2)


@pytest.mark.parametrize("kind", ["all_equal", "zipf", "uniform"])
def test_backward_is_bitwise_deterministic(kind):
    ids = id_distribution(kind, (4, 64), 97, device=TRITON_DEVICE)
    token_weight, position_weight = random_tables(97, 64, 48, torch.float32, TRITON_DEVICE)
    # Values of mixed magnitude make fp32 summation order visible in the last bits.
    grad_out = torch.randn(4, 64, 48, device=TRITON_DEVICE) * torch.logspace(-3, 3, 48, device=TRITON_DEVICE)
    results = [run_fused(ids, token_weight, position_weight, grad_out)[1] for _ in range(3)]
    for grad_tok, grad_pos in results[1:]:
        assert torch.equal(grad_tok, results[0][0])
        assert torch.equal(grad_pos, results[0][1])


def test_non_contiguous_upstream_gradient():
    ids = torch.randint(0, 30, (3, 7), device=TRITON_DEVICE)
    token_weight, position_weight = random_tables(30, 10, 16, torch.float32, TRITON_DEVICE)
    grad_out = torch.randn(16, 7, 3, device=TRITON_DEVICE).permute(2, 1, 0)  # strides (1, 3, 21)
    assert not grad_out.is_contiguous()
    out, (grad_tok, grad_pos) = run_fused(ids, token_weight, position_weight, grad_out)
    _, exact_tok, exact_pos = exact_reference(ids, token_weight, position_weight, grad_out)
    assert_exact_within(grad_tok, exact_tok, torch.float32, "token grad")
    assert_exact_within(grad_pos, exact_pos, torch.float32, "position grad")
    # out.sum().backward() hands the backward an expanded gradient: every stride is 0.
    out = fused_input_embedding(ids, token_weight, position_weight, backend="triton")
    out.sum().backward()
    expected_counts = torch.bincount(ids.flatten().cpu(), minlength=30).double()[:, None].expand(30, 16)
    torch.testing.assert_close(token_weight.grad.cpu().double(), expected_counts)
    torch.testing.assert_close(position_weight.grad[:7].cpu(), torch.full((7, 16), 3.0))
    assert torch.count_nonzero(position_weight.grad[7:]) == 0


def test_strided_ids_and_tables():
    ids = torch.randint(0, 20, (7, 5), device=TRITON_DEVICE).t()  # non-contiguous [5, 7]
    base_tok = torch.randn(20, 24, device=TRITON_DEVICE)
    token_weight = base_tok[:, ::2].detach().requires_grad_()  # last-dim stride 2
    position_weight = torch.randn(30, 12, device=TRITON_DEVICE)[3:].requires_grad_()
    grad_out = torch.randn(5, 7, 12, device=TRITON_DEVICE)
    out, (grad_tok, grad_pos) = run_fused(ids, token_weight, position_weight, grad_out)
    exact_out, exact_tok, exact_pos = exact_reference(ids, token_weight, position_weight, grad_out)
    assert_exact_within(out, exact_out, torch.float32, "output")
    assert_exact_within(grad_tok, exact_tok, torch.float32, "token grad")
    assert_exact_within(grad_pos, exact_pos, torch.float32, "position grad")


def test_only_tables_that_require_grad_get_one():
    ids = torch.randint(0, 10, (2, 3), device=TRITON_DEVICE)
    token_weight, position_weight = random_tables(10, 5, 4, torch.float32, TRITON_DEVICE)
    frozen_positions = position_weight.detach()
    out = fused_input_embedding(ids, token_weight, frozen_positions, backend="triton")
    out.backward(torch.ones_like(out))
    assert token_weight.grad is not None and frozen_positions.grad is None
    out = fused_input_embedding(ids, token_weight.detach(), position_weight, backend="triton")
    assert out.grad_fn is not None
    out.backward(torch.ones_like(out))
    assert position_weight.grad is not None
    torch.testing.assert_close(position_weight.grad[:3], torch.full((3, 4), 2.0, device=TRITON_DEVICE))


def test_backward_saves_only_ids():
    ids = torch.randint(0, 10, (2, 3), device=TRITON_DEVICE)
    token_weight, position_weight = random_tables(10, 5, 4, torch.float32, TRITON_DEVICE)
    out = fused_input_embedding(ids, token_weight, position_weight, backend="triton")
    saved = out.grad_fn.saved_tensors
    # (ids, position ids, dropout seed): no position ids and no dropout here.
    assert len(saved) == 3 and saved[1:] == (None, None)
    assert saved[0].dtype == ids.dtype and saved[0].shape == ids.shape
    assert saved[0].data_ptr() == ids.data_ptr()  # a view of the caller's ids, not a copy


@pytest.mark.parametrize("batch_shape", [(0, 5), (3, 0), (0,), (0, 0)])
def test_empty_batches(batch_shape):
    ids = torch.empty(batch_shape, dtype=torch.int64, device=TRITON_DEVICE)
    token_weight, position_weight = random_tables(10, 5, 4, torch.float32, TRITON_DEVICE)
    out = fused_input_embedding(ids, token_weight, position_weight, backend="triton")
    assert out.shape == (*batch_shape, 4)
    out.sum().backward()
    assert torch.equal(token_weight.grad, torch.zeros_like(token_weight))
    assert torch.equal(position_weight.grad, torch.zeros_like(position_weight))


@pytest.mark.parametrize("position_mode", ["default", "past_length", "shared", "per_row"])
def test_gradcheck_float64_through_kernels(position_mode):
    ids = torch.tensor([[1, 4, 4, 0], [6, 4, 1, 1]], device=TRITON_DEVICE)
    token_weight, position_weight = random_tables(7, 6, 3, torch.float64, TRITON_DEVICE)
    position_ids, past_length = None, 0
    if position_mode == "past_length":
        past_length = 2
    elif position_mode == "shared":
        position_ids = torch.tensor([5, 0, 5, 2], device=TRITON_DEVICE)
    elif position_mode == "per_row":
        position_ids = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]], device=TRITON_DEVICE)

    def fn(tok, pos):
        return FusedInputEmbeddingFunction.apply(ids, tok, pos, position_ids, LookupOptions(past_length=past_length))

    assert torch.autograd.gradcheck(fn, (token_weight, position_weight))


def test_unchecked_bad_id_is_nan_not_out_of_bounds():
    # check_ids=False skips the host-synchronising check; the kernel must still never read
    # outside a table. Place a sentinel right after the table rows to see that it is not read.
    storage = torch.randn(12, 4, device=TRITON_DEVICE)
    storage[10:] = 1e30
    token_weight = storage[:10]
    position_weight = torch.randn(5, 4, device=TRITON_DEVICE)
    ids = torch.tensor([[1, 10, 11, -1]], device=TRITON_DEVICE)
    out = fused_input_embedding(ids, token_weight, position_weight, check_ids=False, backend="triton")
    assert torch.isfinite(out[0, 0]).all()
    assert torch.isnan(out[0, 1:]).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["default", "past_length", "per_row", "one_dim"])
def test_plain_pytorch_path_matches_oracle(dtype, mode):
    # The CPU fallback is the reference itself; this pins that fused_input_embedding routes
    # every argument to it correctly (and that its half-precision error is one rounding).
    ids = torch.randint(0, 40, (7,) if mode == "one_dim" else (3, 7))
    token_weight, position_weight = random_tables(40, 12, 9, dtype, "cpu")
    kwargs = {"past_length": 5} if mode == "past_length" else {}
    if mode == "per_row":
        kwargs["position_ids"] = torch.randint(0, 12, (3, 7))
    out = fused_input_embedding(ids, token_weight, position_weight, backend="torch", **kwargs)
    exact_out, _, _ = exact_reference(ids, token_weight, position_weight, torch.zeros(*ids.shape, 9), **kwargs)
    assert out.shape == (*ids.shape, 9)
    assert_exact_within(out, exact_out, dtype, "output")

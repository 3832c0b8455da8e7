"""The two ways of writing a table's gradient (triton_ops.GRAD_KERNELS) give the same bits.

"rows" (embedding_grad_rows_kernel) writes every table row once, zeros included; "scatter"
zero-fills the table and then embedding_grad_scatter_kernel writes only the rows that were looked
up, one program per run of sorted entries. They sum each segment in the same order, so the
gradients must be bitwise equal, for every id layout and option, and both must match the float64
oracle. (Which is faster is a GPU question: bench/acceptance.py times both.)
"""
import pytest
import torch

from conftest import TRITON_DEVICE, launches_of
from helpers import TOLERANCES, exact_reference, id_distribution, random_tables
from tokemb_fast import fused_input_embedding, triton_ops

pytestmark = pytest.mark.skipif(not (triton_ops.INTERPRETED or torch.cuda.is_available()),
                                reason="runs the Triton kernels (interpreted or on a GPU)")


def grads_both_ways(ids, dtype, vocab_size, num_positions, dim, grad_out=None, **options):
    token_weight, position_weight = random_tables(vocab_size, num_positions, dim, dtype, TRITON_DEVICE)
    column_scale = torch.ones(dim, dtype=torch.float64, device=TRITON_DEVICE)
    if grad_out is None:
        # Mixed magnitudes make the summation order show in the last bits.
        column_scale = torch.logspace(-3, 3, dim, dtype=torch.float64, device=TRITON_DEVICE)
        grad_out = (torch.randn(*ids.shape, dim, device=TRITON_DEVICE) * column_scale).to(dtype)
    results = {}
    for name in triton_ops.GRAD_KERNELS:
        torch.manual_seed(1234)  # the same dropout seed for both
        with triton_ops.grad_kernel(name):
            out = fused_input_embedding(ids, token_weight, position_weight, backend="triton", **options)
            results[name] = (out,) + torch.autograd.grad(out, (token_weight, position_weight), grad_out)
    for got, want in zip(results["scatter"], results["rows"]):
        assert torch.equal(got, want)
    if options.get("dropout_p", 0.0) == 0.0:  # (with dropout the two are compared with each other only)
        _, exact_tok, exact_pos = exact_reference(ids, token_weight, position_weight, grad_out, **options)
        # Each column against its own magnitude: a sum that cancels in a 1e3-scaled column is off by
        # fp32 accumulation error of that scale, which an absolute tolerance of 2e-5 cannot cover.
        for got, exact, what in ((results["scatter"][1], exact_tok, "token-table gradient"),
                                 (results["scatter"][2], exact_pos, "position-table gradient")):
            assert got.dtype == dtype and not torch.isnan(got).any(), what
            torch.testing.assert_close(got.double() / column_scale, exact.double() / column_scale,
                                       **TOLERANCES[dtype], msg=lambda m, what=what: f"{what}: {m}")
    return results["scatter"]


@pytest.mark.parametrize("kind", ["uniform", "all_equal", "distinct", "zipf", "edges"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_id_layouts(kind, dtype):
    # 4 x 50 = 200 entries: whole chunks, so long segments take the chunk-sum path.
    grads_both_ways(id_distribution(kind, (4, 50), 257, device=TRITON_DEVICE), dtype, 257, 50, 40)


def test_segment_lengths_around_the_short_and_chunk_limits():
    chunk, short = triton_ops.GRAD_CHUNK, triton_ops.GRAD_SHORT
    lengths = [1, 2, short - 1, short, short + 1, chunk - 1, chunk, chunk + 1, 2 * chunk + 1, 3 * chunk + 5,
               17 * chunk + 3]
    ids = torch.cat([torch.full((n,), row) for row, n in enumerate(lengths)])
    ids = ids[torch.randperm(ids.numel())].reshape(1, -1).to(TRITON_DEVICE)
    grads_both_ways(ids, torch.float32, len(lengths) + 3, ids.shape[1], 24)


@pytest.mark.parametrize("options", [
    dict(padding_idx=3),
    dict(scale_grad_by_freq=True),
    dict(scale_grad_by_freq=True, padding_idx=0, token_scale=0.5),
    dict(dropout_p=0.25),
    dict(position_ids="given", position_scale_grad_by_freq=True, position_padding_idx=1),
], ids=lambda options: ",".join(options))
def test_options(options):
    ids = id_distribution("zipf", (3, 40), 9, device=TRITON_DEVICE)
    if options.get("position_ids") == "given":  # explicit positions: that table's keys are given too
        options = dict(options, position_ids=torch.randint(0, 40, (3, 40), device=TRITON_DEVICE))
    grads_both_ways(ids, torch.float32, 9, 40, 20, **options)


@pytest.mark.parametrize("dim", [1, 100, 768])
def test_widths_and_strides(dim):
    ids = torch.randint(0, 31, (2, 9), device=TRITON_DEVICE)
    grads_both_ways(ids, torch.float32, 31, 9, dim)
    upstream = torch.randn(dim, 9, 2, device=TRITON_DEVICE).permute(2, 1, 0)  # not contiguous
    grads_both_ways(ids, torch.float32, 31, 9, dim, grad_out=upstream)


def test_empty_lookup_gives_zero_tables():
    ids = torch.zeros((0, 4), dtype=torch.long, device=TRITON_DEVICE)
    _, grad_tok, _ = grads_both_ways(ids, torch.float32, 7, 4, 8)
    assert torch.count_nonzero(grad_tok) == 0


def test_the_setting_picks_the_kernel_and_keeps_plans_apart(kernel_launches):
    ids = torch.randint(0, 50, (2, 6), device=TRITON_DEVICE)
    for name, kernel in (("rows", "embedding_grad_rows_kernel"), ("scatter", "embedding_grad_scatter_kernel"),
                         ("rows", "embedding_grad_rows_kernel")):
        del kernel_launches[:]
        token_weight, position_weight = random_tables(50, 6, 16, torch.float32, TRITON_DEVICE)
        with triton_ops.grad_kernel(name):
            fused_input_embedding(ids, token_weight, position_weight, backend="triton").sum().backward()
        # Default positions keep the row kernel either way; the token table takes the chosen one.
        assert launches_of(kernel_launches, kernel) == (1 if name == "scatter" else 2)
        assert launches_of(kernel_launches, "embedding_grad_rows_kernel") >= 1
    assert triton_ops.GRAD_KERNEL == "rows"
    with pytest.raises(ValueError, match="grad_kernel must be one of"):
        triton_ops.grad_kernel("atomic")


def test_scatter_allocates_the_table_once_in_its_own_dtype():
    # The zero fill is the table itself (bf16 here), not an fp32 scratch copied down afterwards.
    vocab_size, dim = 300, 48
    ids = id_distribution("zipf", (4, 64), vocab_size, device=TRITON_DEVICE)
    token_weight, position_weight = random_tables(vocab_size, 64, dim, torch.bfloat16, TRITON_DEVICE)
    made = []
    originals = {name: getattr(torch, name) for name in ("empty", "zeros")}

    def recording(name):
        def make(*args, **kwargs):
            tensor = originals[name](*args, **kwargs)
            made.append((name, tuple(tensor.shape), tensor.dtype))
            return tensor
        return make

    with triton_ops.grad_kernel("scatter"):
        out = fused_input_embedding(ids, token_weight, position_weight, backend="triton")
        for name in originals:
            setattr(torch, name, recording(name))
        try:
            torch.autograd.grad(out, (token_weight, position_weight), torch.randn_like(out))
        finally:
            for name, original in originals.items():
                setattr(torch, name, original)
    table_sized = [entry for entry in made if len(entry[1]) == 2 and entry[1][0] in (vocab_size, 64)
                   and entry[1][1] == dim]
    # (The default positions' table comes from the row kernel, which writes every row: no fill.)
    assert table_sized == [("zeros", (vocab_size, dim), torch.bfloat16), ("empty", (64, dim), torch.bfloat16)]

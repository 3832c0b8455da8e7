"""The two ways of writing a table's gradient (triton_ops.GRAD_KERNELS) give the same bits.

"rows" (embedding_grad_rows_kernel) writes every table row once, zeros included; "scatter"
zero-fills the table and then embedding_grad_scatter_kernel writes only the rows that were looked
up, one program per run of sorted entries. They sum each segment in the same order, so the
gradients must be bitwise equal, for every id layout and option, and both must match the float64
oracle. (Which is faster is a GPU question: bench/acceptance.py times both.)
"""
import threading

import pytest
import torch
import triton

from conftest import TRITON_DEVICE, launches_of
from helpers import TOLERANCES, exact_reference, id_distribution, random_tables
from tokemb_fast import bench, fused_input_embedding, triton_ops

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
    setting = triton_ops.GRAD_KERNEL  # (the environment's: "rows" unless TOKEMB_FAST_GRAD_KERNEL says)
    for name, kernel in (("rows", "embedding_grad_rows_kernel"), ("scatter", "embedding_grad_scatter_kernel"),
                         ("rows", "embedding_grad_rows_kernel")):
        del kernel_launches[:]
        token_weight, position_weight = random_tables(50, 6, 16, torch.float32, TRITON_DEVICE)
        with triton_ops.grad_kernel(name):
            fused_input_embedding(ids, token_weight, position_weight, backend="triton").sum().backward()
        # Default positions keep the row kernel either way; the token table takes the chosen one.
        assert launches_of(kernel_launches, kernel) == (1 if name == "scatter" else 2)
        assert launches_of(kernel_launches, "embedding_grad_rows_kernel") >= 1
    assert triton_ops.GRAD_KERNEL == setting
    with pytest.raises(ValueError, match="grad_kernel must be one of"):
        triton_ops.grad_kernel("atomic")


def test_the_setting_is_restored_whatever_order_contexts_close_in():
    # Two threads whose contexts interleave (A opens, B opens, A closes, B closes), and one instance
    # entered twice: the innermost open context decides, and with none open the setting is back.
    setting = triton_ops.GRAD_KERNEL
    other = "scatter" if setting == "rows" else "rows"
    a_open, b_open, a_closed = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with triton_ops.grad_kernel(other):
            a_open.set()
            b_open.wait(10)
        a_closed.set()

    def thread_b():
        a_open.wait(10)
        with triton_ops.grad_kernel(setting):
            b_open.set()
            a_closed.wait(10)
            seen["after A closed"] = triton_ops.GRAD_KERNEL

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen == {"after A closed": setting} and triton_ops.GRAD_KERNEL == setting
    context = triton_ops.grad_kernel(other)
    with context:
        with triton_ops.grad_kernel(setting):
            with context:
                assert triton_ops.GRAD_KERNEL == other
            assert triton_ops.GRAD_KERNEL == setting
        assert triton_ops.GRAD_KERNEL == other
    assert triton_ops.GRAD_KERNEL == setting


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


@pytest.mark.parametrize("kernel", triton_ops.GRAD_KERNELS)
def test_unchecked_bad_ids_touch_no_memory_around_the_gradient_table(kernel, monkeypatch):
    # check_ids=False: ids below 0 or past the table add nothing, and their keys must never become a
    # row to write (the scatter kernel's rows come from the keys) or a bound to read. The table is
    # made a view into a larger buffer with sentinel rows on both sides, which must stay untouched.
    vocab_size, dim, guard = 10, 8, 64
    made = []
    original_zeros, original_empty = torch.zeros, torch.empty

    def guarded(original):
        def make(*args, **kwargs):
            shape = args[0] if args and isinstance(args[0], tuple) else None
            if shape == (vocab_size, dim):
                buffer = original_empty((vocab_size + 2 * guard, dim), dtype=kwargs.get("dtype"),
                                        device=kwargs.get("device"))
                buffer.fill_(12345.0)
                table = buffer[guard:guard + vocab_size]
                if original is original_zeros:
                    table.zero_()
                made.append(buffer)
                return table
            return original(*args, **kwargs)
        return make

    token_weight, position_weight = random_tables(vocab_size, 6, dim, torch.float32, TRITON_DEVICE)
    ids = torch.tensor([[1, 12, 3, 1, 10, 10], [-1, 2, 2, 10, 11, -3]], device=TRITON_DEVICE)
    grad_out = torch.randn(2, 6, dim, device=TRITON_DEVICE)
    with triton_ops.grad_kernel(kernel):
        out = fused_input_embedding(ids, token_weight, position_weight, backend="triton", check_ids=False)
        monkeypatch.setattr(torch, "zeros", guarded(original_zeros))
        monkeypatch.setattr(torch, "empty", guarded(original_empty))
        (grad_token,) = torch.autograd.grad(out, (token_weight,), grad_out)
        monkeypatch.undo()
    assert len(made) == 1
    assert torch.all(made[0][:guard] == 12345.0) and torch.all(made[0][guard + vocab_size:] == 12345.0)
    good = (ids >= 0) & (ids < vocab_size)
    expected = torch.zeros(vocab_size, dim, device=TRITON_DEVICE).index_add_(0, ids[good], grad_out[good])
    torch.testing.assert_close(grad_token, expected)


# Ids an int32 cast would wrap onto real rows: 2^32 + 3 -> 3, 2^31 + 4 -> -2^31 + 4, -2^32 + 6 -> 6, ...
BEYOND_INT32 = [2**32 + 3, 2**31 + 4, -2**32 + 6, 2**31, -2**31 - 1, 2**63 - 1, -2**63, 2**33 + 1]


@pytest.mark.parametrize("kernel", triton_ops.GRAD_KERNELS)
@pytest.mark.parametrize("positions", ["default", "[T]", "[B, T] strided"])
def test_unchecked_ids_beyond_int32_add_nothing_to_any_row(kernel, positions):
    # The sort takes 32-bit keys; int64 ids are clamped to -1 or num_rows on the way (sort_keys_kernel),
    # so an unchecked bad id stays bad instead of wrapping onto a row that would receive its gradient.
    # Position ids too, read through their strides: [T] is expanded over the batch (stride 0).
    vocab_size, num_positions, dim = 10, 8, 8
    token_weight, position_weight = random_tables(vocab_size, num_positions, dim, torch.float64, TRITON_DEVICE)
    ids = torch.tensor([[1, 2**32 + 3, 3, 2**31 + 4], [-2**32 + 6, 6, 2**63 - 1, 9]], device=TRITON_DEVICE)
    options = {}
    if positions == "[T]":
        options["position_ids"] = torch.tensor([2**32 + 1, 1, 2, -2**32 + 7], device=TRITON_DEVICE)
    elif positions == "[B, T] strided":
        wide = torch.tensor([[0, 9, 2**32 + 2, 9, 1, 9, 2**31 + 3, 9],
                             [2**32 + 5, 9, 5, 9, -2**31 - 1, 9, 7, 9]], device=TRITON_DEVICE)
        options["position_ids"] = wide[:, ::2]
    grad_out = torch.randn(2, 4, dim, dtype=torch.float64, device=TRITON_DEVICE)
    with triton_ops.grad_kernel(kernel):
        out = fused_input_embedding(ids, token_weight, position_weight, backend="triton", check_ids=False,
                                    **options)
        grad_token, grad_position = torch.autograd.grad(out, (token_weight, position_weight), grad_out)
    good = (ids >= 0) & (ids < vocab_size)
    expected = torch.zeros(vocab_size, dim, dtype=torch.float64, device=TRITON_DEVICE)
    assert torch.equal(grad_token, expected.index_add_(0, ids[good], grad_out[good]))
    position_ids = options.get("position_ids", torch.arange(4, device=TRITON_DEVICE)).expand(2, 4)
    good = (position_ids >= 0) & (position_ids < num_positions)
    expected = torch.zeros(num_positions, dim, dtype=torch.float64, device=TRITON_DEVICE)
    torch.testing.assert_close(grad_position, expected.index_add_(0, position_ids[good], grad_out[good]))


def test_the_sort_keys_clamp_every_id_and_keep_int32_ones():
    # The cast on its own: every entry written, in (b, t) order, clamped to [-1, num_rows].
    num_rows = 50
    ids = torch.tensor(BEYOND_INT32 + [0, 49, 50, -1, 2**31 - 1, -2**31], device=TRITON_DEVICE)
    keys = ids.reshape(2, 7).t()  # [7, 2], strides (1, 7): read through its strides
    layout = triton_ops._grad_layout(7, 2, 1, num_rows, False, False, False, False, torch.float32)
    sort_input = torch.full((14,), -12345, dtype=torch.int32, device=TRITON_DEVICE)
    triton_ops._traced_launch(triton_ops._SORT_KEYS, layout.sort_keys[0],
                              (sort_input, keys, keys.stride(0), keys.stride(1), 14, 2, num_rows),
                              layout.sort_keys[1])
    assert torch.equal(sort_input.long(), keys.reshape(-1).clamp(-1, num_rows))
    # int32 ids cannot wrap: sorted as they are, no cast launched; default positions have no keys.
    assert triton_ops._grad_layout(7, 2, 1, num_rows, False, False, False, False, torch.float32,
                                   int64_keys=False).sort_keys is None
    assert triton_ops._grad_layout(7, 2, 1, num_rows, True, False, False, False, torch.float32).sort_keys is None


@pytest.mark.parametrize("num_rows", [1, 1023, 1024, 2500])
def test_one_launch_finds_every_bound_and_sums_every_single_key_chunk(num_rows):
    # The bounds' search programs come first in the launch's grid, the chunks' after them: with one
    # or several of each, every bound must be searchsorted's and every chunk within one key its sum.
    chunk = triton_ops.GRAD_CHUNK
    ids = id_distribution("zipf", (4, 64), num_rows, device=TRITON_DEVICE)
    ids[1, :2 * chunk] = num_rows - 1  # a long segment at the table's end: at least one whole chunk
    grad_out = torch.randn(4, 64, 16, device=TRITON_DEVICE)
    layout = triton_ops._grad_layout(4, 64, 16, num_rows, False, False, False, False, torch.float32)
    launched = {}

    def launch(slot, kernel, args):
        launched[slot] = args
        triton_ops._traced_launch(kernel, getattr(layout, slot)[0], args, getattr(layout, slot)[1])

    grad_table = triton_ops._dense_grad(grad_out, ids, num_rows, 0, -1, False, 1, 0.0, None, None, None, layout,
                                        launch)
    assert set(launched) == {"sort_keys", "segments", "rows"}
    bounds, chunk_sums, sorted_keys, order = (launched["segments"][i] for i in (0, 1, 6, 7))
    assert layout.segments[0][0] == triton.cdiv(num_rows + 1, triton_ops.SEARCH_BLOCK) + 256 // chunk
    rows = torch.arange(num_rows + 1, device=TRITON_DEVICE)
    assert torch.equal(bounds, torch.searchsorted(sorted_keys.long(), rows))
    flat_grad = grad_out.reshape(-1, 16)
    single_key = [i for i in range(256 // chunk) if sorted_keys[i * chunk] == sorted_keys[(i + 1) * chunk - 1]]
    assert single_key
    for i in single_key:  # (fp32 sums in the chunk's sorted order)
        torch.testing.assert_close(chunk_sums[i], flat_grad[order[i * chunk:(i + 1) * chunk]].sum(0))
    expected = torch.zeros(num_rows, 16, device=TRITON_DEVICE).index_add_(0, ids.reshape(-1), flat_grad)
    torch.testing.assert_close(grad_table, expected)


@pytest.mark.parametrize("num_rows", [2**31 - 1025, 2**31 - 1024, 2**31 - 1])
def test_the_search_covers_tables_near_the_int32_limit(num_rows):
    # Triton passes num_rows below 2^31 as an int32: the launch's count of search programs must not
    # overflow there (it once did, and no program searched). Only the first search block is
    # launched: the whole grid, and a bounds buffer of 2^31 entries, are beyond a test's memory.
    layout = triton_ops._grad_layout(1, 4, 1, num_rows, False, False, False, False, torch.float32)
    (search_programs, columns), constexprs = layout.segments
    assert search_programs == triton.cdiv(num_rows + 1, triton_ops.SEARCH_BLOCK) and columns == 1
    sorted_keys = torch.tensor([0, 1, 1, 3], dtype=torch.int32, device=TRITON_DEVICE)
    bounds = torch.full((triton_ops.SEARCH_BLOCK,), -7, dtype=torch.int64, device=TRITON_DEVICE)
    grad_out = torch.zeros(1, 4, 1, device=TRITON_DEVICE)
    chunk_sums = torch.zeros(1, 1, device=TRITON_DEVICE)
    order = torch.arange(4, device=TRITON_DEVICE)
    triton_ops._traced_launch(triton_ops._SEGMENTS, (1, 1),
                              (bounds, chunk_sums, grad_out, 4, 1, 1, sorted_keys, order, 4, num_rows, 1, 1, 4, 0,
                               *triton_ops._dropout_args(0.0, None, None, grad_out)), constexprs)
    rows = torch.arange(triton_ops.SEARCH_BLOCK, device=TRITON_DEVICE)
    assert torch.equal(bounds, torch.searchsorted(sorted_keys.long(), rows))


@pytest.mark.parametrize("failing_slot", ["sort_keys", "segments", "rows", None])
def test_the_side_fill_is_joined_once_even_when_a_launch_fails(failing_slot, monkeypatch):
    # The side-stream fork and join (CUDA only) replaced by a recorder, so the body's bookkeeping
    # runs here: one join per fork, before the scatter launch when it is reached, and still one when
    # a launch raises (otherwise the table could go back to the pool while the fill writes it).
    events = []

    def fork(grad_table):
        events.append("fork")
        grad_table.zero_()
        return lambda: events.append("join")

    def launch(slot, kernel, args):
        events.append(slot)
        if slot == failing_slot:
            raise RuntimeError(f"{slot} launch failed")
        triton_ops._traced_launch(kernel, getattr(layout, slot)[0], args, getattr(layout, slot)[1])

    monkeypatch.setattr(triton_ops, "_fill_beside", fork)
    ids = id_distribution("zipf", (4, 64), 300, device=TRITON_DEVICE)  # 256 entries: two chunks
    grad_out = torch.randn(4, 64, 16, device=TRITON_DEVICE)
    layout = triton_ops._grad_layout(4, 64, 16, 300, False, False, False, False, torch.float32, "scatter")
    assert layout.scatter and layout.n_chunks > 0
    call = lambda: triton_ops._dense_grad(grad_out, ids, 300, 0, -1, False, 1, 0.0, None, None, None, layout,
                                          launch, side_stream_fill=True)
    if failing_slot is None:
        grad_table = call()
        assert events == ["fork", "sort_keys", "segments", "join", "rows"]
        expected = torch.zeros(300, 16, device=TRITON_DEVICE).index_add_(0, ids.reshape(-1), grad_out.reshape(-1, 16))
        torch.testing.assert_close(grad_table, expected)
    else:
        with pytest.raises(RuntimeError, match=f"{failing_slot} launch failed"):
            call()
        assert events.count("fork") == events.count("join") == 1
        assert events[-1] == ("join" if failing_slot != "rows" else "rows")


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "the side-stream fill runs on CUDA only; on CPU the fill is on the call's own stream and the tests "
    "above check the same sums"))


def _rows_then_scatter(step):
    results = {}
    for name in triton_ops.GRAD_KERNELS:
        with triton_ops.grad_kernel(name):
            results[name] = step()
    return results


@NEEDS_CUDA
def test_side_stream_fill_on_a_user_stream_under_load():
    # The fill is forked from whichever stream is current and joined back before the scatter. A
    # busy user stream (a large matmul queued first) makes a missing wait show: the scatter would
    # then write rows the fill zeroes afterwards, or the fill would start before the table is free.
    ids = id_distribution("zipf", (8, 512), 50257, device="cuda")
    token_weight, position_weight = random_tables(50257, 512, 256, torch.float32, "cuda")
    grad_out = torch.randn(8, 512, 256, device="cuda")
    busy = torch.randn(4096, 4096, device="cuda")
    user = torch.cuda.Stream()
    user.wait_stream(torch.cuda.current_stream())

    def step():
        with torch.cuda.stream(user):
            busy @ busy
            out = fused_input_embedding(ids, token_weight, position_weight, backend="triton")
            grads = torch.autograd.grad(out, (token_weight, position_weight), grad_out)
        torch.cuda.current_stream().wait_stream(user)
        return grads

    results = _rows_then_scatter(step)
    assert triton_ops.GRAD_FILL_BESIDE
    # The user stream's own side stream (one per current stream, not one per device).
    assert (torch.device("cuda", torch.cuda.current_device()), user.cuda_stream) in triton_ops._fill_streams
    for got, want in zip(results["scatter"], results["rows"]):
        assert torch.equal(got, want)


@NEEDS_CUDA
def test_side_stream_fill_in_a_captured_graph():
    ids = id_distribution("uniform", (4, 128), 3000, device="cuda")
    token_weight, position_weight = random_tables(3000, 128, 64, torch.float32, "cuda")
    grad_out = torch.randn(4, 128, 64, device="cuda")

    def step():
        static = {}

        def once():  # the last call is the captured one: its outputs are the graph's
            out = fused_input_embedding(ids, token_weight, position_weight, backend="triton", check_ids=False)
            static["grads"] = torch.autograd.grad(out, (token_weight, position_weight), grad_out)

        graph = bench.cuda_graph_of(once)
        ids.copy_(replay_ids)  # new ids, same buffers
        graph.replay()
        torch.cuda.synchronize()
        return tuple(t.clone() for t in static["grads"])

    fresh = ids.clone()
    replay_ids = id_distribution("zipf", (4, 128), 3000, device="cuda")

    def fresh_step():
        ids.copy_(fresh)
        return step()

    results = _rows_then_scatter(fresh_step)
    for got, want in zip(results["scatter"], results["rows"]):
        assert torch.equal(got, want)

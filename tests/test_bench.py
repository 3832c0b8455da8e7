"""The benchmark harness itself (tables, JSON, plot, CLI), driven on CPU with tiny shapes.

The numbers here mean nothing; what is checked is that every implementation is timed against
the same floor, that the derived columns are computed from the rows, and that the outputs exist.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

from conftest import TRITON_DEVICE
from tokemb_fast import bench, triton_ops
from tokemb_fast.cli import main

TINY = bench.Shape("tiny", 2, 8, 50, 16, 8)
TINY_DECODE = bench.Shape("tiny-decode", 4, 1, 50, 16, 8, random_positions=True)


def host_timer(fn):
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def test_bytes_moved_matches_the_floor_definition():
    shape = bench.SHAPES["gpt2-124M"]
    n = 8 * 1024 * 768
    assert bench.bytes_moved(shape, 4, "fwd") == 2 * n * 4
    assert bench.bytes_moved(shape, 2, "fwd+bwd") == (2 * n + (50257 + 1024) * 768 + n) * 2


@pytest.mark.parametrize("ids", ["uniform", "zipf", "equal"])
def test_inputs_are_random_and_in_range(ids):
    input_ids, position_ids, tok, pos, grad = bench.make_inputs(TINY_DECODE, torch.float32, "cpu", ids)
    assert int(input_ids.min()) >= 0 and int(input_ids.max()) < TINY_DECODE.vocab_size
    assert position_ids.shape == (4, 1) and int(position_ids.max()) < TINY_DECODE.context_length
    assert torch.count_nonzero(tok) == tok.numel() and torch.count_nonzero(grad) == grad.numel()
    if ids == "equal":
        assert input_ids.unique().numel() == 1


@pytest.mark.skipif(not triton_ops.INTERPRETED, reason="drives the fused rows through the interpreter")
def test_measurement_rows_table_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    saved_counts = []
    rows = bench.run_cuda([TINY, TINY_DECODE], ["fp32", "bf16"], list(bench.MODES),
                          ["fused", "fused-unchecked", "fused-sync", "eager", "floor", "fused+dropout", "eager+dropout", "hf-eager",
                           "hf-swapped"],
                          ["uniform", "equal"],
                          progress=lambda line: None, device=TRITON_DEVICE, timer=host_timer,
                          on_group=lambda rows_so_far: saved_counts.append(len(rows_so_far)))
    # Called after each shape and dtype (what `bench --json` saves as it goes), with all rows so far.
    assert len(saved_counts) == 4 and saved_counts == sorted(set(saved_counts)) and saved_counts[-1] == len(rows)
    impls = {(r.shape, r.dtype, r.mode, r.impl, r.ids) for r in rows}
    assert ("tiny", "bf16", "fwd+bwd", "fused", "equal") in impls
    assert ("tiny", "fp32", "fwd", "floor", "-") in impls
    assert not any(r.impl == "fused-sync" and r.ids == "equal" for r in rows)  # skew: fused and eager only
    for row in rows:
        assert row.ms > 0 and row.floor_ms > 0
        assert row.x_floor == pytest.approx(row.ms / row.floor_ms)
    table = bench.format_table(rows)
    assert "#### tiny" in table and "| fwd+bwd | fused | equal |" in table
    assert "| fwd+bwd | fused+dropout | uniform |" in table
    # Dropout rows are compared with eager dropout, not with the plain sum.
    pick = {(r.impl, r.mode, r.ids): r for r in rows if (r.shape, r.dtype) == ("tiny", "fp32")}
    fused_drop, eager_drop = pick[("fused+dropout", "fwd", "uniform")], pick[("eager+dropout", "fwd", "uniform")]
    line = next(l for l in table.split("#### tiny, fp32")[1].splitlines() if l.startswith("| fwd | fused+dropout |"))
    assert f"| {eager_drop.ms / fused_drop.ms:.2f}x |" in line
    swapped, hf_eager = pick[("hf-swapped", "fwd", "uniform")], pick[("hf-eager", "fwd", "uniform")]
    line = next(l for l in table.split("#### tiny, fp32")[1].splitlines() if l.startswith("| fwd | hf-swapped |"))
    assert f"| {hf_eager.ms / swapped.ms:.2f}x |" in line
    bench.save_json(rows, str(tmp_path / "r.json"), bench.environment())
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__ and len(saved["rows"]) == len(rows)


def test_a_failing_row_is_reported_and_the_run_goes_on(monkeypatch):
    # On a lent GPU the whole table runs once: one broken implementation must not cost the rest.
    def broken(*args):
        raise RuntimeError("no kernel for this\nsecond line")
    monkeypatch.setattr(bench, "_hf_eager", broken)
    failures = []
    rows = bench.run_cuda([TINY], ["fp32"], ["fwd"], ["hf-eager", "eager"], ["uniform"], progress=lambda line: None,
                          device="cpu", timer=host_timer, failures=failures)
    assert failures == ["tiny fp32 fwd hf-eager uniform: RuntimeError: no kernel for this"]
    assert [r.impl for r in rows] == ["eager"]
    with pytest.raises(RuntimeError, match="no kernel for this"):  # without a failures list: raised
        bench.run_cuda([TINY], ["fp32"], ["fwd"], ["hf-eager"], ["uniform"], progress=lambda line: None,
                       device="cpu", timer=host_timer)


def test_plot_has_a_panel_per_mode_and_dtype(tmp_path):
    rows = [bench.Row(shape, dtype, mode, impl, "uniform" if impl != "floor" else "-", ms, 1.0, 10**9)
            for shape in ("seed", "big") for dtype in ("fp32", "bf16") for mode in bench.MODES
            for impl, ms in (("fused", 1.2), ("eager", 3.0), ("floor", 1.0))]
    path = tmp_path / "r.png"
    bench.save_plot(rows, str(path), bench.environment())
    from PIL import Image
    with Image.open(path) as image:
        assert image.height > image.width  # four stacked panels (one would be wider than tall)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cli_bench_on_cpu_says_which_flags_it_ignores(capsys):
    assert main(["bench", "--shapes", "seed", "--modes", "fwd", "--dtypes", "fp32", "--impls", "fused,eager",
                 "--ids", "zipf"]) == 0
    assert "Note: --impls and --ids apply to the GPU tables only; ignored here." in capsys.readouterr().out


def test_plot_of_cpu_rows_labels_each_implementation_once(tmp_path, monkeypatch):
    # "fused" is a name of both the GPU's and the CPU's tables; it was once drawn (and labelled) twice.
    import matplotlib.figure
    rows = [bench.Row("seed", "fp32", "fwd", impl, "uniform", ms, 1.0, 10**9)
            for impl, ms in (("fused", 1.2), ("nn.Embedding x2", 1.3))]
    labels = []
    original = matplotlib.figure.Figure.savefig

    def savefig(figure, *args, **kwargs):
        labels.extend(text.get_text() for ax in figure.axes for text in ax.get_legend().get_texts())
        return original(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    bench.save_plot(rows, str(tmp_path / "cpu.png"), bench.environment())
    assert labels == ["fused", "nn.Embedding x2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cli_bench_on_cpu_times_the_module_beside_two_embeddings(tmp_path, capsys):
    assert main(["bench", "--shapes", "seed", "--modes", "fwd", "--dtypes", "fp32", "--json",
                 str(tmp_path / "b.json")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "No CUDA device: timing what runs on this CPU" in out
    assert "Note:" not in out  # (no GPU-only flag given)
    assert "| mode | impl | median ms | quartiles ms | x nn.Embedding x2 |" in out
    assert "GB/s" not in out and "floor" not in out.split("\n#### ")[1]
    assert out.count("| fwd | fused |") == 1 and out.count("| fwd | nn.Embedding x2 |") == 1  # the table, once
    assert "[1/1" in captured.err and "seed fp32 fwd" in captured.err  # progress on stderr, not in the table
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [row["impl"] for row in rows] == ["fused", "nn.Embedding x2"]
    for row in rows:
        assert 0 < row["ms_q1"] <= row["ms"] <= row["ms_q3"] and row["extra"]["samples"] == 15


def test_cpu_rows_compare_the_same_tables(monkeypatch):
    steps = bench._cpu_steps(TINY, torch.float32, "fwd+bwd")
    assert set(steps) == set(bench.CPU_IMPLS)
    rows = bench.run_cpu([TINY], ["fp32"], ["fwd", "fwd+bwd"], samples=4, sample_s=0.001, progress=lambda label: None)
    assert [(r.mode, r.impl) for r in rows] == [(m, i) for m in ("fwd", "fwd+bwd") for i in bench.CPU_IMPLS]
    table = bench.format_cpu_table(rows)
    for row in rows:
        baseline = next(r.ms for r in rows if r.mode == row.mode and r.impl == "nn.Embedding x2")
        assert f"| {row.mode} | {row.impl} | {row.ms:.4f} | {row.ms_q1:.4f}-{row.ms_q3:.4f} | " \
               f"{row.ms / baseline:.2f} |" in table


def test_cli_bench_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--shapes", "gpt5"])
    assert "choose from seed, gpt2-124M" in capsys.readouterr().err


@pytest.mark.skipif(not triton_ops.INTERPRETED, reason="drives the fused rows through the interpreter")
def test_compile_rows_are_timed_and_compared(monkeypatch):
    # The torch.compile baselines compile plain PyTorch (no Triton kernel of ours), so Inductor's
    # CPU backend runs them here: the same code path as on a GPU, with a C++ compiler instead.
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    impls = ["fused", "compile", "fused+dropout", "compile+dropout"]
    rows = bench.run_cuda([TINY], ["fp32"], list(bench.MODES), impls, ["uniform"], progress=lambda line: None,
                          device=TRITON_DEVICE, timer=host_timer)
    assert sorted((r.mode, r.impl) for r in rows) == sorted((m, i) for m in bench.MODES for i in impls)
    pick = {(r.impl, r.mode): r for r in rows}
    table = bench.format_table(rows)
    for fused, compiled in (("fused", "compile"), ("fused+dropout", "compile+dropout")):
        for mode in bench.MODES:
            line = next(l for l in table.splitlines() if l.startswith(f"| {mode} | {fused} |"))
            ratio = pick[(compiled, mode)].ms / pick[(fused, mode)].ms
            assert line.split("|")[9].strip() == f"{ratio:.2f}x", line  # the "vs compile" column


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite itself runs (bench/gpu_check.sh)")
def test_pytest_benchmark_suite_runs_at_a_tiny_shape_on_cpu(tmp_path):
    # The CUDA suite skips on CPU; its smoke mode runs every case once at a tiny shape through the
    # interpreted kernels and Inductor's CPU backend, so the suite is known to work before a GPU
    # session spends device time on it.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Without this run's PYTEST_* variables: under pytest-xdist, PYTEST_XDIST_WORKER would make the
    # inner pytest-benchmark think it is an xdist worker and skip saving.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(TOKEMB_FAST_BENCH_SMOKE="1", TRITON_INTERPRET="1", TOKEMB_FAST_BACKEND="auto")
    saved = tmp_path / "benchmarks.json"
    result = subprocess.run(
        # -n 0: one process (pytest.ini asks for xdist workers, under which pytest-benchmark saves nothing).
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "bench/bench_embedding.py",
         f"--benchmark-json={saved}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    cases = 3 * 2 * (3 + len(bench.DROPOUT_IMPLS))  # modes x dtypes x implementations, one shape
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{cases} passed" in result.stdout, result.stdout[-2000:]
    assert saved.exists(), result.stdout[-3000:] + result.stderr[-2000:]
    benchmarks = json.loads(saved.read_text())["benchmarks"]
    assert len(benchmarks) == cases
    groups = {b["group"] for b in benchmarks}
    assert groups == {f"tiny {d} {m}" for d in ("fp32", "bf16") for m in ("fwd", "bwd", "fwd+bwd")}
    assert all(b["extra_info"]["bytes_moved"] > 0 for b in benchmarks)


def test_tensor_parallel_bench_script_runs_on_gloo(tmp_path):
    # bench/bench_tp.py on 2 CPU processes: both layouts, the fused op checked against
    # RowwiseParallel's output before timing, a row per (layout, implementation), the JSON.
    path = tmp_path / "tp.json"
    env = {**os.environ, "TOKEMB_FAST_BACKEND": "torch"}
    result = subprocess.run([sys.executable, os.path.join("bench", "bench_tp.py"), "--nproc", "2", "--device", "cpu",
                             "--shapes", "tiny", "--json", str(path)], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(path.read_text())
    assert data["world"] == 2
    assert {(row["layout"], row["impl"]) for row in data["rows"]} == \
        {(layout, impl) for layout in ("replicate", "sequence") for impl in ("fused", "rowwise")}
    assert all(row["fwd_us"] > 0 and row["fwd+bwd_us"] > 0 for row in data["rows"])
    assert result.stdout.count("| tiny |") == 4


TINY_ENCODER = bench.Shape("tiny-encoder", 2, 6, 40, 16, 8, type_vocab_size=2)


def test_the_encoder_shape_times_the_fused_op_beside_eager_bert_embeddings(monkeypatch):
    # bert-base's rows at a tiny shape: the fused encoder op (token types, LayerNorm) beside Hugging
    # Face's BertEmbeddings arithmetic in eager PyTorch, and the floor; the outputs first agree.
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    shape = TINY_ENCODER
    inputs = bench.make_inputs(shape, torch.float32, TRITON_DEVICE)
    extra = bench.EncoderInputs(shape, torch.float32, TRITON_DEVICE)
    forwards = bench.encoder_implementations(extra)
    ids, position_ids, word, position, _ = inputs
    torch.testing.assert_close(forwards["fused"](ids, word, position, position_ids),
                               forwards["eager"](ids, word, position, position_ids), rtol=1e-5, atol=1e-5)
    rows = bench.run_cuda([shape], ["fp32"], list(bench.MODES), list(bench.ENCODER_IMPLS), ["uniform"],
                          progress=lambda line: None, device=TRITON_DEVICE, timer=host_timer)
    assert {(r.mode, r.impl) for r in rows} == {(m, i) for m in bench.MODES for i in bench.ENCODER_IMPLS}
    assert bench.SHAPES["bert-base"].describe() == "B32 T512 V30522 D768"
    table = bench.format_table(rows)
    assert "#### tiny-encoder" in table and "| fwd+bwd | fused | uniform |" in table

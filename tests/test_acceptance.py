"""bench/acceptance.py, issue #22's one-call acceptance run, checked before any device time is spent
on it: the whole run end to end at tiny shapes (kernels interpreted on a CPU; on a GPU the real
thing, graphs and profiler included), and the verdicts it draws from its measurements.
"""
import json
import os
import sys
import time

import pytest
import torch

from conftest import INTERPRETED, TRITON_DEVICE

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import acceptance  # noqa: E402

pytestmark = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                reason="drives the Triton path (interpreted or on a GPU)")


def test_a_cpu_run_without_the_interpreter_is_refused_saying_how(tmp_path, monkeypatch, capsys):
    # Without TRITON_INTERPRET=1 the fused rows would time the plain-PyTorch path and Liger's rows
    # would fail: nothing the report claims. Refused before anything runs, with the command to use.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert acceptance.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 2
    assert "TRITON_INTERPRET=1 python bench/acceptance.py --device cpu --smoke" in capsys.readouterr().err
    assert not (tmp_path / "acceptance.json").exists()


def test_a_smoke_run_that_skips_a_part_for_its_budget_says_so(tmp_path, monkeypatch, capsys):
    # Exit 0 means every part ran: a part left out for the time budget is a failure of the smoke run.
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    status = acceptance.main(["--device", TRITON_DEVICE.type, "--smoke", "--out", str(tmp_path), "--shapes", "seed",
                              "--dtypes", "fp32", "--impls", "fused,eager", "--skip", "hf", "--budget-s", "1"])
    capsys.readouterr()
    records = json.loads((tmp_path / "acceptance.json").read_text())["records"]
    assert any(r["kind"] == "skipped" and r["reason"].startswith("budget") for r in records)
    assert status == 1


def test_the_whole_run_at_tiny_shapes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    liger = acceptance.liger_function() is not None
    status = acceptance.main(["--device", TRITON_DEVICE.type, "--smoke", "--out", str(tmp_path),
                              "--shapes", "gpt2-124M,decode", "--dtypes", "fp32,bf16", "--impls", "fused,fused-scatter,eager,compile,liger",
                              "--rounds", "3",
                              "--sample-s", "0.002", "--example-runs", "1", "--example-steps", "2"])
    capsys.readouterr()
    assert status == 0  # every part ran (a smoke run's figures count toward no target)
    saved = json.loads((tmp_path / "acceptance.json").read_text())
    records, found = saved["records"], saved["verdicts"]
    assert saved["smoke"] is True and saved["environment"]["torch"] == torch.__version__
    if TRITON_DEVICE.type == "cpu":  # (it once read "CPU (CPU (x86_64)), kernels interpreted")
        device_line = saved["environment"]["device"]
        assert device_line.count("CPU") == 1 and device_line.endswith(", kernels interpreted"), device_line
    assert not [r for r in records if r["kind"] == "error"], [r for r in records if r["kind"] == "error"]

    def rows(kind, **fields):
        return [r for r in records if r["kind"] == kind and all(r.get(k) == v for k, v in fields.items())]

    for shape in ("gpt2-124M", "decode"):
        for dtype in ("fp32", "bf16"):
            for mode in ("fwd", "fwd+bwd"):
                impls = {r["impl"] for r in rows("call", shape=shape, dtype=dtype, mode=mode)}
                expected = {"fused", "fused-scatter", "eager", "compile"} | \
                    ({"liger"} if liger and dtype == "fp32" else set())
                assert impls == expected, (shape, dtype, mode, impls)
            # Every implementation checked against eager before it was timed; the fused op exactly
            # (fp32; bf16: the interpreter truncates where a GPU rounds) and deterministically.
            parity = {r["impl"]: r["rel_error"] for r in rows("parity", shape=shape, dtype=dtype)}
            if dtype == "fp32":
                assert parity["fused"] == 0.0
            for impl in ("fused", "fused-scatter"):
                assert {r["ids"]: r["equal"] for r in rows("determinism", shape=shape, dtype=dtype, impl=impl)} == \
                    {"uniform": True, "zipf": True}
            # The candidate backward gives the default's very bits.
            assert [r["equal"] for r in rows("same_bits", shape=shape, dtype=dtype)] == [True]
    skipped = " ".join(r.get("part", "") + ": " + r.get("reason", "") for r in rows("skipped"))
    if not liger:
        assert "liger-kernel is not installed" in skipped
    if TRITON_DEVICE.type == "cuda":
        assert rows("graph", impl="floor") and rows("graph", impl="fused", ids="zipf")
        assert {r["impl"] for r in rows("row_kernel")} == {"fused", "fused-scatter"}
    else:
        assert "GPU time: needs CUDA" in skipped
    assert {r["impl"] for r in rows("hf", dtype="fp32")} == {"hf-eager", "hf-swapped"}
    assert sorted(r["swapped"] for r in rows("example")) == [False, True]

    # The verdicts: every target appears, measured or said not to be; the markdown starts with them.
    targets = {v["target"].split(":")[0] for v in found}
    for wanted in ("1 per call fwd", "1 per call fwd+bwd", "2 GPU time fwd", "2 GPU time fwd+bwd",
                   "2 token gradient-row kernel / its floor", "3 per call fwd+bwd", "3 GPU time fwd+bwd",
                   "4 train_gpt2.py tokens/s", "4 Hugging Face GPT2Model embedding stage per call fwd"):
        assert wanted in targets, wanted
    report = (tmp_path / "acceptance.md").read_text()
    assert report.startswith("## Acceptance run (issue #22) - SMOKE")
    assert "| target | case | value | limit | verdict | note |" in report.split("### Per call")[0]


def _call(shape, dtype, mode, impl, ms, ids="uniform", kind="call"):
    return dict(kind=kind, shape=shape, dtype=dtype, mode=mode, impl=impl, ids=ids, ms=ms)


def _by_target(found, target, case):
    return next(v for v in found if v.target == target and v.case == case)


def test_verdicts_compare_each_target_with_its_limit():
    records = [
        _call("gpt2-124M", "fp32", "fwd", "fused", 0.035), _call("gpt2-124M", "fp32", "fwd", "eager", 0.05),  # 0.70: met
        _call("gpt2-124M", "fp32", "fwd+bwd", "fused", 0.36), _call("gpt2-124M", "fp32", "fwd+bwd", "eager", 0.7),
        _call("gpt2-124M", "fp32", "fwd+bwd", "compile", 0.36),  # equal to compile: not faster, missed
        _call("gpt2-124M", "fp32", "fwd+bwd", "liger", 0.40),
        _call("decode", "fp32", "fwd", "fused", 0.031), _call("decode", "fp32", "fwd", "eager", 0.030),
        _call("gpt2-124M", "fp32", "fwd", "fused", 0.023, kind="graph"),
        _call("gpt2-124M", "fp32", "fwd", "floor", 0.020, kind="graph"),  # 1.15: met (inclusive)
        _call("gpt2-124M", "fp32", "fwd+bwd", "fused", 0.16, kind="graph"),
        _call("gpt2-124M", "fp32", "fwd+bwd", "floor", 0.1, kind="graph"),  # 1.6: missed
        _call("gpt2-124M", "fp32", "fwd+bwd", "fused", 0.2, ids="zipf", kind="graph"),  # 1.25 x uniform: met
        dict(kind="row_kernel", shape="gpt2-124M", dtype="fp32", impl="fused", us=60.0, floor_us=50.0),  # 1.2: met
        dict(kind="determinism", shape="gpt2-124M", dtype="fp32", ids="uniform", impl="fused", equal=True),
        dict(kind="determinism", shape="gpt2-124M", dtype="fp32", ids="zipf", impl="fused", equal=False),
        dict(kind="parity", shape="gpt2-124M", dtype="fp32", impl="liger", rel_error=3e-4),
        dict(kind="example", run=1, swapped=True, tokens_per_s=100.0),
        dict(kind="example", run=1, swapped=False, tokens_per_s=90.0),
        dict(kind="hf", shape="gpt2-124M", dtype="fp32", mode="fwd", impl="hf-eager", ms=0.1),
        dict(kind="hf", shape="gpt2-124M", dtype="fp32", mode="fwd", impl="hf-swapped", ms=0.11),
    ]
    found = acceptance.verdicts(records, ("gpt2-124M", "decode"), ("fp32",))
    case = "gpt2-124M fp32"
    expect = {
        ("1 per call fwd: fused / eager", case): (0.7, True),
        ("1 per call fwd+bwd: fused / eager", case): (0.36 / 0.7, False),
        ("1 per call fwd+bwd: fused / torch.compile", case): (1.0, False),
        ("1 per call fwd: fused / eager", "decode fp32"): (0.031 / 0.030, False),
        ("2 GPU time fwd: fused / floor", case): (1.15, True),
        ("2 GPU time fwd+bwd: fused / floor", case): (1.6, False),
        ("2 GPU time fwd+bwd: Zipf ids / uniform", case): (1.25, True),
        ("2 token gradient-row kernel / its floor", case): (1.2, True),
        ("2 bitwise deterministic (uniform ids), 1 = yes", case): (1.0, True),
        ("2 bitwise deterministic (zipf ids), 1 = yes", case): (0.0, False),
        ("3 per call fwd+bwd: fused / Liger", case): (0.9, True),
        ("parity with eager: liger (max relative difference)", case): (3e-4, False),
        ("4 train_gpt2.py tokens/s: unswapped / swapped (median of each)", "GPT-2 124M"): (0.9, True),
        ("4 Hugging Face GPT2Model embedding stage per call fwd: swapped / eager", "gpt2-124M fp32"): (1.1, False),
    }
    for (target, which), (value, met) in expect.items():
        verdict = _by_target(found, target, which)
        assert verdict.value == pytest.approx(value) and verdict.met is met, (target, which, verdict)
    # What was not measured says so, and counts neither way.
    unmeasured = _by_target(found, "3 GPU time fwd+bwd: fused / Liger", case)
    assert unmeasured.value is None and unmeasured.met is None
    assert _by_target(found, "1 per call fwd+bwd: fused / eager", "decode fp32").met is None
    # Grouped by target number, in that order.
    numbers = [v.target[0] for v in found if v.target[0].isdigit()]
    assert numbers == sorted(numbers)
    report = acceptance.format_report({"device": "test"}, records, found, smoke=False)
    assert "**MISSED**" in report and "| 2 GPU time fwd+bwd: fused / floor | gpt2-124M fp32 | 1.6 | 1.5 |" in report


def test_a_missing_peer_is_reported_as_not_installed():
    found = acceptance.verdicts([_call("seed", "fp32", "fwd+bwd", "fused", 1.0)], ("seed",), ("fp32",),
                                liger_present=False)
    peer = _by_target(found, "3 per call fwd+bwd: fused / Liger", "seed fp32")
    assert peer.met is None and "liger-kernel not installed" in peer.note


def test_per_call_timing_alternates_and_tells_a_slower_call():
    calls = []

    def step(name, seconds):
        def run():
            calls.append(name)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
        return run
    # Spins of 1 and 4 ms: the ratio holds with up to 2 ms of scheduling noise per call (a loaded
    # 2-core machine once made 0.5 and 1.5 ms spins fail it).
    timed = acceptance.per_call_ms({"fast": step("fast", 0.001), "slow": step("slow", 0.004)},
                                   acceptance.Clock(torch.device("cpu")), rounds=4, sample_s=0.01)
    assert timed["fast"][1] >= 0.95 and timed["slow"][1] > 2 * timed["fast"][1]
    assert all(q1 <= median <= q3 for q1, median, q3 in timed.values())
    # After the warm-up, the samples alternate: fast's block, slow's block, fast's block, ...
    blocks = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert blocks[-8:] == ["fast", "slow"] * 4


@pytest.mark.parametrize("position_scatters", [False, True])
def test_the_token_gradient_time_from_a_profile(position_scatters):
    # What measure_kernels reads from the profile of 2 calls (CUDA only, so read here from made-up
    # durations): the row kernel's longest launches; the candidate's longest scatters plus its
    # longest fills, also when explicit position ids (decode) make the position table scatter too.
    profile = {"embedding_grad_rows_kernel": [90.0, 5.0, 91.0, 6.0],
               "void at::native::vectorized_elementwise_kernel<FillFunctor<float>>": [50.0, 1.0, 52.0, 2.0],
               "embedding_grad_scatter_kernel": [20.0, 22.0] + ([3.0, 4.0] if position_scatters else [])}
    assert acceptance.token_gradient_us(profile, 2, "fused") == [91.0, 90.0]
    assert acceptance.token_gradient_us(profile, 2, acceptance.CANDIDATE) == [21.0 + 51.0]
    assert acceptance.token_gradient_us({"embedding_grad_scatter_kernel": [20.0]}, 2, acceptance.CANDIDATE) == []
    assert acceptance.token_gradient_us({"embedding_grad_rows_kernel": [20.0]}, 2, "fused") == []


def test_kernel_durations_read_the_profiler_per_call():
    a, b = torch.randn(4096), torch.randn(4096)
    durations = acceptance.kernel_durations_us(lambda: a.add(b), iterations=4, device_type="cpu")
    assert len(durations["aten::add"]) == 4 and all(us >= 0 for us in durations["aten::add"])


def test_a_failing_part_is_recorded_and_the_run_goes_on(capsys):
    run = acceptance.Run(acceptance.main.__globals__["argparse"].Namespace(budget_s=10.0),
                         torch.device("cpu"))

    def broken():
        raise ValueError("the first line\nand more")
    assert run.attempt("a part", broken) is None
    assert run.records[-1] == {"kind": "error", "where": "a part", "error": "ValueError: the first line"}
    assert run.fits("small", 1.0) and not run.fits("too big", 60.0)
    assert run.records[-1]["kind"] == "skipped" and run.records[-1]["part"] == "too big"
    capsys.readouterr()


def test_the_candidate_is_reported_but_not_counted():
    records = [_call("seed", "fp32", "fwd+bwd", "fused", 1.0, kind="graph"),
               _call("seed", "fp32", "fwd+bwd", "fused-scatter", 1.5, kind="graph"),
               _call("seed", "fp32", "fwd", "fused", 1.0), _call("seed", "fp32", "fwd", "eager", 2.0),
               dict(kind="same_bits", shape="seed", dtype="fp32", impl="fused-scatter", equal=False)]
    found = acceptance.verdicts(records, ("seed",), ("fp32",))
    slower = _by_target(found, "c scatter / rows, GPU time fwd+bwd", "seed fp32")
    assert slower.value == pytest.approx(1.5) and slower.met is False and slower.informational
    assert _by_target(found, "c scatter: bitwise equal to rows, 1 = yes", "seed fp32").met is False
    report = acceptance.format_report({"device": "test"}, records, found, smoke=False)
    assert "**1 met, 0 missed," in report  # the fwd target only: the candidate's "no" lines count neither way
    assert "| c scatter / rows, GPU time fwd+bwd | seed fp32 | 1.5 | 1 | no |" in report
    assert found[-1].informational

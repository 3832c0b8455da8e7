"""The kernels compile for an H100 (sm_90a), without a GPU, and ptxas is content with them.

The interpreter tests check the maths; this checks what only the GPU compiler shows: that every
kernel variant compiles, nothing spills to local memory, the forward moves table rows and output
in 16-byte accesses, no multiply-add was contracted into an FMA (so the GPU rounds exactly as
the interpreter does), and each call launches the kernels the design says. It runs
bench/compile_report.py in a process of its own (it replaces Triton's driver, and the kernels
must be compiled rather than interpreted). The same way, tests/trace_triton_ops.py checks that
torch.compile(fullgraph=True) traces into the GPU path's triton_ops (the interpreter's ops are
opaque custom ops, so the other CPU compile tests cannot see this).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvidia_backend_missing():
    if torch.cuda.is_available():
        # Device time is scarce; there, the other tests compile and run the real kernels.
        return "a GPU is present: the CUDA tests compile and run the real kernels"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as exc:  # no NVIDIA backend or no ptxas in this Triton build
        return f"Triton's NVIDIA backend / ptxas unavailable: {exc}"
    return None


def _run_compiled(script, *args):
    """Run a script of this repository in a process of its own, kernels compiled for sm_90a
    (TRITON_INTERPRET unset); skip when this Triton cannot compile for it."""
    missing = _nvidia_backend_missing()
    if missing:
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("sm90") / "report.json"
    result = _run_compiled(os.path.join("bench", "compile_report.py"), "--quick", "--json", str(path))
    assert path.exists(), result.stderr[-4000:]
    data = json.loads(path.read_text())
    data["returncode"], data["stderr"] = result.returncode, result.stderr
    data["by_hash"] = {kernel["hash"]: kernel for kernel in data["kernels"]}
    return data


def test_every_case_compiles_without_spills(report):
    assert [case["case"] for case in report["cases"] if case["error"]] == [], report["stderr"][-4000:]
    spilled = [(k["kernel"], k["specialisation"], k["spill_stores"]) for k in report["kernels"]
               if k["spill_stores"] or k["spill_loads"]]
    assert spilled == []
    assert report["returncode"] == 0, report["stderr"][-4000:]
    assert len(report["cases"]) >= 7 and len(report["kernels"]) >= 10
    # Every variant family compiled at least once, the closed-form (default positions) chunk sums too.
    chunk_variants = {(k["specialisation"]["IMPLICIT_POSITIONS"], k["specialisation"]["HAS_BOUNDS"])
                      for k in report["kernels"]
                      if k["kernel"] == "segment_bounds_and_chunks_kernel" and k["specialisation"]["HAS_CHUNKS"]}
    assert chunk_variants == {(True, False), (False, True)}


def test_no_contracted_multiply_adds(report):
    fused = [(k["kernel"], k["fma"]) for k in report["kernels"] if k["fma"]]
    assert fused == []


def test_forward_uses_16_byte_accesses_when_rows_allow(report):
    # D divisible by 16 (768 here, fp32 and bf16): Triton can prove 16-byte alignment of every
    # table row and output row.
    aligned = [case for case in report["cases"] if case["dim"] % 16 == 0]
    assert len(aligned) >= 3
    for case in aligned:
        forward = report["by_hash"][case["launches"][0]["hash"]]
        if case["encoder"]:  # (and one 4-byte store per row: its mean and 1/std for the backward)
            assert forward["kernel"] == "encoder_embedding_fwd_kernel"
            assert max(forward["load_bytes"]) == 16 and forward["store_bytes"] == [4, 16], (case["case"], forward)
            continue
        assert forward["kernel"] == "input_embedding_fwd_kernel"
        assert max(forward["load_bytes"]) == 16 and forward["store_bytes"] == [16], (case["case"], forward)


def test_launches_per_forward_and_backward(report):
    for case in report["cases"]:
        kernels = [launch["kernel"] for launch in case["launches"]]
        if case["encoder"]:
            # One forward; the backward: one LayerNorm kernel, then the table-gradient kernels of the
            # word, position and token-type tables: int64 ids, each cast to 32-bit sort keys first;
            # default positions (not RoBERTa's, which are computed keys) as for the decoder op below.
            token = ["sort_keys_kernel", "segment_bounds_and_chunks_kernel", "embedding_grad_rows_kernel"]
            position = token if case["explicit_positions"] else token[1:] if case["batch"] >= 32 else token[2:]
            assert kernels == ["encoder_embedding_fwd_kernel", "encoder_embedding_bwd_kernel", *token, *position,
                               *token], case
            continue
        assert kernels.count("input_embedding_fwd_kernel") == 1 and kernels[0] == "input_embedding_fwd_kernel"
        if case["sparse"]:
            # Token grad: the masked upstream rows (the sparse values); position grad: the dense kernels.
            assert kernels[1:] == ["apply_dropout_mask_kernel", "embedding_grad_rows_kernel"], case
            continue
        # int64 ids: their 32-bit sort keys (int32 ids are sorted as they are), then the bounds and
        # chunk sums, then the rows. Position ids given are int64 in every case.
        position = ["sort_keys_kernel", "segment_bounds_and_chunks_kernel", "embedding_grad_rows_kernel"]
        token = position[1:] if case["int32_ids"] else position
        # Default positions need no sort nor search (their sorted order is known), nor, with B < 32,
        # chunk partials (their B-entry segments never cover a whole chunk): then no segments launch.
        if not case["explicit_positions"]:
            position = position[1:] if case["batch"] >= 32 else position[2:]
        assert kernels[1:] == token + position, case
        for launch in case["launches"]:
            assert all(size >= 1 for size in launch["grid"])


def test_forward_autotunes_only_large_calls(report):
    from tokemb_fast.triton_ops import AUTOTUNE_MIN_ELEMENTS, TILE

    for case in report["cases"]:
        if case["encoder"]:  # (a fixed config: whole rows per program)
            assert case["tuning_hashes"] == [], case["case"]
            continue
        forward = report["by_hash"][case["launches"][0]["hash"]]
        if case["outputs"] < AUTOTUNE_MIN_ELEMENTS:  # decode, D=100: the fixed config, nothing tried
            assert case["tuning_hashes"] == [], case["case"]
            assert forward["specialisation"]["TILE"] == TILE and forward["num_warps"] == 4, case["case"]
    first = report["cases"][0]
    assert first["outputs"] >= AUTOTUNE_MIN_ELEMENTS and len(first["tuning_hashes"]) == 5, first


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "graphs.json"
    result = _run_compiled(os.path.join("tests", "trace_triton_ops.py"), str(path))
    # fullgraph=True: a graph break anywhere is an exception, so a non-zero exit.
    assert result.returncode == 0 and path.exists(), result.stderr[-4000:]
    return json.loads(path.read_text())


def test_compile_traces_into_the_gpu_ops_fullgraph(traced):
    # The GPU path's triton_ops under Dynamo + AOT autograd (what Inductor starts from): each is
    # decomposed into its kernels as graph nodes, nothing opaque is left, and one forward and one
    # backward graph serve every call of a case (a new seq_len under dynamic=True included).
    keys, rows = "triton:sort_keys_kernel", "triton:embedding_grad_rows_kernel"
    segments = "triton:segment_bounds_and_chunks_kernel"
    # Per table: for explicit (int64) keys their 32-bit sort keys, the sort, and segments (bounds and
    # chunk sums: one launch), then rows; default positions with B < 32 need neither sort nor
    # segments. Every case here sorts once per segments launch.
    expected_backward = {
        "dropout, padding_idx, scale_grad_by_freq": [keys, segments, rows, rows],  # 15 ids, default positions
        "position_ids [B, T]": [keys, segments, rows, keys, segments, rows],
        "past_length, dynamic seq_len": [keys, segments, rows, rows],
        "autotuned forward": [keys, segments, rows, rows],  # 1024 ids; B = 1 < 32: no position chunks
        "swapped GPTModel": [keys, segments, rows, rows],
        "swapped GPT2LMHeadModel": [keys, segments, rows, keys, segments, rows],  # HF passes [1, T] positions
    }
    if importlib.util.find_spec("transformers") is None:  # the optional [hf] extra
        del expected_backward["swapped GPT2LMHeadModel"]
    assert set(traced) == set(expected_backward)
    for case, graphs in traced.items():
        assert len(graphs) == 2, (case, len(graphs))
        forward, backward = graphs
        assert not any(target.startswith("tokemb_fast") for target in forward + backward), case
        forward_kernels = [t for t in forward if t.startswith("triton:")]
        autotuned = case == "autotuned forward"  # 2^20 outputs; smaller calls take the fixed config
        assert forward_kernels == ["triton:" + ("autotuned:" if autotuned else "") + "input_embedding_fwd_kernel"]
        assert [t for t in backward if t.startswith("triton:")] == expected_backward[case], case
        assert backward.count("aten::sort.stable") == expected_backward[case].count(segments), case


def test_host_overhead_script_times_the_gpu_path():
    # bench/host_overhead.py: the GPU path's host time per call, under the same stand-in driver.
    result = _run_compiled(os.path.join("bench", "host_overhead.py"), "--calls", "20")
    assert result.returncode == 0, result.stderr[-4000:]
    # Rows are "  <label>  <number> us ...": the label is everything before the number.
    rows = {}
    for line in result.stdout.splitlines():
        if line.startswith("  ") and " us" in line:
            label, number = line.split(" us")[0].rsplit(None, 1)
            rows[label.strip()] = float(number)
    for name in ("forward", "inference", "forward+backward", "eager forward", "eager fwd+bwd"):
        assert rows.get(name, 0) > 0, result.stdout
    ratios = [line for line in result.stdout.splitlines() if line.startswith(("forward / ", "forward+backward / "))]
    assert len(ratios) == 2 and all(float(line.split(": ")[1]) > 0 for line in ratios), result.stdout


def test_planned_launches_run_the_binaries_triton_would(tmp_path):
    # tokemb_fast.launch's plans against Triton's own launches, call by call: the same binary
    # (hash), grid and arguments, for calls that differ in what Triton specialises on. The
    # script checks its own sensitivity to the key: see its docstring.
    path = tmp_path / "launches.json"
    result = _run_compiled(os.path.join("tests", "compare_planned_launches.py"), str(path))
    assert result.returncode == 0 and path.exists(), result.stderr[-4000:]
    data = json.loads(path.read_text())
    assert set(data["ordinary_paths"]) == {"triton"}
    for label, (ordinary,) in data["ordinary"].items():
        assert ordinary, label
        first, second = data["planned"][label]
        assert first == ordinary, f"{label}: the first call's launches differ from Triton's own"
        assert second == ordinary, f"{label}: the planned launches differ from Triton's own"
    # Every call's second run took plans only; first runs reuse the plans of earlier calls' keys.
    paths = data["planned_paths"]
    planned = paths.count("planned") + paths.count("call")
    assert planned >= len(paths) // 2 and planned + paths.count("triton") == 2 * len(data["ordinary_paths"])
    # Repeated plain eager forwards ran their ForwardCall (the launches above matched Triton's own).
    assert paths.count("call") >= 15, paths
    # Each mode's forward took the path it should: the ForwardCall only in plain eager calls.
    modes = data["modes"]
    assert modes["training"] == ["call"] and modes["no_grad"] == ["call"], modes
    for mode in ("torch.func.grad", "forward AD", "dispatch mode", "1-D ids", "check_ids='sync'"):
        assert modes[mode] and "call" not in modes[mode] and set(modes[mode]) <= {"planned", "triton"}, (mode, modes)
    assert modes["launch hook"] == ["triton"], modes  # a profiler's hook gets Triton's own launch

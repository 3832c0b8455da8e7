"""`tokemb-fast demo`: the seed's pipeline end to end."""
import os
import subprocess
import sys

import pytest

from tokemb_fast import triton_ops
from tokemb_fast.cli import main


def test_demo_default_run(capsys):
    assert main(["demo", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "5,145 GPT-2 tokens" in out
    assert "input ids   [8, 4]" in out
    assert "embeddings  [8, 4, 256]" in out
    assert "parity      max |fused - reference| = 0 (relative 0," in out
    assert "over 160 batches: OK" in out
    assert "time/batch  fused" in out


@pytest.mark.skipif(not triton_ops.INTERPRETED, reason="the CPU demo reaches the kernels only under TRITON_INTERPRET=1")
def test_demo_through_the_kernels(capsys, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    assert main(["demo", "--repeats", "2", "--dtype", "bfloat16", "--embedding-dim", "24"]) == 0
    out = capsys.readouterr().out
    assert "(Triton kernels on Triton's CPU interpreter (TRITON_INTERPRET=1))" in out and ": OK" in out


def test_demo_with_text_file(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("In the beginning was the word, and the word was with the embedding. " * 20)
    assert main(["demo", "--text", str(text), "--batch-size", "2", "--max-length", "8", "--stride", "3",
                 "--embedding-dim", "5", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "input ids   [2, 8]" in out and "embeddings  [2, 8, 5]" in out


def test_demo_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--text", str(tmp_path / "missing.txt")]) == 2
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["demo", "--text", str(short)]) == 2
    assert main(["demo", "--vocab-size", "100"]) == 2
    with pytest.raises(SystemExit):
        main(["demo", "--batch-size", "0"])
    err = capsys.readouterr().err
    assert "no such file" in err and "tokemb-fast demo: error: --batch-size must be >= 1" in err
    assert "usage: tokemb-fast demo " in err  # (the command's own usage, as for argparse's own errors)
    with pytest.raises(SystemExit):
        main(["demo", "--seed", "-1"])
    assert "tokemb-fast demo: error: --seed must be in 0 .. 2**64 - 1" in capsys.readouterr().err


def test_demo_fails_on_parity_mismatch(monkeypatch, capsys):
    import tokemb_fast.cli as cli
    real = cli.input_embedding_reference
    monkeypatch.setattr(cli, "input_embedding_reference", lambda *a: real(*a) * 1.001)
    assert main(["demo", "--repeats", "2"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_console_script_and_module_help():
    env = dict(os.environ, TOKEMB_FAST_BACKEND="torch")
    result = subprocess.run([sys.executable, "-m", "tokemb_fast", "demo", "--help"], capture_output=True, text=True,
                            env=env, check=True)
    for flag in ("--text", "--batch-size", "--max-length", "--stride", "--vocab-size", "--embedding-dim",
                 "--dtype", "--device", "--seed", "--repeats"):
        assert flag in result.stdout


def test_version_and_bare_command(capsys):
    from tokemb_fast import __version__
    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0
    assert capsys.readouterr().out.startswith(f"tokemb-fast {__version__} (torch ")
    assert main([]) == 0  # a bare command prints the help and succeeds
    out = capsys.readouterr().out
    assert "usage: tokemb-fast" in out and "demo" in out and "bench" in out and "info" in out
    assert "seed's" not in out and "``" not in out


def test_info_says_what_a_bug_report_needs(capsys, monkeypatch):
    import re

    import torch
    import triton

    from tokemb_fast import __version__
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "torch")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name, value in (("tokemb-fast", __version__), ("torch", torch.__version__), ("triton", triton.__version__),
                        ("TOKEMB_FAST_BACKEND", "torch"), ("TRITON_INTERPRET", ""),
                        ("a call on cpu takes", "plain PyTorch: F.embedding + F.embedding")):
        assert re.search(rf"^{re.escape(name)} +{re.escape(value)}", out, re.MULTILINE), (name, out)


def test_demo_names_the_path_plainly(capsys, monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "torch")
    assert main(["demo", "--repeats", "2"]) == 0
    assert "device      cpu (plain PyTorch: F.embedding + F.embedding), float32" in capsys.readouterr().out


def test_bench_plot_without_matplotlib_fails_at_once_in_one_line(capsys, monkeypatch, tmp_path):
    from tokemb_fast import bench
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # (an import of it now raises ImportError)
    for runner in ("run_cpu", "run_cuda"):
        monkeypatch.setattr(bench, runner, lambda *args, **kwargs: pytest.fail("timed before checking --plot"))
    assert main(["bench", "--plot", str(tmp_path / "plot.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "tokemb-fast bench: --plot needs matplotlib, which is not installed: pip install 'tokemb-fast[bench]' "
        "(or run without --plot)"]


def _latin1_file(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"\xff\xfe\x00bad")
    return str(path)


@pytest.mark.parametrize("argv, environment, message", [
    (["demo", "--device", "foo"], {}, "error: --device 'foo' is not a device"),
    (["demo", "--device", ""], {}, "error: --device '' is not a device"),
    (["demo", "--device", "meta"], {}, "error: --device meta: the demo runs on cpu or cuda"),
    (["demo", "--text", "LATIN1"], {}, "not UTF-8 text"),
    (["demo", "--seed", str(2 ** 70)], {}, r"--seed must be in 0 \.\. 2\*\*64 - 1"),
    (["demo"], {"TOKEMB_FAST_BACKEND": "bogus"}, "error: no path can run on cpu: backend must be one of"),
    (["bench", "--shapes", "seed"], {"TOKEMB_FAST_BACKEND": "bogus"}, "error: backend must be one of"),
    (["bench", "--shapes", "seed", "--json", "MISSING/out.json"], {}, "error: --json .*: cannot write a file there"),
    (["bench", "--shapes", "seed", "--plot", "TMP"], {}, "error: --plot .*: cannot write a file there"),
    (["bench", "--shapes", "seed", "--json", ""], {}, "error: --json '': cannot write a file there"),
    (["bench", "--shapes", "seed", "--plot", "TMP/out.txt"], {}, r"error: --plot .*out.txt: matplotlib cannot write \.txt"),
    (["demo", "--text", "EMPTY"], {}, "error: the text has 0 tokens"),
])
def test_bad_arguments_and_settings_exit_2_with_one_line_and_no_traceback(argv, environment, message, tmp_path,
                                                                         monkeypatch, capsys):
    # Each of these once ended in a Python traceback and exit status 1 (bench's paths only after the
    # whole timing run). (TOKEMB_FAST_BACKEND=triton without the interpreter: test_info's twin.)
    import re
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "empty.txt").write_text("")
    argv = [{"LATIN1": _latin1_file(tmp_path), "MISSING/out.json": str(tmp_path / "missing" / "out.json"),
             "TMP": str(tmp_path), "TMP/out.txt": str(tmp_path / "out.txt"),
             "EMPTY": str(tmp_path / "empty.txt")}.get(arg, arg) for arg in argv]
    if "--seed" in argv:  # (argparse's own error: SystemExit(2))
        with pytest.raises(SystemExit) as exited:
            main(argv)
        status = exited.value.code
    else:
        status = main(argv)
    captured = capsys.readouterr()
    assert status == 2
    assert re.search(message, captured.err) and "Traceback" not in captured.err + captured.out
    assert "tokemb-fast bench on" not in captured.out and "[1/" not in captured.err  # nothing was timed


def test_an_existing_writable_file_in_a_read_only_folder_is_writable(tmp_path):
    # (Once refused: the folder's permission was asked even for a file that exists.)
    from tokemb_fast.cli import _writable
    folder = tmp_path / "ro"
    folder.mkdir()
    existing = folder / "b.json"
    existing.write_text("{}")
    folder.chmod(0o555)
    try:
        assert _writable(str(existing), "--json")
        assert _writable(str(folder / "new.json"), "--json") == os.access(folder, os.W_OK)  # (root may write)
        assert not _writable("", "--json") and not _writable(str(folder), "--json")
    finally:
        folder.chmod(0o755)

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
    assert "triton (Triton's CPU interpreter" in out and ": OK" in out


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
    assert "no such file" in err and "--batch-size must be >= 1" in err


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

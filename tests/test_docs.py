"""Every Python code block in README.md and docs/ runs as written.

A block runs in a fresh namespace, in a temporary directory (blocks may write files), with the
default backend. A block that cannot run on this machine says so just before its fence, in an
HTML comment the rendered page hides:

    <!-- doc-test: needs cuda (why) -->       runs only where CUDA is available
    <!-- doc-test: skip (why and where it is covered) -->   never runs here

A block whose optional dependency (an extra, or the llms-from-scratch package) is not installed
is skipped, naming it; CI installs them all.
"""
import glob
import os
import re
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
OPTIONAL = ("llms_from_scratch", "transformers", "onnx", "onnxscript", "onnxruntime", "matplotlib")
FENCE = re.compile(r"(?:<!-- doc-test: (?P<marker>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks():
    found = []
    for page in PAGES:
        text = open(page, encoding="utf-8").read()
        for index, match in enumerate(FENCE.finditer(text)):
            line = text[:match.start("code")].count("\n") + 1
            found.append(pytest.param(page, line, match.group("marker"), match.group("code"),
                                      id=f"{os.path.relpath(page, ROOT)}:{line}"))
    return found


def test_the_pages_have_python_blocks():
    assert len(blocks()) >= 6  # (a broken pattern would find none and test nothing)


@pytest.mark.parametrize("page, line, marker, code", blocks())
def test_python_block_runs(page, line, marker, code, tmp_path, monkeypatch):
    if marker:
        if marker.startswith("needs cuda"):
            if not torch.cuda.is_available():
                pytest.skip(f"the block {marker}")
        elif marker.startswith("skip"):
            pytest.skip(f"the block is marked: {marker}")
        else:
            pytest.fail(f"unknown doc-test marker {marker!r} before {page}:{line}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TOKEMB_FAST_BACKEND", raising=False)
    with warnings.catch_warnings():
        # (PyTorch's own notices while exporting and tracing; the blocks' own code warns of nothing.)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__doc_block__"})
        except ModuleNotFoundError as error:
            if error.name and error.name.split(".")[0] in OPTIONAL:
                pytest.skip(f"needs {error.name}, which is not installed")
            raise

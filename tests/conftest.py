"""Test setup: on a machine without CUDA, run the Triton kernels under Triton's CPU interpreter.

TRITON_INTERPRET must be set before tokemb_fast (and so the kernels) is imported, which is why
it happens here, at conftest import. On a CUDA machine the real compiled kernels are tested.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny GPT models of the families swap_input_embeddings knows live with the examples.
sys.path.insert(0, os.path.join(ROOT, "examples"))
# `python -m pytest` puts the checkout's root first on the path, where kernels/ (this project's
# Triton source, installed as tokemb_fast.kernels) would hide PyPI's package named `kernels`, which
# transformers imports when it is installed (5.25 requires it): the root goes last instead.
_at_root = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) == ROOT]
if _at_root:
    sys.path[:] = [entry for entry in sys.path if entry not in _at_root] + [ROOT]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tokemb_fast import triton_ops  # noqa: E402  (imports the kernels, after the line above)

INTERPRETED = triton_ops.INTERPRETED
#: Where the Triton path runs in this session: CUDA if there is one, else CPU tensors through
#: the interpreter.
TRITON_DEVICE = torch.device("cuda") if torch.cuda.is_available() and not INTERPRETED else torch.device("cpu")

#: The paths a test can take: plain PyTorch always; the Triton kernels where they can run here.
BACKENDS = ["torch"] + (["triton"] if INTERPRETED or torch.cuda.is_available() else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the test once per path, selected through TOKEMB_FAST_BACKEND."""
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def kernel_launches(monkeypatch):
    """Every Triton launch made through tokemb_fast.launch, as (kernel name, "cached" | "triton")."""
    from tokemb_fast import launch
    launches = []
    monkeypatch.setattr(launch, "PATHS", launches)
    return launches


def launches_of(launches, kernel_name):
    return sum(1 for name, _path in launches if name == kernel_name)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the interpreter twin "
                                   "of this test checks the same maths on CPU")


@pytest.fixture(autouse=True)
def _no_unraised_id_errors():
    """A test that leaves a recorded bad id unraised would make some later test's call raise it."""
    yield
    from tokemb_fast import check_ids_now
    check_ids_now()


@pytest.fixture(autouse=True)
def _fresh_seed():
    """A different seed each run, so parity is checked on fresh inputs; pytest shows the printed
    seed of a failing test (rerun it with TOKEMB_FAST_TEST_SEED=that)."""
    env = os.environ.get("TOKEMB_FAST_TEST_SEED")
    seed = int(env) if env else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"TOKEMB_FAST_TEST_SEED={seed}")

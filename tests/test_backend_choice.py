"""Which path a call takes: TOKEMB_FAST_BACKEND=auto|triton|torch and the backend= argument."""
import pytest
import torch

from tokemb_fast import fused_input_embedding, triton_ops


def grad_fn_name(**kwargs):
    ids = torch.randint(0, 10, (2, 3))
    weights = torch.randn(10, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    return type(fused_input_embedding(ids, *weights, **kwargs).grad_fn).__name__


def test_auto_on_cpu_is_plain_pytorch(monkeypatch):
    monkeypatch.delenv("TOKEMB_FAST_BACKEND", raising=False)
    assert grad_fn_name() == "AddBackward0"
    assert grad_fn_name(backend="auto") == "AddBackward0"


@pytest.mark.skipif(not triton_ops.INTERPRETED, reason="CPU tensors reach the kernels only under TRITON_INTERPRET=1")
def test_env_var_forces_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    assert grad_fn_name() == "FusedInputEmbeddingFunctionBackward"
    # The argument wins over the environment.
    assert grad_fn_name(backend="torch") == "AddBackward0"


def test_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(triton_ops, "INTERPRETED", False)
    from tokemb_fast import functional
    monkeypatch.setattr(functional, "_prepared", {})  # checks cached by an earlier call with the interpreter on
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 in the environment before importing tokemb_fast"):
        grad_fn_name(backend="triton")


def test_the_module_says_which_path_ran(monkeypatch):
    from tokemb_fast import FusedInputEmbedding, backend_name
    module = FusedInputEmbedding(10, 4, 3)
    # Named as the attribute it shows: once read as the constructor's backend argument.
    assert module.last_backend is None and "last_backend=None (a call would take 'torch')" in repr(module)
    assert "backend=" not in repr(module).replace("last_backend=", "")
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "torch")
    module(torch.tensor([[1, 2]]))
    assert module.last_backend == "torch" and backend_name("cpu") == "torch"
    assert "last_backend='torch'" in repr(module) and "would take" not in repr(module)
    if triton_ops.INTERPRETED:
        monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
        module(torch.tensor([[1, 2]]))
        assert module.last_backend == "triton-interpreter" == backend_name("cpu")
        assert "last_backend='triton-interpreter'" in repr(module)
    meta = FusedInputEmbedding(10, 4, 3, device="meta")
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    assert "last_backend=None (no path can run: backend 'triton' runs on CUDA tensors (or CPU tensors under " \
           "TRITON_INTERPRET=1), not on meta tensors)" in repr(meta)
    assert "backend='triton', last_backend=None" in repr(FusedInputEmbedding(10, 4, 3, backend="triton", device="meta"))


def test_the_module_takes_a_backend_of_its_own(monkeypatch):
    from tokemb_fast import FusedInputEmbedding
    monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton" if triton_ops.INTERPRETED else "torch")
    module = FusedInputEmbedding(10, 4, 3, backend="torch")  # wins over the environment
    module(torch.tensor([[1, 2]]))
    assert module.last_backend == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedInputEmbedding(10, 4, 3, backend="cuda")

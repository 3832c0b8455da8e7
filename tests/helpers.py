"""Shared test helpers: float64 oracles, tolerances, id distributions, output poisoning, counted
fused calls."""
import contextlib

import torch

from tokemb_fast import FusedInputEmbedding, input_embedding_reference

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Tolerances against an exact float64 result computed from the same (already rounded) table
# values. The kernels sum in fp32 (fp64 for fp64) and round once, so the error is one rounding
# of the output dtype: half an ulp on a GPU, up to one ulp under the interpreter, whose fp32 ->
# bf16/fp16 stores truncate. One ulp relative is 2^-7 for bf16 and 2^-10 for fp16. fp32 adds
# the accumulation error of summing up to a few hundred rows (~n * 2^-24 relative).
# atol covers sums that cancel to near zero, where a relative bound means nothing.
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2.0 ** -10, atol=1e-4),
    torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-3),
}


def assert_exact_within(got, exact, dtype, what=""):
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert not torch.isnan(got).any(), f"{what}: NaN (unwritten or poisoned element)"
    torch.testing.assert_close(got.double(), exact.double(), **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


def random_tables(vocab_size, num_positions, dim, dtype, device, requires_grad=True):
    token_weight = torch.randn(vocab_size, dim, dtype=dtype, device=device, requires_grad=requires_grad)
    position_weight = torch.randn(num_positions, dim, dtype=dtype, device=device, requires_grad=requires_grad)
    return token_weight, position_weight


def id_distribution(kind, shape, vocab_size, dtype=torch.int64, device="cpu"):
    """Adversarial and ordinary id layouts for gradient tests."""
    n = 1
    for s in shape:
        n *= s
    if kind == "uniform":
        ids = torch.randint(0, vocab_size, (n,))
    elif kind == "all_equal":
        ids = torch.full((n,), int(torch.randint(0, vocab_size, ())))
    elif kind == "distinct":
        assert n <= vocab_size
        ids = torch.randperm(vocab_size)[:n]
    elif kind == "zipf":
        # P(rank k) ~ 1/k: a few ids take most of the batch, as in real text.
        weights = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
        ids = torch.randperm(vocab_size)[torch.multinomial(weights, n, replacement=True)]
    elif kind == "edges":
        ids = torch.tensor([0, vocab_size - 1])[torch.randint(0, 2, (n,))]
    else:
        raise ValueError(kind)
    return ids.reshape(shape).to(dtype=dtype, device=device)


def exact_reference(input_ids, token_weight, position_weight, grad_out, position_ids=None, past_length=0, **options):
    """Output and both table gradients in float64 from the same table values."""
    tok64 = token_weight.detach().double().requires_grad_()
    pos64 = position_weight.detach().double().requires_grad_()
    out = input_embedding_reference(input_ids, tok64, pos64, position_ids, past_length, **options)
    grad_tok, grad_pos = torch.autograd.grad(out, (tok64, pos64), grad_out.double())
    return out.detach(), grad_tok, grad_pos


@contextlib.contextmanager
def poisoned_allocations():
    """Make torch.empty return NaN-filled (floats) or -12345-filled (ints) tensors.

    The kernels allocate their outputs with torch.empty; under this context an element that no
    program writes stays NaN, and an unwritten gradient row (which must be zero) is caught.
    """
    original = torch.empty

    def empty(*args, **kwargs):
        tensor = original(*args, **kwargs)
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        elif tensor.dtype != torch.bool:
            tensor.fill_(-12345)
        return tensor

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = original


def counting_fused_calls(monkeypatch, module_class=FusedInputEmbedding):
    """A list that gets one entry per call of module_class's forward (FusedInputEmbedding, or
    FusedEncoderEmbedding): a swapped model's fused path on either backend, told apart from its
    unfused fallback, which gives the same outputs."""
    calls, forward = [], module_class.forward
    monkeypatch.setattr(module_class, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls

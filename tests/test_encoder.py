"""The encoder op, ``fused_encoder_embedding``: dropout(LayerNorm(word + token type + position)).

Against float64 references on both paths. The plain path is PyTorch's own ops in Hugging Face's
order, so it matches them exactly; the kernels sum in fp32 and reduce each row's mean and
variance in their own order, which moves the last bits of the LayerNorm: the tolerances below are
one or two fp32 roundings of a normalised row (values of order 1), and fp64 agrees to 1e-12.
"""
import pytest
import torch
from torch.nn import functional as F

from conftest import TRITON_DEVICE
from helpers import poisoned_allocations
from tokemb_fast import (FusedEncoderEmbedding, check_ids_now, encoder_embedding_reference, fused_encoder_embedding,
                         positions_from_padding)

DEVICE = TRITON_DEVICE
VOCAB, POSITIONS, TYPES, DIM = 40, 24, 3, 20
# One fp32 rounding of a normalised row: the kernels' LayerNorm reduces in another order than PyTorch's.
LN_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
                torch.bfloat16: dict(rtol=2 ** -7, atol=2e-2), torch.float16: dict(rtol=2 ** -10, atol=4e-3)}


def tables(dtype=torch.float32, types=TYPES, requires_grad=True):
    def make(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(requires_grad)
    return dict(word_weight=make(VOCAB, DIM), position_weight=make(POSITIONS, DIM),
                token_type_weight=make(types, DIM) if types else None,
                layer_norm_weight=make(DIM), layer_norm_bias=make(DIM))


def exact(ids, weights, grad_out, **kwargs):
    """Output and gradients of the reference in float64 from the same (rounded) values."""
    leaves = {name: None if tensor is None else tensor.detach().double().requires_grad_()
              for name, tensor in weights.items()}
    out = encoder_embedding_reference(ids, leaves["word_weight"], leaves["position_weight"],
                                      leaves["token_type_weight"], layer_norm_weight=leaves["layer_norm_weight"],
                                      layer_norm_bias=leaves["layer_norm_bias"], **kwargs)
    present = [name for name, tensor in leaves.items() if tensor is not None]
    grads = torch.autograd.grad(out, [leaves[name] for name in present], grad_out.double())
    return out.detach(), dict(zip(present, grads))


def call(ids, weights, **kwargs):
    return fused_encoder_embedding(ids, weights["word_weight"], weights["position_weight"],
                                   weights["token_type_weight"], layer_norm_weight=weights["layer_norm_weight"],
                                   layer_norm_bias=weights["layer_norm_bias"], **kwargs)


POSITION_MODES = {
    "default": lambda ids: {},
    "past_length": lambda ids: {"past_length": 3},
    "position_ids [B, T]": lambda ids: {"position_ids": torch.randint(0, POSITIONS, ids.shape, device=DEVICE)},
    "position_ids [1, T]": lambda ids: {"position_ids": torch.randperm(POSITIONS, device=DEVICE)[:ids.shape[1]][None]},
    "from padding": lambda ids: {"pad_position_id": 1},
    "from padding, past_length": lambda ids: {"pad_position_id": 1, "past_length": 2},
}


@pytest.mark.parametrize("mode", POSITION_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_output_and_every_gradient_match_the_reference(backend, mode, dtype):
    weights = tables(dtype)
    ids = torch.randint(0, VOCAB, (3, 9), device=DEVICE)
    ids[0, :3] = 1  # left padding (pad id 1), and a right-padded row
    ids[2, -2:] = 1
    types = torch.randint(0, TYPES, (3, 9), device=DEVICE)
    kwargs = POSITION_MODES[mode](ids)
    grad_out = torch.randn(3, 9, DIM, dtype=dtype, device=DEVICE)
    expected, expected_grads = exact(ids, weights, grad_out, token_type_ids=types, **kwargs)
    with poisoned_allocations():
        out = call(ids, weights, token_type_ids=types, backend=backend, **kwargs)
    tolerance = LN_TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, **tolerance)
    out.backward(grad_out)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(weights[name].grad.double(), grad, **tolerance, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_rounds_once(backend, dtype):
    weights = tables(dtype, requires_grad=False)
    ids = torch.randint(0, VOCAB, (2, 7), device=DEVICE)
    out = call(ids, weights, backend=backend)
    expected, _ = exact(ids, weights, torch.zeros(2, 7, DIM, device=DEVICE))
    # The plain path rounds each add to the table dtype (as eager PyTorch does); the kernels add in
    # fp32 and round once: both within a few half-precision ulps of the exact result.
    tolerance = dict(LN_TOLERANCE[dtype])
    tolerance["atol"] *= 4
    torch.testing.assert_close(out.double(), expected, **tolerance)


def test_no_token_types_no_layer_norm_and_one_dim_ids(backend):
    weights = tables(types=0)
    ids = torch.randint(0, VOCAB, (7,), device=DEVICE)
    out = fused_encoder_embedding(ids, weights["word_weight"], weights["position_weight"], layer_norm=False,
                                  backend=backend)
    expected = weights["word_weight"][ids] + weights["position_weight"][:7]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with_ln = fused_encoder_embedding(ids, weights["word_weight"], weights["position_weight"],
                                      layer_norm_weight=weights["layer_norm_weight"], backend=backend)
    torch.testing.assert_close(with_ln, F.layer_norm(expected, (DIM,), weights["layer_norm_weight"], None, 1e-12),
                               **LN_TOLERANCE[torch.float32])


def test_roberta_positions_are_huggingfaces(backend):
    ids = torch.tensor([[1, 1, 5, 6, 7], [5, 6, 1, 7, 1]], device=DEVICE)
    assert positions_from_padding(ids, 1).tolist() == [[1, 1, 2, 3, 4], [2, 3, 1, 4, 1]]
    assert positions_from_padding(ids, 1, past_length=3).tolist() == [[1, 1, 5, 6, 7], [5, 6, 1, 7, 1]]
    weights = tables(requires_grad=False)
    got = fused_encoder_embedding(ids, weights["word_weight"], weights["position_weight"], layer_norm=False,
                                  pad_position_id=1, backend=backend)
    expected = weights["word_weight"][ids] + weights["position_weight"][positions_from_padding(ids, 1)]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["default", "from padding", "position_ids [B, T]"])
def test_gradcheck_and_gradgradcheck_in_float64(backend, mode):
    # Small tables: the numerical Jacobians take a call per element (interpreted kernels are slow).
    vocab, num_positions, dim = 6, 8, 4
    weights = dict(word_weight=torch.randn(vocab, dim), position_weight=torch.randn(num_positions, dim),
                   token_type_weight=torch.randn(2, dim), layer_norm_weight=torch.randn(dim),
                   layer_norm_bias=torch.randn(dim))
    weights = {name: tensor.to(DEVICE, torch.float64).requires_grad_() for name, tensor in weights.items()}
    ids = torch.randint(0, vocab, (2, 3), device=DEVICE)
    ids[1, 0] = 1
    types = torch.randint(0, 2, (2, 3), device=DEVICE)
    kwargs = POSITION_MODES[mode](ids)
    if "position_ids" in kwargs:
        kwargs["position_ids"] = torch.randint(0, num_positions, (2, 3), device=DEVICE)
    names = list(weights)

    def function(*tensors):
        return call(ids, dict(zip(names, tensors)), token_type_ids=types, backend=backend, **kwargs)

    inputs = tuple(weights[name] for name in names)
    # Every element of the Jacobians for RoBERTa's positions (the most involved mode); PyTorch's
    # fast mode (random projections of them, which a wrong derivative fails too) for the others.
    fast = mode != "from padding"
    assert torch.autograd.gradcheck(function, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(function, inputs, fast_mode=fast)


def test_dropout_keeps_one_minus_p_scaled_and_the_backward_uses_the_same_mask(backend):
    weights = tables(requires_grad=True)
    ids = torch.randint(0, VOCAB, (8, 16), device=DEVICE)
    clean = call(ids, weights, backend=backend).detach()
    out = call(ids, weights, dropout_p=0.25, backend=backend)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.05
    torch.testing.assert_close(out[kept], clean[kept] / 0.75, **LN_TOLERANCE[torch.float32])
    out.sum().backward()  # LayerNorm's bias gradient is the sum of the upstream gradient over kept elements
    torch.testing.assert_close(weights["layer_norm_bias"].grad, kept.float().sum((0, 1)) / 0.75, rtol=1e-5, atol=1e-5)
    assert torch.equal(call(ids, weights, dropout_p=0.25, training=False, backend=backend), clean)


def test_the_backward_is_deterministic(backend):
    weights = tables()
    ids = torch.full((6, 10), 3, device=DEVICE)  # every row on the same word
    grad_out = torch.randn(6, 10, DIM, device=DEVICE)
    runs = []
    for _ in range(2):
        for tensor in weights.values():
            tensor.grad = None
        call(ids, weights, backend=backend).backward(grad_out)
        runs.append([tensor.grad.clone() for tensor in weights.values()])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_bad_ids_raise_naming_them_and_unchecked_ones_are_nan_rows(backend):
    weights = tables()
    ids = torch.tensor([[1, 2, 3]], device=DEVICE)
    with pytest.raises(IndexError, match="token type id 5 is out of range for a token-type table of 3 rows"):
        call(ids, weights, token_type_ids=torch.tensor([[0, 5, 1]], device=DEVICE), backend=backend).sum().backward()
    with pytest.raises(IndexError, match="token id 40 is out of range for vocab size 40"):
        call(torch.tensor([[1, 40]], device=DEVICE), weights, backend=backend).sum().backward()
    with pytest.raises(IndexError, match="position id 24 is out of range"):
        call(ids, weights, position_ids=torch.tensor([[0, 24, 1]], device=DEVICE), backend=backend).sum().backward()
    for tensor in weights.values():
        tensor.grad = None
    out = call(torch.tensor([[1, 99, 3]], device=DEVICE), weights, check_ids=False, backend=backend)
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, [0, 2]]).all()
    out.nan_to_num(0.0).sum().backward()
    assert all(torch.isfinite(tensor.grad).all() for tensor in weights.values())
    check_ids_now()


def test_the_module_loads_a_hugging_face_state_dict_and_matches_bert_embeddings(backend):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=DIM, max_position_embeddings=POSITIONS,
                                     type_vocab_size=TYPES, num_attention_heads=4, pad_token_id=0)
    bert = transformers.models.bert.modeling_bert.BertEmbeddings(config).to(DEVICE).eval()
    module = FusedEncoderEmbedding(VOCAB, POSITIONS, DIM, type_vocab_size=TYPES, padding_idx=0, device=DEVICE)
    module.load_state_dict(bert.state_dict())
    assert list(module.state_dict()) == list(bert.state_dict())
    module.eval()
    ids = torch.randint(0, VOCAB, (2, 8), device=DEVICE)
    types = torch.randint(0, TYPES, (2, 8), device=DEVICE)
    with torch.no_grad():
        expected = bert(input_ids=ids, token_type_ids=types)
        for fused in (module, FusedEncoderEmbedding.from_embeddings(bert)):
            torch.testing.assert_close(fused(ids, token_type_ids=types), expected,
                                       **(dict(rtol=0, atol=0) if backend == "torch" else LN_TOLERANCE[torch.float32]))
    assert module.last_backend == ("torch" if backend == "torch" else
                                   "triton-interpreter" if DEVICE.type == "cpu" else "triton")
    assert "token_types=3" in repr(module)


def test_from_embeddings_refuses_what_the_op_does_not_do():
    word, position = torch.nn.Embedding(10, 4, max_norm=1.0), torch.nn.Embedding(6, 4)
    with pytest.raises(ValueError, match="word_embeddings has max_norm set, which the encoder op does not support"):
        FusedEncoderEmbedding.from_embeddings(word_embeddings=word, position_embeddings=position)
    with pytest.raises(TypeError, match="layer_norm must be an nn.LayerNorm over the last dimension"):
        FusedEncoderEmbedding.from_embeddings(word_embeddings=torch.nn.Embedding(10, 4), position_embeddings=position,
                                              layer_norm=torch.nn.LayerNorm(8))
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile FusedEncoderEmbedding"):
        torch.jit.script(FusedEncoderEmbedding(10, 6, 4))


def test_an_inference_call_with_a_bad_id_raises_at_the_next_call(backend):
    if backend != "triton":
        pytest.skip("the plain path raises at once (F.embedding checks every id)")
    weights = tables(requires_grad=False)
    with torch.no_grad():
        call(torch.tensor([[1, 2]], device=DEVICE), weights, token_type_ids=torch.tensor([[0, 7]], device=DEVICE),
             backend=backend)
        with pytest.raises(IndexError, match="token type id 7"):
            call(torch.tensor([[1, 2]], device=DEVICE), weights, backend=backend)


def test_double_backward_with_unchecked_bad_ids_adds_nothing_for_them(backend):
    weights = tables(torch.float64)
    ids = torch.tensor([[1, 99, 3]], device=DEVICE)
    out = call(ids, weights, check_ids=False, backend=backend)
    loss = out.nan_to_num(0.0).square().sum()
    grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
    sum(grad.sum() for grad in grads).backward()
    assert all(torch.isfinite(tensor.grad).all() for tensor in weights.values())


def test_strided_and_transposed_tables_give_the_same_result(backend):
    weights = tables(requires_grad=False)
    ids = torch.randint(0, VOCAB, (2, 5), device=DEVICE)
    expected = call(ids, weights, backend=backend)
    strided = dict(weights)
    strided["word_weight"] = weights["word_weight"].t().contiguous().t()  # column stride VOCAB
    wide = torch.randn(POSITIONS, DIM + 3, device=DEVICE)
    wide[:, :DIM] = weights["position_weight"]
    strided["position_weight"] = wide[:, :DIM]  # row stride DIM + 3
    spaced = torch.randn(2 * DIM, device=DEVICE)
    spaced[::2] = weights["layer_norm_weight"]
    strided["layer_norm_weight"] = spaced[::2]  # stride 2
    torch.testing.assert_close(call(ids, strided, backend=backend), expected, rtol=1e-6, atol=1e-6)

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


@pytest.mark.parametrize("token_types", ["given", "default (all type 0)"])
def test_the_padding_row_of_every_table_gets_no_gradient(backend, token_types):
    # nn.Embedding's padding_idx on each table, the token-type one included (it was once ignored
    # there: its padding row got a gradient); negative indices count from the end.
    weights = tables()
    ids = torch.randint(0, VOCAB, (3, 9), device=DEVICE)
    ids[0, :2] = 5
    types = torch.randint(0, TYPES, (3, 9), device=DEVICE) if token_types == "given" else None
    padding = dict(padding_idx=5, position_padding_idx=-POSITIONS + 2, token_type_padding_idx=0)
    grad_out = torch.randn(3, 9, DIM, device=DEVICE)
    expected, expected_grads = exact(ids, weights, grad_out, token_type_ids=types, padding_idx=5,
                                     position_padding_idx=2, token_type_padding_idx=0)
    out = call(ids, weights, token_type_ids=types, backend=backend, **padding)
    torch.testing.assert_close(out.double(), expected, **LN_TOLERANCE[torch.float32])
    out.backward(grad_out)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(weights[name].grad.double(), grad, **LN_TOLERANCE[torch.float32], msg=name)
    for name, row in (("word_weight", 5), ("position_weight", 2), ("token_type_weight", 0)):
        assert torch.equal(weights[name].grad[row], torch.zeros(DIM, device=DEVICE)), name
    if token_types == "given":
        assert weights["token_type_weight"].grad[1:].abs().sum() > 0
    # Double backward (the differentiable gradients) honours them too.
    for tensor in weights.values():
        tensor.grad = None
    out = call(ids, weights, token_type_ids=types, backend=backend, **padding)
    grads = torch.autograd.grad(out, [weights["token_type_weight"], weights["word_weight"]], grad_out,
                                create_graph=True)
    assert torch.equal(grads[0][0].detach(), torch.zeros(DIM, device=DEVICE))
    assert torch.equal(grads[1][5].detach(), torch.zeros(DIM, device=DEVICE))


def test_the_module_takes_the_token_type_tables_padding_idx(backend):
    torch.manual_seed(0)
    module = FusedEncoderEmbedding(VOCAB, POSITIONS, DIM, type_vocab_size=TYPES, token_type_padding_idx=1,
                                   backend=backend).to(DEVICE)
    assert module.token_type_embeddings.padding_idx == 1
    wrapped = FusedEncoderEmbedding.from_embeddings(
        word_embeddings=module.word_embeddings, position_embeddings=module.position_embeddings,
        token_type_embeddings=module.token_type_embeddings, layer_norm=module.LayerNorm, backend=backend)
    ids = torch.randint(0, VOCAB, (2, 6), device=DEVICE)
    types = torch.tensor([[0, 1, 2, 1, 0, 1]] * 2, device=DEVICE)
    wrapped(ids, types).square().sum().backward()
    assert torch.equal(module.token_type_embeddings.weight.grad[1], torch.zeros(DIM, device=DEVICE))
    assert module.token_type_embeddings.weight.grad[[0, 2]].abs().sum() > 0
    with pytest.raises(ValueError, match="token_type_padding_idx was given but there is no token-type table"):
        FusedEncoderEmbedding(VOCAB, POSITIONS, DIM, type_vocab_size=0, token_type_padding_idx=0)
    with pytest.raises(ValueError, match="token type padding_idx 3 is outside the token type table of 3 rows"):
        FusedEncoderEmbedding(VOCAB, POSITIONS, DIM, type_vocab_size=3, token_type_padding_idx=3)
    weights = tables(types=0)
    with pytest.raises(ValueError, match="token_type_padding_idx was given but there is no token_type_weight"):
        call(ids, weights, token_type_padding_idx=0, backend=backend)


def test_batched_upstream_gradients_match_one_at_a_time(backend):
    # autograd.grad(is_grads_batched=True), jacobian(vectorize=True) and gradcheck's
    # check_batched_grad hand the backward a batched gradient without storage; the kernels cannot
    # read one (they once failed: "Cannot access data pointer"), PyTorch's ops can.
    weights = tables(torch.float64)
    ids = torch.randint(0, VOCAB, (2, 5), device=DEVICE)
    types = torch.randint(0, TYPES, (2, 5), device=DEVICE)
    out = call(ids, weights, token_type_ids=types, backend=backend)
    upstream = torch.randn(3, *out.shape, dtype=torch.float64, device=DEVICE)
    leaves = [weights["word_weight"], weights["token_type_weight"], weights["layer_norm_weight"]]
    batched = torch.autograd.grad(out, leaves, upstream, retain_graph=True, is_grads_batched=True)
    for index in range(3):
        one = torch.autograd.grad(out, leaves, upstream[index], retain_graph=True)
        for got, expected in zip(batched, one):
            torch.testing.assert_close(got[index], expected, rtol=1e-12, atol=1e-12)


def test_layer_norm_parameters_take_the_tables_dtype_or_fp32_for_half_tables(backend):
    # PyTorch's layer_norm rule, on both paths alike (the kernels once took any float dtype, the plain
    # path raised PyTorch's "mixed dtype (CPU)").
    ids = torch.randint(0, VOCAB, (2, 5), device=DEVICE)
    weights = tables()
    weights["layer_norm_weight"] = weights["layer_norm_weight"].detach().double()
    with pytest.raises(ValueError, match="layer_norm_weight is torch.float64 but the tables are torch.float32"):
        call(ids, weights, backend=backend)
    mixed = tables()  # bf16 tables, an fp32 weight and a bf16 bias: each allowed alone, not together
    for name in ("word_weight", "position_weight", "token_type_weight", "layer_norm_bias"):
        mixed[name] = mixed[name].detach().to(torch.bfloat16)
    with pytest.raises(ValueError, match="layer_norm_weight is torch.float32 but layer_norm_bias is torch.bfloat16"):
        call(ids, mixed, backend=backend)
    half = tables()  # bf16 tables; the LayerNorm's parameters stay fp32 (mixed precision)
    for name in ("word_weight", "position_weight", "token_type_weight"):
        half[name] = half[name].detach().to(torch.bfloat16).requires_grad_()
    out = call(ids, half, backend=backend)
    assert out.dtype == torch.bfloat16
    expected, expected_grads = exact(ids, half, torch.ones(2, 5, DIM, device=DEVICE))
    torch.testing.assert_close(out.double(), expected, **LN_TOLERANCE[torch.bfloat16])
    out.float().sum().backward()
    assert half["layer_norm_weight"].grad.dtype == torch.float32 and half["word_weight"].grad.dtype == torch.bfloat16
    torch.testing.assert_close(half["layer_norm_weight"].grad.double(), expected_grads["layer_norm_weight"],
                               rtol=2 ** -6, atol=5e-2)


def test_numpy_eps_and_a_negative_pad_position_id(backend):
    import numpy as np
    weights = tables(requires_grad=False)
    ids = torch.randint(0, VOCAB, (2, 5), device=DEVICE)
    # A numpy eps, as an nn.LayerNorm built from a config may hold, is a number like any other.
    torch.testing.assert_close(call(ids, weights, layer_norm_eps=np.float32(1e-5), backend=backend),
                               call(ids, weights, layer_norm_eps=float(np.float32(1e-5)), backend=backend))
    with pytest.raises(ValueError, match=r"pad_position_id must be the pad token id \(>= 0\) or None, got -1"):
        call(ids, weights, pad_position_id=-1, backend=backend)
    with pytest.raises(ValueError, match=r"pad_position_id must be the pad token id \(>= 0\) or None, got -2"):
        FusedEncoderEmbedding(VOCAB, POSITIONS, DIM, pad_position_id=-2)


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

"""swap_input_embeddings on the Hugging Face encoder families, from tiny local configs (no
downloads): BERT, RoBERTa and XLM-RoBERTa (positions from the padding), DistilBERT (no token
types; sinusoidal positions too), ELECTRA (embedding size below the hidden size: its projection
stays a layer of its own). The plain path runs PyTorch's own ops in Hugging Face's order, so it
matches the unswapped model exactly; the kernels within one fp32 rounding of the LayerNorm."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from conftest import TRITON_DEVICE, launches_of  # noqa: E402
from helpers import counting_fused_calls  # noqa: E402
from tokemb_fast import FusedEncoderEmbedding, supported_families, swap_input_embeddings  # noqa: E402

DEVICE = TRITON_DEVICE
VOCAB, PAD = 61, 1
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=24, pad_token_id=PAD, hidden_dropout_prob=0.1)


def builders():
    return {
        "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(**COMMON, type_vocab_size=2)),
                 "bert", "Hugging Face BERT"),
        "roberta": (lambda: transformers.RobertaForMaskedLM(transformers.RobertaConfig(**COMMON, type_vocab_size=1)),
                    "roberta", "Hugging Face RoBERTa"),
        "distilbert": (lambda: transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=24,
            pad_token_id=PAD, dropout=0.1)), "distilbert", "Hugging Face DistilBERT"),
        "electra": (lambda: transformers.ElectraForMaskedLM(transformers.ElectraConfig(
            **COMMON, embedding_size=16, type_vocab_size=2)), "electra", "Hugging Face ELECTRA"),
        "xlm-roberta": (lambda: transformers.XLMRobertaForMaskedLM(transformers.XLMRobertaConfig(
            **COMMON, type_vocab_size=1)), "roberta", "Hugging Face XLM-RoBERTa"),
    }


FAMILIES = list(builders())
TOKEN_TYPES = {"bert", "electra"}


def pair(family):
    build, _, name = builders()[family]
    torch.manual_seed(0)
    original = build().to(DEVICE).eval()
    swapped = swap_input_embeddings(copy.deepcopy(original))
    assert swapped.tokemb_fast_family == name
    return original, swapped


def embeddings_of(model, family):
    return getattr(model, builders()[family][1]).embeddings


def padded_batch():
    ids = torch.randint(3, VOCAB, (3, 10), device=DEVICE)
    ids[0, :3] = PAD  # left padding
    ids[2, -4:] = PAD  # right padding
    return ids, (ids != PAD).long()


def assert_matches(got, expected, backend):
    if backend == "torch":
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_every_gradient_match_with_padding_and_masks(backend, family):
    original, swapped = pair(family)
    ids, mask = padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if family in TOKEN_TYPES:
        kwargs["token_type_ids"] = (torch.arange(10, device=DEVICE) >= 5).long().expand(3, -1)
    expected, got = original(**kwargs).logits, swapped(**kwargs).logits
    assert_matches(got, expected, backend)
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    named = dict(swapped.named_parameters())
    for name, parameter in original.named_parameters():
        if parameter.grad is None:
            assert named[name].grad is None, name
            continue
        if backend == "torch":
            torch.testing.assert_close(named[name].grad, parameter.grad, rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(named[name].grad, parameter.grad, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_embeddings_modules_arguments_behave_as_the_originals(backend, family):
    original, swapped = pair(family)
    before, after = embeddings_of(original, family), embeddings_of(swapped, family)
    assert isinstance(after.__dict__["_tokemb_fast_fused"], FusedEncoderEmbedding)
    ids, _ = padded_batch()
    calls = [dict(input_ids=ids), dict(input_ids=ids, position_ids=torch.arange(3, 13, device=DEVICE)[None])]
    if family != "distilbert":
        calls.append(dict(input_ids=ids, cache_length=4))  # (transformers 5.x's past_key_values_length)
        if family in TOKEN_TYPES:
            calls.append(dict(input_ids=ids, token_type_ids=torch.randint(0, 2, (3, 10), device=DEVICE)))
        calls.append(dict(inputs_embeds=torch.randn(3, 10, before.word_embeddings.embedding_dim, device=DEVICE)))
    with torch.no_grad():
        for kwargs in calls:
            assert_matches(after(**kwargs), before(**kwargs), backend)
        assert_matches(after(ids), before(ids), backend)  # positionally, as some callers do
        # Positions past the table: the original's own failure, whatever it is.
        too_long = torch.randint(3, VOCAB, (1, 30), device=DEVICE)
        errors = []
        for module in (before, after):
            try:
                module(input_ids=too_long)
                errors.append(None)
            except Exception as error:  # noqa: BLE001
                errors.append(type(error))
        assert errors[0] is not None and errors[1] == errors[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_is_fused_and_follows_train_and_eval(backend, family):
    _, swapped = pair(family)
    embeddings = embeddings_of(swapped, family)
    ids = torch.randint(3, VOCAB, (8, 16), device=DEVICE)
    embeddings.train()
    with torch.no_grad():
        dropped = embeddings(input_ids=ids)
        embeddings.eval()
        clean = embeddings(input_ids=ids)
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.03
    torch.testing.assert_close(dropped[kept], clean[kept] / 0.9, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_from_pretrained_round_trip(family, tmp_path):
    original, swapped = pair(family)
    assert list(swapped.state_dict()) == list(original.state_dict())
    swapped.save_pretrained(tmp_path)
    loaded = type(original).from_pretrained(tmp_path).to(DEVICE).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   original(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
        swap_input_embeddings(loaded)
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   swapped(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_distilbert_with_sinusoidal_positions_and_electra_with_its_projection(backend):
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=24, pad_token_id=PAD, sinusoidal_pos_embds=True)
    torch.manual_seed(0)
    model = transformers.DistilBertModel(config).to(DEVICE).eval()
    swapped = swap_input_embeddings(copy.deepcopy(model))
    ids, mask = padded_batch()
    assert_matches(swapped(input_ids=ids, attention_mask=mask).last_hidden_state,
                   model(input_ids=ids, attention_mask=mask).last_hidden_state, backend)
    original, electra = pair("electra")
    assert isinstance(electra.electra.embeddings_project, torch.nn.Linear)  # (16 -> 32: not part of the fusion)


def test_the_families_are_listed_and_a_hooked_layer_norm_is_refused():
    names = [family.name for family in supported_families()]
    for name in ("Hugging Face BERT", "Hugging Face RoBERTa", "Hugging Face DistilBERT", "Hugging Face ELECTRA",
                 "Hugging Face XLM-RoBERTa"):
        assert name in names
    model = transformers.BertModel(transformers.BertConfig(**COMMON))
    model.embeddings.LayerNorm.register_forward_hook(lambda *args: None)
    with pytest.raises(TypeError, match="Hugging Face BERT: .*LayerNorm has forward hooks"):
        swap_input_embeddings(model)
    assert "forward" not in model.embeddings.__dict__


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_float64_models_match_to_the_last_bit_on_the_plain_path(backend, family):
    build, _, _ = builders()[family]
    torch.manual_seed(0)
    original = build().to(DEVICE, torch.float64).eval()
    swapped = swap_input_embeddings(copy.deepcopy(original))
    ids, mask = padded_batch()
    expected = original(input_ids=ids, attention_mask=mask).logits
    got = swapped(input_ids=ids, attention_mask=mask).logits
    if backend == "torch":
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:  # the kernels' LayerNorm: another reduction order, in fp64
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_replaced_or_hooked_after_the_swap_are_honoured(backend, family, kernel_launches):
    # set_input_embeddings (a new vocabulary), a new LayerNorm: plain parts are fused in turn. A hook
    # on a part: that call runs the module's own forward, so the hook sees what it would unswapped.
    original, swapped = pair(family)
    ids, mask = padded_batch()
    dim = embeddings_of(original, family).word_embeddings.embedding_dim
    for model in (original, swapped):
        torch.manual_seed(5)
        model.set_input_embeddings(torch.nn.Embedding(VOCAB, dim, padding_idx=PAD, device=DEVICE))
        embeddings_of(model, family).LayerNorm = torch.nn.LayerNorm(dim, eps=1e-6, device=DEVICE)
        torch.nn.init.normal_(embeddings_of(model, family).LayerNorm.weight)
    kernel_launches.clear()
    assert_matches(swapped(input_ids=ids, attention_mask=mask).logits,
                   original(input_ids=ids, attention_mask=mask).logits, backend)
    fused = embeddings_of(swapped, family).__dict__["_tokemb_fast_fused"]
    assert fused.word_embeddings is swapped.get_input_embeddings()
    assert fused.LayerNorm is embeddings_of(swapped, family).LayerNorm
    assert launches_of(kernel_launches, "encoder_embedding_fwd_kernel") == (1 if backend == "triton" else 0)
    calls = {id(original): 0, id(swapped): 0}
    handles = []
    for model in (original, swapped):
        def hook(module, inputs, out, model_id=id(model)):
            calls[model_id] += 1
            return out * 0.5
        handles.append(model.get_input_embeddings().register_forward_hook(hook))
    kernel_launches.clear()
    assert_matches(swapped(input_ids=ids, attention_mask=mask).logits,
                   original(input_ids=ids, attention_mask=mask).logits, backend)
    assert calls[id(swapped)] == calls[id(original)] == 1
    assert launches_of(kernel_launches, "encoder_embedding_fwd_kernel") == 0
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("family, cast", [
    (family, cast) for family in FAMILIES for cast in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    if not (family == "distilbert" and cast == "token_type_embeddings")])  # (DistilBERT has no token types)
def test_one_table_cast_to_another_dtype_after_the_swap_runs_as_the_original(backend, family, cast, monkeypatch):
    # The original's sum promotes a bf16 table with fp32 ones; the fused op takes one dtype, so such
    # calls run the module's own forward instead of raising. Cast back, they are fused again.
    original, swapped = pair(family)
    original, swapped = (getattr(model, builders()[family][1]) for model in (original, swapped))  # (heads: tied)
    calls = counting_fused_calls(monkeypatch, FusedEncoderEmbedding)
    ids, mask = padded_batch()
    for model in (original, swapped):
        getattr(model.embeddings, cast).to(torch.bfloat16)
    expected = original(input_ids=ids, attention_mask=mask).last_hidden_state
    got = swapped(input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert calls == []
    expected.square().mean().backward()
    got.square().mean().backward()
    named = dict(swapped.named_parameters())
    for name, parameter in original.named_parameters():
        torch.testing.assert_close(named[name].grad, parameter.grad, rtol=0, atol=0, msg=name)
    for model in (original, swapped):
        getattr(model.embeddings, cast).to(torch.float32)
    assert_matches(swapped(input_ids=ids, attention_mask=mask).last_hidden_state,
                   original(input_ids=ids, attention_mask=mask).last_hidden_state, backend)
    assert calls == [1]


def test_parts_replaced_after_compiling_are_used_in_the_compiled_graph(backend, monkeypatch):
    torch._dynamo.reset()
    original, swapped = pair("bert")
    compiled = torch.compile(swapped, backend="aot_eager", fullgraph=True)
    ids, mask = padded_batch()
    assert_matches(compiled(input_ids=ids, attention_mask=mask).logits,
                   original(input_ids=ids, attention_mask=mask).logits, backend)
    for model in (original, swapped):
        torch.manual_seed(5)
        model.set_input_embeddings(torch.nn.Embedding(VOCAB, 32, padding_idx=PAD, device=DEVICE))
    expected = original(input_ids=ids, attention_mask=mask).logits
    # The fused call, not the module's own forward (which would give the same logits): that forward
    # now raises if anything calls it.
    embeddings_class = type(embeddings_of(swapped, "bert"))

    def own_forward(*args, **kwargs):
        raise AssertionError("the embeddings module's own forward ran")

    monkeypatch.setattr(embeddings_class, "forward", own_forward)
    assert_matches(compiled(input_ids=ids, attention_mask=mask).logits, expected, backend)

"""swap_input_embeddings on every Hugging Face family it knows, from tiny local configs (no downloads):
GPT-2, GPT-Neo, GPTBigCode (StarCoder's), OPT (positions from the attention mask, offset 2) and
BioGPT (offset positions, token rows scaled by sqrt(D): the scale fused)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from conftest import TRITON_DEVICE, launches_of  # noqa: E402
from helpers import counting_fused_calls  # noqa: E402
from tokemb_fast import swap_input_embeddings  # noqa: E402

DEVICE = TRITON_DEVICE.type
VOCAB, CONTEXT, DIM = 61, 16, 32
SPECIAL = dict(pad_token_id=1, bos_token_id=2, eos_token_id=2)


def configs():
    return {
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=CONTEXT, n_embd=DIM, n_layer=2, n_head=4, **SPECIAL)),
        "gpt-neo": (transformers.GPTNeoForCausalLM, transformers.GPTNeoConfig(
            vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_size=DIM, num_layers=2, num_heads=4,
            attention_types=[[["global", "local"], 1]], window_size=8, **SPECIAL)),
        "gpt-bigcode": (transformers.GPTBigCodeForCausalLM, transformers.GPTBigCodeConfig(
            vocab_size=VOCAB, n_positions=CONTEXT, n_embd=DIM, n_layer=2, n_head=4, **SPECIAL)),
        "opt": (transformers.OPTForCausalLM, transformers.OPTConfig(
            vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_size=DIM, word_embed_proj_dim=DIM,
            num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, **SPECIAL)),
        "biogpt": (transformers.BioGptForCausalLM, transformers.BioGptConfig(
            vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=CONTEXT, scale_embedding=True, **SPECIAL)),
    }


FAMILIES = list(configs())
NAMES = {"gpt2": "Hugging Face GPT-2", "gpt-neo": "Hugging Face GPT-Neo", "gpt-bigcode": "Hugging Face GPTBigCode",
         "opt": "Hugging Face OPT", "biogpt": "Hugging Face BioGPT"}
# Families whose base model takes position_ids (all of these, in transformers 5.x).
POSITION_IDS = {"gpt2", "gpt-neo", "gpt-bigcode", "opt", "biogpt"}


def pair(family, train=False):
    cls, config = configs()[family]
    torch.manual_seed(0)
    model = cls(config).to(DEVICE).train(train)
    swapped = swap_input_embeddings(copy.deepcopy(model))
    assert swapped.tokemb_fast_family == NAMES[family]
    return model, swapped


def left_padded(batch=3, seq_len=10):
    ids = torch.randint(3, VOCAB, (batch, seq_len), device=DEVICE)
    pad = torch.tensor([0, 3, 5], device=DEVICE)[:batch]
    mask = (torch.arange(seq_len, device=DEVICE)[None] >= pad[:, None]).long()
    return ids.masked_fill(mask == 0, 1), mask


def assert_same_gradients(original, swapped):
    named = dict(swapped.named_parameters())
    for name, parameter in original.named_parameters():
        torch.testing.assert_close(named[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("inputs", ["plain", "left_padded", "position_ids"])
def test_logits_and_gradients_match_with_dropout_on(backend, family, inputs, kernel_launches):
    # Train mode: HF's own dropout stays, and the fused call draws no random numbers, so with the
    # same seed both models drop the same elements.
    original, swapped = pair(family, train=True)
    kernel_launches.clear()
    ids, mask = left_padded()
    kwargs = {"input_ids": ids}
    if inputs != "plain":
        kwargs["attention_mask"] = mask
    if inputs == "position_ids":
        if family not in POSITION_IDS:
            pytest.skip(f"{family} takes no position_ids")
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    torch.manual_seed(7)
    expected = original(**kwargs).logits
    torch.manual_seed(7)
    got = swapped(**kwargs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    expected.square().mean().backward()
    got.square().mean().backward()
    assert_same_gradients(original, swapped)
    assert launches_of(kernel_launches, "input_embedding_fwd_kernel") == (1 if backend == "triton" else 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_and_without_cache(backend, family):
    original, swapped = pair(family)
    ids, mask = left_padded(seq_len=5)
    settings = dict(max_new_tokens=6, do_sample=False, attention_mask=mask)
    expected = original.generate(ids, **settings)
    assert torch.equal(swapped.generate(ids, **settings), expected)
    assert torch.equal(swapped.generate(ids, use_cache=False, **settings), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_from_pretrained_and_tied_weights(family, tmp_path):
    original, swapped = pair(family)
    assert list(swapped.state_dict()) == list(original.state_dict())
    tokens = swapped.get_input_embeddings()
    assert type(tokens).__module__.startswith(("torch.nn", "transformers.")), type(tokens)  # a public class
    output = swapped.get_output_embeddings()
    assert output.weight is tokens.weight  # still tied
    swapped.save_pretrained(tmp_path)
    reloaded = type(original).from_pretrained(tmp_path).to(DEVICE).eval()
    ids, mask = left_padded()
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                               swapped(input_ids=ids, attention_mask=mask).logits)
    swap_input_embeddings(reloaded)
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                               original(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_resize_token_embeddings_keeps_the_fusion(backend, family, kernel_launches):
    original, swapped = pair(family)
    for model in (original, swapped):
        torch.manual_seed(3)  # the new rows are drawn at random
        model.resize_token_embeddings(VOCAB + 7, mean_resizing=False)
    assert swapped.get_output_embeddings().weight is swapped.get_input_embeddings().weight
    kernel_launches.clear()
    ids = torch.randint(3, VOCAB + 7, (2, 8), device=DEVICE)
    torch.testing.assert_close(swapped(input_ids=ids).logits, original(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert launches_of(kernel_launches, "input_embedding_fwd_kernel") == (1 if backend == "triton" else 0)


def test_opt_with_a_projection_is_refused():
    # OPT-350m projects the token rows (project_in) before adding the positions: nothing to fuse.
    cls, config = configs()["opt"]
    config.word_embed_proj_dim = 16
    model = cls(config)
    with pytest.raises(TypeError, match=r"Hugging Face OPT: .*not this model: it projects the token embeddings"):
        swap_input_embeddings(model)
    assert "forward" not in model.model.decoder.embed_tokens.__dict__


def test_biogpt_scale_is_fused_not_a_separate_pass(backend, kernel_launches):
    original, swapped = pair("biogpt")
    scale = swapped.biogpt.embed_tokens.embed_scale
    assert scale == DIM ** 0.5
    fused = swapped.biogpt.__dict__["_tokemb_fast_hf"].fused
    assert fused.token_scale == scale
    ids = torch.randint(3, VOCAB, (2, 6), device=DEVICE)
    kernel_launches.clear()
    torch.testing.assert_close(swapped(input_ids=ids).logits, original(input_ids=ids).logits)
    assert launches_of(kernel_launches, "input_embedding_fwd_kernel") == (1 if backend == "triton" else 0)


def test_a_biogpt_scale_set_after_the_swap_is_used(backend, monkeypatch):
    # BioGPT's token module reads embed_scale at each call (scale_embedding off for a fine-tune, say).
    original, swapped = pair("biogpt")
    fused_calls = counting_fused_calls(monkeypatch)
    for model in (original, swapped):
        model.biogpt.embed_tokens.embed_scale = 1.0
    ids = torch.randint(3, VOCAB, (2, 6), device=DEVICE)
    torch.testing.assert_close(swapped(input_ids=ids).logits, original(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert fused_calls == [1] and swapped.biogpt.__dict__["_tokemb_fast_hf"].fused.token_scale == 1.0


@pytest.mark.parametrize("scale", ["a learnable tensor", "inf"])
def test_a_biogpt_scale_the_fused_op_cannot_take_runs_as_the_original(backend, scale, monkeypatch):
    # A tensor scale (learnable: its gradient must flow; read at each call it would sync a GPU) or a
    # non-finite one: those calls run the modules' own lookups, as the original does.
    original, swapped = pair("biogpt")
    fused_calls = counting_fused_calls(monkeypatch)
    for model in (original, swapped):
        model.biogpt.embed_tokens.embed_scale = torch.nn.Parameter(torch.tensor(2.0, device=DEVICE)) \
            if scale == "a learnable tensor" else float("inf")
    ids = torch.randint(3, VOCAB, (2, 6), device=DEVICE)
    expected, got = original(input_ids=ids).logits, swapped(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert fused_calls == []
    if scale == "a learnable tensor":
        expected.square().mean().backward()
        got.square().mean().backward()
        assert_same_gradients(original, swapped)  # (embed_scale's own gradient included)
        assert swapped.biogpt.embed_tokens.embed_scale.grad is not None
    with pytest.raises(TypeError, match="embed_scale.* is a tensor or not a finite number"):
        swap_input_embeddings(copy.deepcopy(original))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("patch", ["token wrapped", "position wrapped", "position replaced"])
def test_forwards_wrapped_or_replaced_after_the_swap_are_honoured(backend, family, patch, monkeypatch):
    # A forward set on a table's instance after the swap (accelerate's offloading wraps it, so does a
    # NEFTune-style patch) is the model's: the call runs the modules' own lookups, through it. Once
    # the swap's own forward is back, the call is fused again.
    original, swapped = pair(family)
    token_name, position_name = token_and_position_names(swapped)
    fused_calls = counting_fused_calls(monkeypatch)
    saved = {}
    for model in (original, swapped):
        module = model.get_submodule(token_name if patch.startswith("token") else position_name)
        saved[id(model)] = module, module.__dict__.get("forward")
        inner = module.forward
        if patch == "token wrapped":
            module.forward = lambda *args, inner=inner, **kwargs: inner(*args, **kwargs) * 2
        elif patch == "position wrapped":
            module.forward = lambda *args, inner=inner, **kwargs: inner(*args, **kwargs) * 0.5
        else:  # (the class's own lookup, as a patch that fixes something would call it)
            module.forward = lambda *args, module=module, **kwargs: type(module).forward(module, *args, **kwargs) + 1
    ids, mask = left_padded()
    torch.testing.assert_close(swapped(input_ids=ids, attention_mask=mask).logits,
                               original(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    assert fused_calls == []
    for model in (original, swapped):
        module, forward = saved[id(model)]
        if forward is None:
            del module.forward
        else:
            module.forward = forward
    torch.testing.assert_close(swapped(input_ids=ids, attention_mask=mask).logits,
                               original(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    assert fused_calls == [1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cast", ["token", "position"])
def test_one_table_cast_to_another_dtype_after_the_swap_runs_as_the_original(backend, family, cast, monkeypatch):
    # The original's "+" promotes bf16 + fp32 to fp32; the fused op takes one dtype, so such calls
    # run the modules' own lookups instead of raising. Cast back, they are fused again.
    original, swapped = pair(family)
    # The base models (a head tied to the token table would be cast with it and refuse fp32 input).
    base_name = next(name for name, module in swapped.named_modules() if "_tokemb_fast_hf" in module.__dict__)
    original, swapped = original.get_submodule(base_name), swapped.get_submodule(base_name)
    token_name, position_name = token_and_position_names(swapped)
    fused_calls = counting_fused_calls(monkeypatch)
    ids, mask = left_padded()
    name = token_name if cast == "token" else position_name
    for model in (original, swapped):
        model.get_submodule(name).to(torch.bfloat16)
    expected = original(input_ids=ids, attention_mask=mask).last_hidden_state
    got = swapped(input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert fused_calls == []
    expected.square().mean().backward()
    got.square().mean().backward()
    assert_same_gradients(original, swapped)
    for model in (original, swapped):
        model.get_submodule(name).to(torch.float32)
    torch.testing.assert_close(swapped(input_ids=ids, attention_mask=mask).last_hidden_state,
                               original(input_ids=ids, attention_mask=mask).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert fused_calls == [1]


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_calls_of_the_embedding_modules_stay_plain(family):
    original, swapped = pair(family)
    tokens, expected = swapped.get_input_embeddings(), original.get_input_embeddings()
    ids = torch.randint(0, VOCAB, (2, 5), device=DEVICE)
    torch.testing.assert_close(tokens(ids), expected(ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_refused_swap_leaves_the_model_bit_identical(family, monkeypatch):
    cls, config = configs()[family]
    torch.manual_seed(0)
    model = cls(config).to(DEVICE).eval()
    ids = torch.randint(3, VOCAB, (2, 6), device=DEVICE)
    before_logits = model(input_ids=ids).logits
    before_state = {key: value.clone() for key, value in model.state_dict().items()}
    parameters = list(model.parameters())
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    from tokemb_fast import module as module_file

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while building the fused module")

    monkeypatch.setattr(module_file.FusedInputEmbedding, "from_embeddings", broken)
    with pytest.raises(RuntimeError, match=f"looks like a {NAMES[family]}, but the swap failed .*simulated "
                                           "failure.*left as it was") as raised:
        swap_input_embeddings(model)
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert list(model.parameters()) == parameters and all(a is b for a, b in zip(model.parameters(), parameters))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_state[key]), key
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert not any("forward" in m.__dict__ or "_tokemb_fast_hf" in m.__dict__ for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, before_logits)


def token_and_position_names(swapped):
    """The swapped base model's token and position modules, by their names in the model."""
    state = next(module.__dict__["_tokemb_fast_hf"] for module in swapped.modules()
                 if "_tokemb_fast_hf" in module.__dict__)
    names = {id(module): name for name, module in swapped.named_modules()}
    return names[id(state.token)], names[id(state.position)]


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_added_after_the_swap_see_what_they_would_see_unswapped(backend, family, kernel_launches):
    # The token module of a swapped call returns a zero placeholder and the position module the fused
    # sum, so a hook added since (NEFTune-style scaling, a probe) would see and change the wrong
    # tensors: while either has hooks, both run as the modules' own calls; without them, fused again.
    original, swapped = pair(family)
    token_name, position_name = token_and_position_names(swapped)
    seen = {id(original): [], id(swapped): []}
    handles = []
    for model in (original, swapped):
        record = seen[id(model)]
        handles.append(model.get_submodule(token_name).register_forward_hook(
            lambda m, i, o, record=record: record.append(tuple(o.shape)) or o * 2))
        handles.append(model.get_submodule(position_name).register_forward_hook(
            lambda m, i, o, record=record: record.append(float(o.detach().double().abs().sum())) or None))
    ids, mask = left_padded()
    kernel_launches.clear()
    torch.testing.assert_close(swapped(input_ids=ids, attention_mask=mask).logits,
                               original(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    assert launches_of(kernel_launches, "input_embedding_fwd_kernel") == 0
    assert len(seen[id(swapped)]) == 2 and seen[id(swapped)][0] == seen[id(original)][0]
    assert seen[id(swapped)][1] == pytest.approx(seen[id(original)][1], rel=1e-6)  # the position rows alone
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(swapped(input_ids=ids, attention_mask=mask).logits,
                               original(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    assert launches_of(kernel_launches, "input_embedding_fwd_kernel") == (1 if backend == "triton" else 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("replaced", ["token", "position"])
def test_one_table_replaced_after_the_swap_is_fused_in_turn(backend, family, replaced, kernel_launches,
                                                            monkeypatch):
    # (Once the swap's own forward on the other table made every later call unfused.)
    original, swapped = pair(family)
    token_name, position_name = token_and_position_names(swapped)
    name = token_name if replaced == "token" else position_name
    for model in (original, swapped):
        new = copy.deepcopy(original.get_submodule(name))  # (of its own class: OPT's offset positions)
        torch.manual_seed(11)
        torch.nn.init.normal_(new.weight)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute, new)
    ids, mask = left_padded()
    kernel_launches.clear()
    fused_calls = counting_fused_calls(monkeypatch)
    torch.testing.assert_close(swapped(input_ids=ids, attention_mask=mask).logits,
                               original(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    assert launches_of(kernel_launches, "input_embedding_fwd_kernel") == (1 if backend == "triton" else 0)
    assert len(fused_calls) == 1  # (the fused path on either backend, not the modules' own lookups)
    assert token_and_position_names(swapped) == (token_name, position_name)

"""swap_input_embeddings on Hugging Face GPT-2 (tiny local configs, no hub downloads)."""
import copy
import inspect
import io

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402

from conftest import TRITON_DEVICE, launches_of
from helpers import counting_fused_calls  # noqa: E402
from tokemb_fast import swap_input_embeddings, triton_ops  # noqa: E402

DEVICE = TRITON_DEVICE.type


def config():
    return GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)


def pair(cls=GPT2LMHeadModel):
    torch.manual_seed(0)
    model = cls(config()).to(DEVICE).eval()
    return model, swap_input_embeddings(copy.deepcopy(model))


def output(model, **kwargs):
    out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("positions", ["absent", "1xT", "BxT_left_padded"])
def test_outputs_and_every_gradient_match(backend, positions, kernel_launches):
    original, swapped = pair()
    kernel_launches.clear()  # (the swap's probe launched too)
    ids = torch.randint(1, 61, (3, 12), device=DEVICE)
    kwargs = {"input_ids": ids}
    if positions == "1xT":
        kwargs["position_ids"] = torch.arange(12, device=DEVICE)[None]
    elif positions == "BxT_left_padded":
        pad = torch.tensor([0, 3, 5], device=DEVICE)
        mask = (torch.arange(12, device=DEVICE)[None] >= pad[:, None]).long()
        kwargs["attention_mask"] = mask
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    expected, got = output(original, **kwargs), output(swapped, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    expected.square().mean().backward()
    got.square().mean().backward()
    named = dict(swapped.named_parameters())
    for name, parameter in original.named_parameters():
        torch.testing.assert_close(named[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert launches_of(kernel_launches, "input_embedding_fwd_kernel") == (1 if backend == "triton" else 0)


def test_gpt2_model_token_types_and_inputs_embeds(backend):
    original, swapped = pair(GPT2Model)
    ids = torch.randint(0, 61, (2, 7), device=DEVICE)
    token_types = torch.randint(0, 61, (2, 7), device=DEVICE)
    torch.testing.assert_close(output(swapped, input_ids=ids, token_type_ids=token_types),
                               output(original, input_ids=ids, token_type_ids=token_types))
    embeds = torch.randn(2, 7, 32, device=DEVICE)
    torch.testing.assert_close(output(swapped, inputs_embeds=embeds), output(original, inputs_embeds=embeds))
    # wte/wpe called directly (outside the model's forward) are plain embeddings.
    torch.testing.assert_close(swapped.wte(ids), original.wte(ids))


def test_generation_with_kv_cache_gives_the_same_tokens(backend):
    original, swapped = pair()
    prompt = torch.randint(1, 61, (2, 4), device=DEVICE)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(swapped.generate(prompt, **settings), original.generate(prompt, **settings))


def test_state_dict_checkpoints_tying_and_replaced_weights():
    original, swapped = pair()
    assert list(swapped.state_dict()) == list(original.state_dict())
    assert swapped.lm_head.weight is swapped.transformer.wte.weight
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    fresh = swap_input_embeddings(GPT2LMHeadModel(config()).to(DEVICE).eval())
    fresh.load_state_dict(torch.load(buffer))
    ids = torch.randint(0, 61, (2, 6), device=DEVICE)
    torch.testing.assert_close(output(fresh, input_ids=ids), output(original, input_ids=ids))
    plain = GPT2LMHeadModel(config()).to(DEVICE).eval()
    plain.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(output(plain, input_ids=ids), output(original, input_ids=ids))
    for model in (original, swapped):  # what a weight loader does
        model.transformer.wte.weight = nn.Parameter(torch.ones(61, 32, device=DEVICE) * 0.01)
    torch.testing.assert_close(output(swapped, input_ids=ids), output(original, input_ids=ids))


def test_idempotent_copyable_and_dropout_left_to_the_model():
    _, swapped = pair()
    assert swap_input_embeddings(swapped) is swapped
    assert swapped.tokemb_fast_family == "Hugging Face GPT-2"
    ids = torch.randint(0, 61, (1, 5), device=DEVICE)
    clone = copy.deepcopy(swapped)
    torch.testing.assert_close(output(clone, input_ids=ids), output(swapped, input_ids=ids))
    fused = clone.transformer.__dict__["_tokemb_fast_hf"].fused
    assert fused.tok_emb is clone.transformer.wte and fused.drop.p == 0.0


def test_a_call_in_another_thread_during_a_takeover_sees_old_or_new_modules_whole(monkeypatch):
    # Thread A takes over replaced tables and is held between setting the new modules' forwards;
    # thread B's call then must not get the token placeholder with a plain position lookup (the sum
    # would lack the token rows): it runs either the old pair's way or the new pair's, whole.
    import threading
    original, swapped = pair(GPT2Model)
    for model in (original, swapped):
        torch.manual_seed(1)
        model.wte = nn.Embedding(61, 32, device=DEVICE)
        model.wpe = nn.Embedding(16, 32, device=DEVICE)
    ids = torch.randint(0, 61, (2, 6), device=DEVICE)
    expected = original(input_ids=ids).last_hidden_state
    new_position = swapped.wpe
    between, release = threading.Event(), threading.Event()
    setattr_ = nn.Module.__setattr__

    def held_setattr(module, name, value):
        if name == "forward" and module is new_position and threading.current_thread().name == "A":
            between.set()
            release.wait(10)
        return setattr_(module, name, value)

    monkeypatch.setattr(nn.Module, "__setattr__", held_setattr)
    results = {}

    def run(name):
        with torch.no_grad():
            results[name] = swapped(input_ids=ids).last_hidden_state

    first = threading.Thread(target=run, args=("A",), name="A")
    first.start()
    assert between.wait(10)
    second = threading.Thread(target=run, args=("B",), name="B")
    second.start()
    second.join(10)
    release.set()
    first.join(10)
    for name in "AB":
        torch.testing.assert_close(results[name], expected, rtol=1e-5, atol=1e-5, msg=name)


def test_a_model_pickled_by_0_2_0_gets_the_arming_forward_at_its_first_call():
    # 0.2.0 pickled the state as token, position, fused, and armed calls from a forward pre-hook
    # (_hf_arm), with the class's forward: made so here. Its first call runs plain, the next fused.
    from tokemb_fast import FusedInputEmbedding, swap
    original, swapped = pair(GPT2Model)
    state = swapped.__dict__["_tokemb_fast_hf"]
    old = dict(state.__getstate__())
    old["token"], old["position"], old["fused"] = old.pop("wrapped")
    state.__dict__.clear()  # (in place: the tables' forwards hold this very object, as after unpickling)
    state.__setstate__(old)
    restored = state
    del swapped.__dict__["forward"]
    swapped.register_forward_pre_hook(swap._hf_arm, with_kwargs=True)
    ids = torch.randint(0, 61, (2, 6), device=DEVICE)
    fused_calls, forward = [], FusedInputEmbedding.forward
    for call in range(3):
        FusedInputEmbedding.forward = lambda *a, **k: fused_calls.append(call) or forward(*a, **k)
        try:
            got = swapped(input_ids=ids).last_hidden_state
        finally:
            FusedInputEmbedding.forward = forward
        torch.testing.assert_close(got, original(input_ids=ids).last_hidden_state)
    assert fused_calls == [1, 2] and restored.call.frames == []
    assert restored.fused.tok_emb is swapped.wte


def test_a_forward_set_on_the_base_model_before_the_swap_still_runs(monkeypatch):
    # (A wrapper such as accelerate's, or a compiled forward, set on the instance: the swap's own
    # forward once replaced it, and it never ran again.)
    fused_calls = counting_fused_calls(monkeypatch)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config()).to(DEVICE).eval()
    original = copy.deepcopy(model)
    wrapped_calls, own_forward = [], model.transformer.forward

    def wrapper(*args, **kwargs):
        wrapped_calls.append(1)
        return own_forward(*args, **kwargs)
    model.transformer.forward = wrapper
    swap_input_embeddings(model)
    ids = torch.randint(0, 61, (2, 6), device=DEVICE)
    wrapped_calls.clear()
    fused_calls.clear()
    torch.testing.assert_close(output(model, input_ids=ids), output(original, input_ids=ids))
    assert wrapped_calls == [1] and fused_calls == [1]


def test_the_swapped_base_model_exports_on_its_own():
    # torch.export reads model.forward's code and signature; an earlier form of the swap's forward
    # (a callable object) had no __code__, and exporting GPT2Model itself failed.
    original, swapped = pair(GPT2Model)
    ids = torch.randint(0, 61, (2, 6), device=DEVICE)
    assert str(inspect.signature(swapped.forward)) == str(inspect.signature(original.forward))
    program = torch.export.export(swapped, (), {"input_ids": ids, "use_cache": False})
    other = torch.randint(0, 61, (2, 6), device=DEVICE)
    torch.testing.assert_close(program.module()(input_ids=other, use_cache=False).last_hidden_state,
                               original(input_ids=other, use_cache=False).last_hidden_state)


def test_a_call_that_raises_leaves_the_lookups_plain():
    # The base model's pre-hook arms the token lookup; a forward that raised before it (here:
    # input_ids and inputs_embeds both given) once left it armed, and the next direct lookup of the
    # token table in that thread returned the zero placeholder.
    original, swapped = pair(GPT2Model)
    ids = torch.randint(0, 61, (2, 6), device=DEVICE)
    with pytest.raises(ValueError):
        swapped(input_ids=ids, inputs_embeds=torch.zeros(2, 6, 32, device=DEVICE))
    torch.testing.assert_close(swapped.wte(ids), original.wte(ids), rtol=0, atol=0)
    positions = torch.arange(6, device=DEVICE)
    torch.testing.assert_close(swapped.wpe(positions), original.wpe(positions), rtol=0, atol=0)
    torch.testing.assert_close(swapped(input_ids=ids).last_hidden_state, original(input_ids=ids).last_hidden_state)


def test_a_pre_hook_on_the_model_that_looks_up_tokens_sees_them(monkeypatch):
    # A forward pre-hook added to the model after the swap (logging its input embeddings; FSDP2's
    # unsharding is one too) runs outside the call's frame: it once got the zero placeholder, and
    # the model then counted the token rows twice. The call itself stays fused.
    fused_calls = counting_fused_calls(monkeypatch)
    original, swapped = pair(GPT2Model)
    fused_calls.clear()
    seen = {}
    for name, model in (("original", original), ("swapped", swapped)):
        model.register_forward_pre_hook(lambda module, args, kwargs, name=name: seen.__setitem__(
            name, module.wte(kwargs["input_ids"]).detach()), with_kwargs=True)
    ids = torch.randint(0, 61, (2, 6), device=DEVICE)
    torch.testing.assert_close(swapped(input_ids=ids).last_hidden_state, original(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(seen["swapped"], seen["original"], rtol=0, atol=0)
    assert fused_calls == [1]


def test_a_call_of_the_model_from_a_hook_inside_a_call_keeps_both_right():
    # A global module hook on the token table that calls the model again: the inner call has its own
    # frame, and the outer call's position lookup still gets the outer ids (it once ran plain, and the
    # output lacked the token rows).
    original, swapped = pair(GPT2Model)
    ids = torch.randint(0, 61, (2, 6), device=DEVICE)
    inner = torch.randint(0, 61, (1, 3), device=DEVICE)
    results = {}

    def hook(module, args, output):
        if module is swapped.wte and not results:
            results["inner"] = None  # (once: the inner call's own lookup comes here too)
            results["inner"] = swapped(input_ids=inner).last_hidden_state
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        outer = swapped(input_ids=ids).last_hidden_state
    finally:
        handle.remove()
    torch.testing.assert_close(outer, original(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(results["inner"], original(input_ids=inner).last_hidden_state)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiles_fullgraph(compile_backend, monkeypatch):
    if compile_backend == "inductor" and DEVICE != "cuda":
        pytest.skip("Inductor compiles the Triton kernels only on a GPU; the aot_eager case traces the same graph")
    if DEVICE == "cpu":
        if not triton_ops.INTERPRETED:
            pytest.skip("CPU tensors reach the kernels only under TRITON_INTERPRET=1")
        monkeypatch.setenv("TOKEMB_FAST_BACKEND", "triton")
    torch._dynamo.reset()
    original, swapped = pair()
    compiled = torch.compile(swapped, backend=compile_backend, fullgraph=True)
    ids = torch.randint(0, 61, (2, 10), device=DEVICE)
    got, expected = output(compiled, input_ids=ids), output(original, input_ids=ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    got.square().mean().backward()
    expected.square().mean().backward()
    named = dict(original.named_parameters())
    for name, parameter in swapped.named_parameters():
        torch.testing.assert_close(parameter.grad, named[name].grad, rtol=1e-3, atol=1e-5, msg=name)

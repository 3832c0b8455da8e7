"""swap_input_embeddings on the model families it knows, on both paths."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

from conftest import TRITON_DEVICE, launches_of
from gpt_models import GPTModel, GPTModelKV, GPTModelKVOptimized, MinGPT, NanoGPT, generate_with_cache
from helpers import counting_fused_calls
from tokemb_fast import swap_input_embeddings

DEVICE = TRITON_DEVICE.type
FAMILIES = {"llms-from-scratch": GPTModel, "llms-from-scratch-kv": GPTModelKV,
            "llms-from-scratch-kv-optimized": GPTModelKVOptimized, "nanogpt": NanoGPT, "mingpt": MinGPT}
KARPATHY = (NanoGPT, MinGPT)


def logits_of(model, ids, targets=None):
    out = model(ids, targets) if isinstance(model, KARPATHY) else model(ids)
    return out if isinstance(out, torch.Tensor) else out


def pair(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().to(DEVICE)
    return model, swap_input_embeddings(copy.deepcopy(model))


def loss_of(model, ids, targets):
    if isinstance(model, KARPATHY):
        return model(ids, targets)[1]
    logits = model(ids)
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_every_gradient_match(backend, family, kernel_launches):
    original, swapped = pair(family)
    kernel_launches.clear()  # (the swap's probe launched too)
    original.eval()
    swapped.eval()  # dropout off: the two paths draw different masks
    ids = torch.randint(0, 61, (3, 16), device=DEVICE)
    targets = torch.randint(0, 61, (3, 16), device=DEVICE)
    loss_original, loss_swapped = loss_of(original, ids, targets), loss_of(swapped, ids, targets)
    torch.testing.assert_close(loss_swapped, loss_original, rtol=1e-5, atol=1e-6)
    loss_original.backward()
    loss_swapped.backward()
    named = dict(swapped.named_parameters())
    for name, parameter in original.named_parameters():
        torch.testing.assert_close(named[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert launches_of(kernel_launches, "input_embedding_fwd_kernel") == (1 if backend == "triton" else 0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_and_checkpoints_are_unchanged(family):
    original, swapped = pair(family)
    assert list(swapped.state_dict()) == list(original.state_dict())
    for key, value in original.state_dict().items():
        assert torch.equal(swapped.state_dict()[key], value)
    # A checkpoint saved before the swap loads after it, and the other way round.
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    fresh = swap_input_embeddings(FAMILIES[family]().to(DEVICE))
    fresh.load_state_dict(torch.load(buffer))
    buffer = io.BytesIO()
    torch.save(fresh.state_dict(), buffer)
    buffer.seek(0)
    plain = FAMILIES[family]().to(DEVICE)
    plain.load_state_dict(torch.load(buffer))
    ids = torch.randint(0, 61, (2, 8), device=DEVICE)
    for model in (original, fresh, plain):
        model.eval()
    torch.testing.assert_close(logits_of(fresh, ids), logits_of(original, ids))
    torch.testing.assert_close(logits_of(plain, ids), logits_of(original, ids))


def test_replaced_token_weight_and_tying_are_honoured(backend):
    model = swap_input_embeddings(NanoGPT().to(DEVICE)).eval()
    assert model.transformer.wte.weight is model.lm_head.weight  # still tied
    new_weight = nn.Parameter(torch.randn(61, 32, device=DEVICE))
    model.transformer.wte.weight = new_weight  # what GPT-2 weight loaders do
    reference = copy.deepcopy(model)
    reference.__dict__.pop("forward")  # the plain nanoGPT forward, on the same weights
    ids = torch.randint(0, 61, (2, 8), device=DEVICE)
    torch.testing.assert_close(model(ids)[0], NanoGPT.forward(reference, ids)[0])
    out = model(ids, ids)[1]
    out.backward()
    assert new_weight.grad is not None


def embedding_parts(model):
    """(the module holding them, the names of its token table, position table and dropout)."""
    if isinstance(model, KARPATHY):
        return model.transformer, ("wte", "wpe", "drop")
    return model, ("tok_emb", "pos_emb", "drop_emb")


class ScaledEmbedding(nn.Embedding):
    def forward(self, input):
        return super().forward(input) * 0.5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_modules_replaced_after_the_swap_are_used(backend, family, kernel_launches, monkeypatch):
    # A new table or dropout assigned after the swap (a loader, a resized vocabulary, dropout off for
    # fine-tuning) is the model's: plain ones are fused in turn, others run as the original runs them.
    original, swapped = pair(family)
    fused_calls = counting_fused_calls(monkeypatch)
    ids = torch.randint(0, 61, (2, 8), device=DEVICE)
    for replacement in ("plain", "subclass"):
        for model in (original, swapped):
            holder, (token, position, dropout) = embedding_parts(model)
            torch.manual_seed(7)
            kind = nn.Embedding if replacement == "plain" else ScaledEmbedding
            setattr(holder, token, kind(61, 32, device=DEVICE))
            setattr(holder, position, nn.Embedding(getattr(holder, position).num_embeddings, 32, device=DEVICE))
            setattr(holder, dropout, nn.Dropout(0.3))
            model.eval()  # (the two would draw different dropout masks)
        kernel_launches.clear()
        fused_calls.clear()
        expected, got = logits_of(original, ids), logits_of(swapped, ids)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert len(fused_calls) == (1 if replacement == "plain" else 0)
        (got if isinstance(got, torch.Tensor) else got[0]).sum().backward()
        holder, (token, position, dropout) = embedding_parts(swapped)
        assert getattr(holder, token).weight.grad is not None and getattr(holder, position).weight.grad is not None
        fused_launches = launches_of(kernel_launches, "input_embedding_fwd_kernel")
        if replacement == "plain":
            fused = swapped.__dict__["_tokemb_fast_fused"]
            assert fused.tok_emb is getattr(holder, token) and fused.drop is getattr(holder, dropout)
            assert fused_launches == (1 if backend == "triton" else 0)
        else:
            assert fused_launches == 0


def test_modules_replaced_after_compiling_are_used_in_the_compiled_graph(backend, kernel_launches):
    # Dynamo guards on the modules, so a replacement retraces: the new tables are looked up fused,
    # without building a module inside the traced region (a graph break, refused by fullgraph).
    torch._dynamo.reset()
    original, swapped = pair("llms-from-scratch")
    original.eval()
    swapped.eval()
    compiled = torch.compile(swapped, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 61, (2, 8), device=DEVICE)
    torch.testing.assert_close(compiled(ids), original(ids), rtol=1e-5, atol=1e-6)
    for model in (original, swapped):
        torch.manual_seed(7)
        model.tok_emb = nn.Embedding(61, 32, device=DEVICE)
        model.pos_emb = nn.Embedding(16, 32, device=DEVICE)
    kernel_launches.clear()
    got = compiled(ids)
    # Fused, not the unfused fallback (the interpreter's ops are opaque: their launches run eagerly).
    assert launches_of(kernel_launches, "input_embedding_fwd_kernel") == (1 if backend == "triton" else 0)
    torch.testing.assert_close(got, original(ids), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert swapped.tok_emb.weight.grad is not None and swapped.pos_emb.weight.grad is not None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hooks_added_after_the_swap_run_as_in_the_original(backend, family, kernel_launches):
    # A fused call never calls the tables' modules, so while one has hooks (a NEFTune-style noise
    # hook, a feature probe, a backward hook) the lookup runs through the modules, as the original
    # does; once they are removed it is fused again.
    original, swapped = pair(family)
    original.eval()
    swapped.eval()
    ids = torch.randint(0, 61, (2, 8), device=DEVICE)
    calls = {id(original): [], id(swapped): []}
    handles = []
    for model in (original, swapped):
        holder, (token, position, dropout) = embedding_parts(model)
        record = calls[id(model)]
        handles += [
            getattr(holder, token).register_forward_hook(lambda m, i, o, record=record: record.append("token") or o * 2),
            getattr(holder, position).register_forward_pre_hook(  # (minGPT looks up [1, T], the others [T])
                lambda m, i, record=record: record.append(("position", tuple(i[0].shape))) or None),
            getattr(holder, dropout).register_full_backward_hook(
                lambda m, gi, go, record=record: record.append("dropout backward") or None)]
    kernel_launches.clear()
    expected, got = logits_of(original, ids), logits_of(swapped, ids)
    (expected if isinstance(expected, torch.Tensor) else expected[0]).sum().backward()
    (got if isinstance(got, torch.Tensor) else got[0]).sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert calls[id(swapped)] == calls[id(original)]
    assert [call if isinstance(call, str) else call[0] for call in calls[id(swapped)]] == \
        ["token", "position", "dropout backward"]
    assert launches_of(kernel_launches, "input_embedding_fwd_kernel") == 0
    for handle in handles:
        handle.remove()
    kernel_launches.clear()
    torch.testing.assert_close(logits_of(swapped, ids), logits_of(original, ids), rtol=1e-5, atol=1e-6)
    assert launches_of(kernel_launches, "input_embedding_fwd_kernel") == (1 if backend == "triton" else 0)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("cast", ["token", "position"])
def test_one_table_cast_to_another_dtype_after_the_swap_runs_as_the_original(backend, family, cast, monkeypatch):
    # The original's "+" promotes bf16 + fp32 to fp32 (the large token table kept in bf16, say);
    # the fused op takes one dtype, so such calls run the original's arithmetic instead of raising.
    # Cast back, the call is fused again.
    original, swapped = pair(family)
    fused_calls = counting_fused_calls(monkeypatch)
    ids = torch.randint(0, 61, (2, 8), device=DEVICE)
    for model in (original, swapped):
        model.eval()
        holder, (token, position, _) = embedding_parts(model)
        getattr(holder, token if cast == "token" else position).to(torch.bfloat16)
    try:
        expected = logits_of(original, ids)
    except RuntimeError as error:  # nanoGPT: the token table is its head's weight, tied
        assert family == "nanogpt" and cast == "token", error
        with pytest.raises(RuntimeError, match="same dtype"):
            logits_of(swapped, ids)
        assert fused_calls == []
        return
    got = logits_of(swapped, ids)
    expected, got = (t if isinstance(t, torch.Tensor) else t[0] for t in (expected, got))
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert fused_calls == []
    got.sum().backward()
    expected.sum().backward()
    holder, (token, position, _) = embedding_parts(swapped)
    holder_original, _ = embedding_parts(original)
    for name in (token, position):
        torch.testing.assert_close(getattr(holder, name).weight.grad, getattr(holder_original, name).weight.grad,
                                   rtol=0, atol=0)
        assert getattr(holder, name).weight.grad.dtype == getattr(holder, name).weight.dtype
    for model in (original, swapped):
        holder, (token, position, _) = embedding_parts(model)
        getattr(holder, token if cast == "token" else position).to(torch.float32)
    torch.testing.assert_close(logits_of(swapped, ids), logits_of(original, ids), rtol=1e-5, atol=1e-6)
    assert fused_calls == [1]


@pytest.mark.parametrize("family", ["nanogpt", "mingpt"])
def test_generation_gives_the_same_tokens(backend, family):
    original, swapped = pair(family)
    prompt = torch.randint(0, 61, (2, 3), device=DEVICE)
    # 20 new tokens: past the 16-token block, so the window slides.
    assert torch.equal(swapped.eval().generate(prompt, 20), original.eval().generate(prompt, 20))


@pytest.mark.parametrize("family", ["llms-from-scratch-kv", "llms-from-scratch-kv-optimized"])
def test_kv_cache_decoding_gives_the_same_tokens(backend, family):
    original, swapped = pair(family)
    prompt = torch.randint(0, 61, (2, 3), device=DEVICE)
    original.eval()
    swapped.eval()
    with torch.no_grad():
        tokens_original = generate_with_cache(original, prompt, 8)
        tokens_swapped = generate_with_cache(swapped, prompt, 8)
        assert torch.equal(tokens_swapped, tokens_original)
        counter = type(original).counter
        assert getattr(swapped, counter) == getattr(original, counter) == 3 + 8
        # Uncached: positions from 0, whatever the counter says.
        ids = torch.randint(0, 61, (2, 10), device=DEVICE)
        torch.testing.assert_close(swapped(ids), original(ids))


def test_dropout_is_folded_in_and_follows_train_eval(backend):
    original, swapped = pair("llms-from-scratch")
    fused = swapped.__dict__["_tokemb_fast_fused"]
    assert fused.drop is swapped.drop_emb and fused.tok_emb is swapped.tok_emb
    ids = torch.randint(0, 61, (2, 16), device=DEVICE)
    swapped.eval()
    eval_logits = swapped(ids)
    swapped.train()
    assert not torch.equal(swapped(ids), eval_logits)  # dropout active in training
    swapped.drop_emb.p = 0.0
    for block in swapped.trf_blocks:
        block.drop.p = 0.0
        block.att.dropout = 0.0
    torch.testing.assert_close(swapped(ids), eval_logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_idempotent_and_picklable(family):
    _, swapped = pair(family)
    forward = swapped.forward
    assert swap_input_embeddings(swapped) is swapped and swapped.forward is forward
    assert "_tokemb_fast_fused" not in dict(swapped.named_modules())
    ids = torch.randint(0, 61, (2, 8), device=DEVICE)
    swapped.eval()
    for clone in (copy.deepcopy(swapped), pickle.loads(pickle.dumps(swapped))):
        clone.eval()
        assert clone.__dict__["_tokemb_fast_fused"].tok_emb is (
            clone.transformer.wte if family in ("nanogpt", "mingpt") else clone.tok_emb)
        torch.testing.assert_close(logits_of(clone, ids), logits_of(swapped, ids))


def test_unknown_model_gets_an_error_naming_what_was_looked_for():
    with pytest.raises(TypeError, match=r"does not recognise Sequential. It knows:\n  - LLMs-from-scratch "
                                        r"GPTModel: tok_emb, pos_emb, drop_emb.*\(not this model: it has no module "
                                        r"tok_emb\)"):
        swap_input_embeddings(nn.Sequential(nn.Linear(2, 2)))


def test_a_lookalike_with_another_forward_is_left_untouched():
    class ScaledGPT(GPTModel):
        def forward(self, in_idx):  # same attributes, different maths
            x = self.tok_emb(in_idx) * 2 + self.pos_emb(torch.arange(in_idx.shape[1], device=in_idx.device))
            return self.out_head(self.final_norm(self.trf_blocks(self.drop_emb(x))))

    model = ScaledGPT().to(DEVICE)
    with pytest.raises(RuntimeError, match="looks like a LLMs-from-scratch GPTModel, but the swap failed "
                                           r"\(ValueError: its outputs changed after the swap"):
        swap_input_embeddings(model)
    assert "forward" not in model.__dict__ and "_tokemb_fast_fused" not in model.__dict__
    assert model(torch.zeros(1, 3, dtype=torch.long, device=DEVICE)).shape == (1, 3, 61)

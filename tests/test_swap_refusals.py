"""A swap that never leaves a model broken: what is refused up front (TypeError: not a known
family), what fails during the swap (RuntimeError: undone), and that either way the model is
bit-identical to before (outputs, state_dict, Parameters, forward, hooks, attributes)."""
import pytest
import torch
from torch import nn

from conftest import TRITON_DEVICE
from gpt_models import GPTModel, GPTModelKV, GPTModelKVOptimized, MinGPT, NanoGPT
from tokemb_fast import FusedInputEmbedding, supported_families, swap_input_embeddings
from tokemb_fast import module as module_file

DEVICE = TRITON_DEVICE.type


class Fingerprint:
    """Everything a refused or failed swap must leave as it was."""

    def __init__(self, model, call):
        self.model, self.call = model, call
        self.parameters = list(model.parameters())
        self.state = {key: value.clone() for key, value in model.state_dict().items()}
        self.modules = list(model.modules())
        self.attributes = [sorted(m.__dict__) for m in self.modules]
        self.hooks = [(list(m._forward_hooks), list(m._forward_pre_hooks)) for m in self.modules]
        self.training = [m.training for m in self.modules]
        self.forward = model.__dict__.get("forward")
        self.outputs = self.run()

    def run(self):
        with torch.no_grad():
            torch.manual_seed(0)
            return self.call(self.model)

    def assert_unchanged(self):
        model = self.model
        assert all(a is b for a, b in zip(model.parameters(), self.parameters))
        assert len(list(model.parameters())) == len(self.parameters)
        for key, value in model.state_dict().items():
            assert torch.equal(value, self.state[key]), key
        assert list(model.modules()) == self.modules
        assert [sorted(m.__dict__) for m in model.modules()] == self.attributes
        assert [(list(m._forward_hooks), list(m._forward_pre_hooks)) for m in model.modules()] == self.hooks
        assert [m.training for m in model.modules()] == self.training
        assert model.__dict__.get("forward") is self.forward
        after = self.run()
        for expected, got in zip(self.outputs if isinstance(self.outputs, tuple) else (self.outputs,),
                                 after if isinstance(after, tuple) else (after,)):
            assert (expected is None and got is None) or torch.equal(expected, got)


def ids(seq_len=6):
    return torch.randint(0, 61, (2, seq_len), device=DEVICE)


def logits(model):
    return model(torch.arange(12, device=DEVICE).reshape(2, 6) % 61)


def test_supported_families_are_listed_for_users():
    names = [family.name for family in supported_families()]
    assert names[:6] == ["LLMs-from-scratch GPTModel",
                         "LLMs-from-scratch GPTModel with KV cache (ch04/03_kv-cache/gpt_with_kv_cache.py)",
                         "LLMs-from-scratch GPTModel with KV cache (ch04/03_kv-cache/gpt_with_kv_cache_optimized.py)",
                         "LLMs-from-scratch GPTModel with KVCache (llms_from_scratch.kv_cache.gpt2)",
                         "nanoGPT GPT", "minGPT GPT"]
    assert {"Hugging Face GPT-2", "Hugging Face GPT-Neo", "Hugging Face GPTBigCode", "Hugging Face OPT",
            "Hugging Face BioGPT"} <= set(names)
    for family in supported_families():
        assert family.description and family.fused


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="swap_input_embeddings takes an nn.Module"):
        swap_input_embeddings("gpt2")


def test_unknown_model_lists_every_family_and_why_not():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError) as raised:
        swap_input_embeddings(model)
    message = str(raised.value)
    assert message.startswith("swap_input_embeddings does not recognise Sequential. It knows:")
    for family in supported_families():
        assert f"  - {family.name}: {family.description} (not this model: " in message


class HookedGPT(GPTModel):
    pass


def lookalike(kind):
    """(model, the reason the TypeError must give) for each way of only looking like a family."""
    torch.manual_seed(0)
    if kind == "hook on tok_emb":
        model = GPTModel()
        model.tok_emb.register_forward_hook(lambda module, args, out: out * 1.0)
        return model, "tok_emb has forward hooks, backward hooks or a replaced forward"
    if kind == "backward hook on pos_emb":
        # (Accepted once, and then no call was ever fused: the per-call check counts backward hooks.)
        model = GPTModel()
        model.pos_emb.register_full_backward_hook(lambda module, grad_in, grad_out: None)
        return model, "pos_emb has forward hooks, backward hooks or a replaced forward"
    if kind == "tok_emb with a forward of its own":
        class Scaled(nn.Embedding):
            def forward(self, input):
                return super().forward(input) * 2
        model = GPTModel()
        model.tok_emb = Scaled(61, 32)
        return model, r"tok_emb \(Scaled\) has a forward of its own"
    if kind == "drop_emb is not a Dropout":
        model = GPTModel()
        model.drop_emb = nn.Identity()
        return model, "drop_emb is a Identity, not an Dropout"
    if kind == "forward signature":
        class Extra(GPTModel):
            def forward(self, in_idx, temperature=1.0):
                return super().forward(in_idx) / temperature
        return Extra(), r"its forward takes \(in_idx, temperature=1.0\), not \(in_idx\)"
    if kind == "replaced forward":
        model = GPTModel()
        model.forward = lambda in_idx: GPTModel.forward(model, in_idx)
        return model, "its forward was replaced on the instance"
    if kind == "blocks' calling convention":
        class Block(nn.Module):
            def forward(self, x, mask):
                return x
        model = GPTModelKV()
        model.trf_blocks = nn.ModuleList([Block()])
        return model, r"trf_blocks\[0\] cannot be called as block\(x, use_cache=...\)"
    if kind == "cache counter missing":
        model = GPTModelKV()
        del model.current_pos
        return model, "it has no int current_pos counter"
    if kind == "nanoGPT without config.block_size":
        model = NanoGPT()
        del model.config
        return model, "it has no config.block_size"
    raise ValueError(kind)


LOOKALIKES = ["hook on tok_emb", "backward hook on pos_emb", "tok_emb with a forward of its own",
              "drop_emb is not a Dropout", "forward signature", "replaced forward", "blocks' calling convention",
              "cache counter missing", "nanoGPT without config.block_size"]


@pytest.mark.parametrize("kind", LOOKALIKES)
@pytest.mark.parametrize("verify", [True, False])
def test_a_lookalike_is_refused_up_front_and_untouched(kind, verify):
    model, reason = lookalike(kind)
    model = model.to(DEVICE).eval()
    fingerprint = Fingerprint(model, lambda m: None)
    with pytest.raises(TypeError, match=reason):
        swap_input_embeddings(model, verify=verify)
    fingerprint.assert_unchanged()


def test_same_layout_different_maths_is_undone():
    class ScaledGPT(GPTModel):
        def forward(self, in_idx):  # the family's attributes and signature, other maths
            x = self.tok_emb(in_idx) * 2 + self.pos_emb(torch.arange(in_idx.shape[1], device=in_idx.device))
            return self.out_head(self.final_norm(self.trf_blocks(self.drop_emb(x))))

    model = ScaledGPT().to(DEVICE)
    fingerprint = Fingerprint(model, logits)
    with pytest.raises(RuntimeError, match=r"looks like a LLMs-from-scratch GPTModel, but the swap failed \(ValueError: "
                                           r"its outputs changed after the swap") as raised:
        swap_input_embeddings(model)
    assert isinstance(raised.value.__cause__, ValueError)
    fingerprint.assert_unchanged()


def test_an_exception_inside_the_probe_is_undone():
    class Fragile(GPTModelKV):
        def forward(self, in_idx, use_cache=False):
            if not self.training and in_idx.shape[1] < 5:
                raise ArithmeticError("this model refuses short inputs in eval mode")
            return super().forward(in_idx, use_cache=use_cache)

    model = Fragile().to(DEVICE).train()
    fingerprint = Fingerprint(model, lambda m: m(ids(8)))
    with pytest.raises(RuntimeError, match=r"but the swap failed \(ArithmeticError: this model refuses short") as raised:
        swap_input_embeddings(model)
    assert isinstance(raised.value.__cause__, ArithmeticError)
    fingerprint.assert_unchanged()


@pytest.mark.parametrize("family", [GPTModel, GPTModelKV, GPTModelKVOptimized, NanoGPT, MinGPT])
def test_an_exception_while_installing_is_undone(family, monkeypatch):
    model = family().to(DEVICE)
    fingerprint = Fingerprint(model, logits)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while building the fused module")

    monkeypatch.setattr(module_file.FusedInputEmbedding, "from_embeddings", broken)
    with pytest.raises(RuntimeError, match="simulated failure.*the model was left as it was"):
        swap_input_embeddings(model)
    fingerprint.assert_unchanged()
    monkeypatch.undo()
    swap_input_embeddings(model)  # and it can be swapped afterwards
    assert isinstance(model.__dict__["_tokemb_fast_fused"], FusedInputEmbedding)


def test_the_probe_changes_nothing_in_a_swapped_model():
    # Mixed train/eval submodules, a KV cache's counters and cached tensors: a probe forward
    # (eval, no grad) must not leave its traces.
    model = GPTModelKVOptimized().to(DEVICE).train()
    model.trf_blocks[1].eval()
    with torch.no_grad():
        model(ids(3), use_cache=True)  # a cache in progress
    cached = [block.att.cache_k for block in model.trf_blocks]
    position = model.ptr_current_pos
    training = [m.training for m in model.modules()]
    swap_input_embeddings(model)
    assert model.ptr_current_pos == position == 3
    assert all(block.att.cache_k is tensor for block, tensor in zip(model.trf_blocks, cached))
    assert [m.training for m in model.modules()] == training


def test_supported_families_print_as_words():
    for family in supported_families():
        text = repr(family)
        assert text.startswith(f"Family({family.name!r}: ") and "lambda" not in text and "function" not in text

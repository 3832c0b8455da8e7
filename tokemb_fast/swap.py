"""``swap_input_embeddings(model)``: fuse a GPT model's token + position embedding (+ its embedding
dropout) in place, for the model families people already have.

How: the model's own ``nn.Embedding`` (and ``nn.Dropout``) modules stay where they are, so the
state_dict, checkpoints, weight loaders and weight tying are untouched. The instance's ``forward``
is replaced by that family's forward with ``drop(tok_emb(idx) + pos_emb(pos))`` done by
``FusedInputEmbedding.from_embeddings`` (which reads the modules' weights, options and train/eval
mode at every call). The fused module is kept outside the module tree (no duplicate state_dict
keys). A probe forward before and after the swap must give the same logits, or the swap is undone
and an error raised: a model that merely looks like a family is never silently changed.
"""
import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .module import FusedInputEmbedding

_MARK = "_tokemb_fast_swapped"


def _fused(model) -> FusedInputEmbedding:
    return model.__dict__["_tokemb_fast_fused"]


# --- LLMs-from-scratch GPTModel -------------------------------------------------------------

def _llms_from_scratch_forward(self, in_idx):
    x = _fused(self)(in_idx)
    x = self.trf_blocks(x)
    x = self.final_norm(x)
    return self.out_head(x)


def _llms_from_scratch_kv_forward(self, in_idx, use_cache=False):
    # Positions run on from the cache's length when decoding with the cache, else start at 0.
    past_length = self.current_pos if use_cache else 0
    x = _fused(self)(in_idx, past_length=int(past_length))
    if use_cache:
        self.current_pos += in_idx.shape[1]
    for block in self.trf_blocks:
        x = block(x, use_cache=use_cache)
    x = self.final_norm(x)
    return self.out_head(x)


# --- nanoGPT GPT ----------------------------------------------------------------------------

def _nanogpt_forward(self, idx, targets=None):
    seq_len = idx.shape[1]
    block_size = getattr(getattr(self, "config", None), "block_size", self.transformer.wpe.num_embeddings)
    if seq_len > block_size:
        raise ValueError(f"Cannot forward sequence of length {seq_len}, block size is only {block_size}")
    x = _fused(self)(idx)
    for block in self.transformer.h:
        x = block(x)
    x = self.transformer.ln_f(x)
    if targets is not None:
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
    else:
        # Inference: only the last position's logits, as nanoGPT does.
        logits = self.lm_head(x[:, [-1], :])
        loss = None
    return logits, loss


# --- Hugging Face GPT2Model / GPT2LMHeadModel -----------------------------------------------------
#
# GPT2Model.forward (transformers 4.45 to 5.x) does, in this order: inputs_embeds = wte(input_ids);
# position_ids from the argument or the cache length; wpe(position_ids); inputs_embeds + that;
# + wte(token_type_ids) if given; drop. Its forward is long and changes between versions, so it
# is not replaced. Instead wte and wpe become nn.Embedding subclasses sharing the same Parameters
# (same state_dict keys, lm_head tying intact), armed by a pre-hook when input_ids are given:
# wte(input_ids) stashes the ids and returns a zero placeholder that costs nothing (stride 0, right
# shape, dtype and device, which is all the mask code reads); wpe(position_ids) returns the fused
# sum. HF's own "+" with the placeholder remains: one elementwise pass over B*T*D.

class _DeferredTokenEmbedding(nn.Embedding):
    def forward(self, input):
        state = self.__dict__.get("_tokemb_fast_state")
        if state is not None and state["expect"] == "input_ids":
            state["expect"], state["input_ids"] = "position_ids", input
            return self.weight.new_zeros(()).expand(*input.shape, self.embedding_dim)
        return super().forward(input)  # token_type_ids, or a call from outside GPT2Model.forward


class _FusedPositionEmbedding(nn.Embedding):
    def forward(self, input):
        state = self.__dict__.get("_tokemb_fast_state")
        if state is not None and state["expect"] == "position_ids":
            state["expect"] = None
            # position_ids arrive as [1, T] or [B, T]: both mean what they mean to nn.Embedding.
            return state["fused"](state.pop("input_ids"), position_ids=input)
        return super().forward(input)


def _arm_fused_lookup(transformer, args, kwargs):
    state = transformer.wte.__dict__.get("_tokemb_fast_state")
    if state is not None:  # absent if wte was replaced since (resize_token_embeddings)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        state["expect"] = "input_ids" if input_ids is not None else None
        state.pop("input_ids", None)


def _install_hugging_face(model, check_ids):
    transformer = model.transformer if hasattr(model, "transformer") else model
    wte, wpe = transformer.wte, transformer.wpe
    old_classes = (type(wte), type(wpe))
    wte.__class__, wpe.__class__ = _DeferredTokenEmbedding, _FusedPositionEmbedding  # same objects and Parameters
    # Dropout is not folded: token_type embeddings are added between the sum and transformer.drop.
    state = {"expect": None, "fused": FusedInputEmbedding.from_embeddings(wte, wpe, check_ids=check_ids)}
    wte.__dict__["_tokemb_fast_state"] = wpe.__dict__["_tokemb_fast_state"] = state
    handle = transformer.register_forward_pre_hook(_arm_fused_lookup, with_kwargs=True)

    def undo():
        handle.remove()
        wte.__class__, wpe.__class__ = old_classes
        del wte.__dict__["_tokemb_fast_state"], wpe.__dict__["_tokemb_fast_state"]
    return undo


def _is_hugging_face(model) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def _hugging_face_gpt2(model) -> bool:
    transformer = model.transformer if hasattr(model, "transformer") else model
    return _is_hugging_face(model) and type(getattr(transformer, "wte", None)) is nn.Embedding and \
        type(getattr(transformer, "wpe", None)) is nn.Embedding and hasattr(transformer, "drop")


# --- LLMs-from-scratch and nanoGPT: the family's forward with the fused embedding ------------------

def _forward_installer(forward, tok_emb, pos_emb, dropout):
    def install(model, check_ids):
        drop = dropout if isinstance(dropout, nn.Dropout) else 0.0
        model.__dict__["_tokemb_fast_fused"] = FusedInputEmbedding.from_embeddings(
            tok_emb, pos_emb, dropout=drop, check_ids=check_ids)
        previous = model.__dict__.get("forward")
        # A partial of a module-level function (not a bound method), so that pickling the whole
        # model (torch.save(model)) and copy.deepcopy keep working.
        model.forward = functools.partial(forward, model)

        def undo():
            del model.__dict__["_tokemb_fast_fused"], model.__dict__["forward"]
            if previous is not None:
                model.forward = previous
        return undo
    return install


def _recognise(model):
    """(family name, installer) or None."""
    if _hugging_face_gpt2(model):
        return "Hugging Face GPT2", _install_hugging_face
    names = ("tok_emb", "pos_emb", "drop_emb", "trf_blocks", "final_norm", "out_head")
    if all(hasattr(model, n) for n in names) and isinstance(model.tok_emb, nn.Embedding) and \
            isinstance(model.pos_emb, nn.Embedding):
        if hasattr(model, "current_pos"):
            return ("LLMs-from-scratch GPTModel (KV cache)",
                    _forward_installer(_llms_from_scratch_kv_forward, model.tok_emb, model.pos_emb, model.drop_emb))
        return ("LLMs-from-scratch GPTModel",
                _forward_installer(_llms_from_scratch_forward, model.tok_emb, model.pos_emb, model.drop_emb))
    transformer = getattr(model, "transformer", None)
    if transformer is not None and hasattr(model, "lm_head") and not _is_hugging_face(model) and \
            all(hasattr(transformer, n) for n in ("wte", "wpe", "drop", "h", "ln_f")) and \
            isinstance(transformer.wte, nn.Embedding) and isinstance(transformer.wpe, nn.Embedding):
        return "nanoGPT GPT", _forward_installer(_nanogpt_forward, transformer.wte, transformer.wpe, transformer.drop)
    return None


FAMILIES = (
    "LLMs-from-scratch GPTModel: tok_emb, pos_emb, drop_emb, trf_blocks, final_norm, out_head "
    "(with current_pos: the KV-cache variant)",
    "nanoGPT GPT: transformer.wte, transformer.wpe, transformer.drop, transformer.h, transformer.ln_f, lm_head",
    "Hugging Face GPT2Model / GPT2LMHeadModel: transformer.wte, transformer.wpe, transformer.drop",
)


def swap_input_embeddings(model: nn.Module, *, check_ids: bool = True, verify: bool = True) -> nn.Module:
    """Fuse ``model``'s input embedding (and, where the family allows, its embedding dropout) in
    place; return ``model``.

    Idempotent. ``verify`` runs a 4-token probe (eval mode, no grad) before and after and undoes
    the swap with a ``RuntimeError`` if the logits differ. Raises ``TypeError`` naming what it
    looked for when the model is not of a known family.
    """
    if getattr(model, _MARK, False):
        return model
    found = _recognise(model)
    if found is None:
        raise TypeError(
            f"swap_input_embeddings does not recognise {type(model).__name__}; it looks for one of: "
            + "; ".join(FAMILIES))
    family, install = found
    probe = _probe(model) if verify else None
    before = probe() if probe else None
    undo = install(model, check_ids)
    if probe is not None:
        after = probe()
        if not _same(before, after):
            undo()
            difference = (before - after).abs().max().item() if before.shape == after.shape else float("nan")
            raise RuntimeError(
                f"{type(model).__name__} looks like a {family} but its logits changed after the swap "
                f"(max difference {difference:.3g}); its forward must differ from that family's, so the swap "
                "was undone")
    model.__dict__[_MARK] = True
    model.__dict__["tokemb_fast_family"] = family
    return model


def _embeddings(model):
    transformer = getattr(model, "transformer", model)
    if hasattr(model, "tok_emb"):
        return model.tok_emb, model.pos_emb
    return transformer.wte, transformer.wpe


def _probe(model) -> Callable[[], torch.Tensor]:
    tok_emb, pos_emb = _embeddings(model)
    seq_len = min(4, pos_emb.num_embeddings)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok_emb.num_embeddings, (1, seq_len), generator=generator).to(tok_emb.weight.device)

    def run():
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(ids)
        finally:
            model.train(training)
        for name in ("logits", "last_hidden_state"):
            if hasattr(out, name):
                out = getattr(out, name)
                break
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().float()
    return run


def _same(before: torch.Tensor, after: torch.Tensor) -> bool:
    if before.shape != after.shape:
        return False
    # The fused sum rounds once like the eager one; later layers may amplify last-bit differences
    # on a GPU (different kernels), so allow a little, scaled to the logits' size.
    scale = before.abs().max().clamp_min(1.0)
    return bool(((before - after).abs().max() <= 1e-3 * scale).item())

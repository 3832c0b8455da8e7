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
from typing import Callable, Optional

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


# --- family recognition -----------------------------------------------------------------------

def _is_embedding(module) -> bool:
    return isinstance(module, nn.Embedding)


def _recognise(model):
    """(family name, tok_emb, pos_emb, dropout, forward) or None."""
    names = ("tok_emb", "pos_emb", "drop_emb", "trf_blocks", "final_norm", "out_head")
    if all(hasattr(model, n) for n in names) and _is_embedding(model.tok_emb) and _is_embedding(model.pos_emb):
        if hasattr(model, "current_pos"):
            return ("LLMs-from-scratch GPTModel (KV cache)", model.tok_emb, model.pos_emb, model.drop_emb,
                    _llms_from_scratch_kv_forward)
        return ("LLMs-from-scratch GPTModel", model.tok_emb, model.pos_emb, model.drop_emb,
                _llms_from_scratch_forward)
    transformer = getattr(model, "transformer", None)
    if transformer is not None and hasattr(model, "lm_head") and \
            all(hasattr(transformer, n) for n in ("wte", "wpe", "drop", "h", "ln_f")) and \
            _is_embedding(transformer.wte) and _is_embedding(transformer.wpe) and \
            not _is_hugging_face(model):
        return ("nanoGPT GPT", transformer.wte, transformer.wpe, transformer.drop, _nanogpt_forward)
    return None


def _is_hugging_face(model) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


FAMILIES = (
    "LLMs-from-scratch GPTModel: tok_emb, pos_emb, drop_emb, trf_blocks, final_norm, out_head "
    "(with current_pos: the KV-cache variant)",
    "nanoGPT GPT: transformer.wte, transformer.wpe, transformer.drop, transformer.h, transformer.ln_f, lm_head",
)


def swap_input_embeddings(model: nn.Module, *, check_ids: bool = True, verify: bool = True) -> nn.Module:
    """Fuse ``model``'s input embedding (and its embedding dropout) in place; return ``model``.

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
    family, tok_emb, pos_emb, dropout, forward = found
    if not isinstance(dropout, nn.Dropout):
        dropout = 0.0
    fused = FusedInputEmbedding.from_embeddings(tok_emb, pos_emb, dropout=dropout, check_ids=check_ids)
    probe = _probe(model, tok_emb, pos_emb) if verify else None
    before = probe() if probe else None
    model.__dict__["_tokemb_fast_fused"] = fused
    had_forward = "forward" in model.__dict__
    previous_forward = model.__dict__.get("forward")
    # A partial of a module-level function (not a bound method) so that pickling the whole model
    # (torch.save(model)) and copy.deepcopy keep working.
    model.forward = functools.partial(forward, model)
    setattr(model, _MARK, True)
    if probe is not None:
        after = probe()
        if not _same(before, after):
            _undo(model, had_forward, previous_forward)
            raise RuntimeError(
                f"{type(model).__name__} looks like a {family} but its logits changed after the swap "
                f"(max difference {(before - after).abs().max().item():.3g}); its forward must differ from "
                "that family's, so the swap was undone")
    model.tokemb_fast_family = family
    return model


def _undo(model, had_forward, previous_forward):
    del model.__dict__["_tokemb_fast_fused"]
    del model.__dict__["forward"]
    if had_forward:
        model.forward = previous_forward
    delattr(model, _MARK)


def _probe(model, tok_emb, pos_emb) -> Optional[Callable[[], torch.Tensor]]:
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
        logits = out[0] if isinstance(out, tuple) else out
        return logits.detach().float()
    return run


def _same(before: torch.Tensor, after: torch.Tensor) -> bool:
    if before.shape != after.shape:
        return False
    # The fused sum rounds once like the eager one; later layers may amplify last-bit differences
    # on a GPU (different kernels), so allow a little, scaled to the logits' size.
    scale = before.abs().max().clamp_min(1.0)
    return bool(((before - after).abs().max() <= 1e-3 * scale).item())

"""``swap_input_embeddings(model)``: fuse a GPT model's token + position embedding (+ its embedding
dropout where the family allows) in place, for the model families people already have.

The model's own embedding (and dropout) modules stay where they are, so the state_dict,
checkpoints, weight loaders and weight tying are untouched; ``FusedInputEmbedding.from_embeddings``
reads their weights, options and train/eval mode at every call. What changes depends on the family:

* LLMs-from-scratch, nanoGPT, minGPT (short forwards): the instance's ``forward`` becomes that
  family's forward with ``drop(tok_emb(idx) + pos_emb(positions))`` done by the fused op.
* Hugging Face (long forwards that change between versions, so they are not replaced): the token
  and position modules get an instance-level ``forward``; within one call of the base model, the
  token lookup of ``input_ids`` returns a zero placeholder and the position lookup the fused sum.

A family is recognised by what it is: its modules' types, its forward's signature and its blocks'
calling convention, and no hooks on the modules a fused call would skip. Anything else is
refused with a ``TypeError`` that says what did not match. The swap is transactional: a probe
forward (eval mode, no grad) runs before and after, and if anything goes wrong (an exception,
different outputs) the model is restored exactly as it was and a ``RuntimeError`` raised.
"""
import contextlib
import functools
import inspect
import itertools
import math
import numbers
import threading
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .module import FusedEncoderEmbedding, FusedInputEmbedding, encoder_lookup_with, lookup_with
from .options import check_mode

_MARK = "_tokemb_fast_swapped"
_FUSED = "_tokemb_fast_fused"
_HF_STATE = "_tokemb_fast_hf"


class Family(NamedTuple):
    """A model family swap_input_embeddings knows."""

    name: str
    #: What it looks for, in words (the TypeError for unknown models and supported_families()).
    description: str
    #: What the swap fuses and what stays a separate pass.
    fused: str
    #: model -> None when the model is of this family, else why not (one line).
    mismatch: Callable[[nn.Module], Optional[str]]
    #: (model, check_ids) -> None: the swap itself (undone by restoring the model's snapshot).
    install: Callable[[nn.Module, object], None]
    #: model -> callable running one probe forward (eval mode, no grad), returning its outputs.
    probe: Callable[[nn.Module], Callable[[], List[torch.Tensor]]]

    def __repr__(self) -> str:  # (the callables say nothing to a reader)
        return f"Family({self.name!r}: {self.description}; fuses {self.fused})"


def supported_families() -> List[Family]:
    """The families swap_input_embeddings knows, in the order it tries them."""
    return list(_FAMILIES)


# --- recognition helpers ------------------------------------------------------------------------

def _parameters(function) -> List[str]:
    """A forward's parameters after self, as 'name' or 'name=default'."""
    names = []
    for name, parameter in list(inspect.signature(function).parameters.items())[1:]:
        names.append(name if parameter.default is inspect.Parameter.empty else f"{name}={parameter.default!r}")
    return names


def _forward_of(module) -> Callable:
    return type(module).forward


def _plain(module, kind, name) -> Optional[str]:
    """Why ``module`` is not a plain ``kind`` (nn.Embedding / nn.Dropout) the fused op may stand
    in for, or None: a subclass with its own forward, or hooks a fused call would skip."""
    if not isinstance(module, kind):
        return f"{name} is a {type(module).__name__}, not an {kind.__name__}"
    if _forward_of(module) is not kind.forward:
        return f"{name} ({type(module).__name__}) has a forward of its own"
    return _no_hooks(module, name)


def _no_hooks(module, name, own_forward=None) -> Optional[str]:
    """Why a fused call could not stand in for module's calls (hooks; a forward replaced on the
    instance, unless by the swap itself: a partial of own_forward), or None."""
    replaced = module.__dict__.get("forward")
    if replaced is not None and own_forward is not None and getattr(replaced, "func", None) is own_forward:
        replaced = None
    if _hooked(module) or replaced is not None:
        return f"{name} has forward hooks, backward hooks or a replaced forward, which a fused call would skip"
    return None


def _hooked(module) -> bool:
    """Whether a call of ``module`` runs hooks (forward, or backward ones, which hang on its call) that
    a fused call, which never calls it, would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _any_bypassed(*modules) -> bool:
    """Whether any of ``modules`` has what a fused call would skip of a module the swap did not patch
    itself: _hooked's hooks, or a forward replaced on the instance. Checked at every call, so spelt
    out (about 0.1 us a module)."""
    for module in modules:
        attributes = module.__dict__
        if attributes["_forward_hooks"] or attributes["_forward_pre_hooks"] or attributes["_backward_hooks"] \
                or attributes["_backward_pre_hooks"] or "forward" in attributes:
            return True
    return False


def _mixed_dtypes(token, position) -> bool:
    """Whether the two tables now differ in dtype (one cast on its own after the swap, e.g. the
    large token table kept in bf16): the original's "+" promotes, the fused op takes one dtype, so
    such a call runs the original's arithmetic. Checked at every call, so spelt out (0.25 us)."""
    # (A parameter's own dict first: nn.Module.__getattr__ costs 0.5 us. A parametrized weight is
    # not there; a module without a weight is another kind, which the callers refuse anyway.)
    token_weight, position_weight = token._parameters.get("weight"), position._parameters.get("weight")
    if token_weight is None or position_weight is None:
        token_weight, position_weight = getattr(token, "weight", None), getattr(position, "weight", None)
        if token_weight is None or position_weight is None:
            return False
    return token_weight.dtype is not position_weight.dtype


def _signature_mismatch(model, expected) -> Optional[str]:
    if "forward" in model.__dict__:
        return "its forward was replaced on the instance"
    found = _parameters(_forward_of(model))
    if found != expected:
        return f"its forward takes ({', '.join(found)}), not ({', '.join(expected)})"
    return None


def _blocks_mismatch(blocks, container, keywords, name) -> Optional[str]:
    """Why the blocks cannot be called as the family's forward calls them: block(x, **keywords)."""
    if not isinstance(blocks, container):
        return f"{name} is a {type(blocks).__name__}, not an {container.__name__}"
    call = "(x" + "".join(f", {keyword}=..." for keyword in keywords) + ")"
    for index, block in enumerate(blocks):
        try:
            inspect.signature(_forward_of(block)).bind(block, None, **{keyword: None for keyword in keywords})
        except TypeError:
            return f"{name}[{index}] cannot be called as block{call}"
    return None


def _first(*checks) -> Optional[str]:
    """The first failed check, evaluating lazily (each a callable returning None or a reason)."""
    for check in checks:
        reason = check()
        if reason is not None:
            return reason
    return None


def _fused(model) -> FusedInputEmbedding:
    return model.__dict__[_FUSED]


def _embed(model, tok_emb, pos_emb, dropout, input_ids, past_length=0, batched_positions=False):
    """A swapped decoder's embedding stage, given the model's modules as they are now.

    Fused while they are the ones the swap wrapped and nothing hangs on their calls. Modules
    replaced since (a new table, another Dropout) are wrapped in turn if they are still plain ones.
    Otherwise (hooks added since, a replaced forward, another kind of module) the call runs the
    original's own arithmetic through the modules themselves, so that hooks see what they would
    have seen in the unswapped model (batched_positions: the original looks positions up as [1, T])."""
    fused = model.__dict__[_FUSED]
    wrapped = fused._modules
    mixed = _mixed_dtypes(tok_emb, pos_emb)
    if wrapped["tok_emb"] is not tok_emb or wrapped["pos_emb"] is not pos_emb or wrapped["drop"] is not dropout \
            or _any_bypassed(tok_emb, pos_emb, dropout) or mixed:
        # (_plain: the kind, a forward of its own or replaced, forward or backward hooks.)
        if mixed or _first(lambda: _plain(tok_emb, nn.Embedding, "tok_emb"),
                           lambda: _plain(pos_emb, nn.Embedding, "pos_emb"),
                           lambda: _plain(dropout, nn.Dropout, "dropout")) is not None:
            positions = torch.arange(past_length, past_length + input_ids.shape[-1], device=input_ids.device)
            return dropout(tok_emb(input_ids) + pos_emb(positions[None] if batched_positions else positions))
        if torch.compiler.is_compiling():  # (no module is built in a traced region: the same call without one)
            return lookup_with(tok_emb, pos_emb, dropout, fused.check_ids, fused.token_scale, fused.backend, input_ids,
                               None, past_length)
        fused = FusedInputEmbedding.from_embeddings(tok_emb, pos_emb, dropout=dropout, check_ids=fused.check_ids,
                                                    token_scale=fused.token_scale, backend=fused.backend)
        model.__dict__[_FUSED] = fused
    return fused(input_ids, None, past_length)  # (positionally: keywords cost nn.Module's call ~0.3 us)


def _install_forward(forward, tok_emb, pos_emb, dropout, bound=()):
    """An installer that replaces the instance's forward with ``forward`` (a module-level function,
    bound with the model and ``bound`` through functools.partial, so that torch.save(model) and
    copy.deepcopy keep working)."""
    def install(model, check_ids):
        model.__dict__[_FUSED] = FusedInputEmbedding.from_embeddings(
            tok_emb(model), pos_emb(model), dropout=dropout(model), check_ids=check_ids)
        model.forward = functools.partial(forward, model, *bound)
        model.__prepare_scriptable__ = functools.partial(_refuse_script, type(model).__name__)
    return install


def _refuse_script(name):
    # torch.jit.script would compile the class's forward, i.e. the model without the fusion.
    raise RuntimeError(f"torch.jit.script cannot compile {name} as swapped by tokemb-fast: TorchScript compiles a "
                       f"class's forward, not the fused one installed on this model, and it is deprecated in "
                       f"PyTorch. Use torch.export.export (see docs/shipping.md) or torch.jit.trace.")


def _probe_ids(model, vocab_size, context_length, seq_len=4):
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    seq_len = min(seq_len, context_length)
    return torch.randint(0, vocab_size, (2, seq_len), generator=generator).to(parameter.device)


# --- LLMs-from-scratch GPTModel ---------------------------------------------------------------
# (rasbt/LLMs-from-scratch: ch04 GPTModel and GPTModelFast; ch04/03_kv-cache gpt_with_kv_cache.py
# and gpt_with_kv_cache_optimized.py; the llms_from_scratch package's kv_cache/gpt2.py.)

def _lfs_lookup(self, in_idx, past_length=0):
    modules = self._modules
    return _embed(self, modules["tok_emb"], modules["pos_emb"], modules["drop_emb"], in_idx, past_length)


def _lfs_forward(self, in_idx):
    batch_size, seq_len = in_idx.shape
    x = _lfs_lookup(self, in_idx)
    x = self.trf_blocks(x)
    x = self.final_norm(x)
    return self.out_head(x)


def _lfs_cache_forward(self, position_attribute, overflow_error, in_idx, use_cache=False):
    # ch04/03_kv-cache: positions run on from the cache's length with use_cache, else start at 0;
    # the counter moves before the lookup, as there. Positions past pos_emb fail as the original's
    # do (_overflow_error): before the counter moves, with its exception type, or after.
    batch_size, seq_len = in_idx.shape
    past_length = 0
    if use_cache:
        past_length = getattr(self, position_attribute)
        context_length = self.pos_emb.num_embeddings
        if overflow_error is not None and past_length + seq_len > context_length:
            raise overflow_error(f"Position embedding overflow: positions {past_length}..{past_length + seq_len - 1} "
                                 f"({position_attribute}={past_length}, {seq_len} new tokens) run past pos_emb's "
                                 f"{context_length} rows")
        setattr(self, position_attribute, past_length + seq_len)
    x = _lfs_lookup(self, in_idx, int(past_length))
    for block in self.trf_blocks:
        x = block(x, use_cache=use_cache)
    x = self.final_norm(x)
    return self.out_head(x)


def _lfs_package_cache_forward(self, in_idx, use_cache=False, cache=None):
    # llms_from_scratch.kv_cache.gpt2: positions always start at current_pos, which moves only with
    # use_cache; blocks take (x, use_cache, start_pos, cache) and return (x, their cache).
    batch_size, seq_len = in_idx.shape
    x = _lfs_lookup(self, in_idx, int(self.current_pos))
    if use_cache:
        start_pos = self.current_pos
        self.current_pos += seq_len
    else:
        start_pos = 0
    next_cache = []
    for index, block in enumerate(self.trf_blocks):
        block_cache = cache.get(index) if cache else None
        x, new_cache = block(x, use_cache=use_cache, start_pos=start_pos, cache=block_cache)
        if cache:
            cache.update(index, new_cache)
        next_cache.append(new_cache)
    x = self.final_norm(x)
    return self.out_head(x)


def _lfs_modules(model) -> Optional[str]:
    for name in ("tok_emb", "pos_emb", "drop_emb", "trf_blocks", "final_norm", "out_head"):
        if not isinstance(getattr(model, name, None), nn.Module):
            return f"it has no module {name}"
    return _first(lambda: _plain(model.tok_emb, nn.Embedding, "tok_emb"),
                  lambda: _plain(model.pos_emb, nn.Embedding, "pos_emb"),
                  lambda: _plain(model.drop_emb, nn.Dropout, "drop_emb"))


def _int_attribute(model, name) -> Optional[str]:
    value = model.__dict__.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        return f"it has no int {name} counter"
    return None


def _lfs_probe(model):
    ids = _probe_ids(model, model.tok_emb.num_embeddings, model.pos_emb.num_embeddings)
    return lambda: [model(ids)]


_LFS_TABLES = dict(tok_emb=lambda m: m.tok_emb, pos_emb=lambda m: m.pos_emb, dropout=lambda m: m.drop_emb)
_LFS_FUSED = "tok_emb + pos_emb and drop_emb, in one kernel (dropout follows model.train()/eval())"

LLMS_FROM_SCRATCH = Family(
    "LLMs-from-scratch GPTModel",
    "tok_emb, pos_emb, drop_emb, trf_blocks (nn.Sequential of blocks called as block(x)), final_norm, "
    "out_head; forward(in_idx) (ch04 GPTModel and GPTModelFast)",
    _LFS_FUSED,
    lambda m: _first(lambda: _lfs_modules(m), lambda: _signature_mismatch(m, ["in_idx"]),
                     lambda: _blocks_mismatch(m.trf_blocks, nn.Sequential, (), "trf_blocks")),
    _install_forward(_lfs_forward, **_LFS_TABLES),
    _lfs_probe)


class _ReachedPositionLookup(Exception):
    """Raised by _overflow_error's hook in place of an out-of-range position lookup."""


def _overflow_error(model, attribute):
    """How the original cached forward fails when the positions would run past pos_emb: the
    exception type it raises before moving its counter (later versions of ch04/03_kv-cache assert
    first), or None where it moves the counter and the lookup fails (as the fused lookup then
    does, with IndexError). Found by running it with the counter at the table's end; a hook stops
    the lookup itself, so nothing out of range is read on any device. The model is left as it was."""
    def stop(_module, _args):
        raise _ReachedPositionLookup()

    with _probing(model):
        try:
            setattr(model, attribute, model.pos_emb.num_embeddings)
            model.pos_emb.register_forward_pre_hook(stop)
            type(model).forward(model, torch.zeros((1, 1), dtype=torch.long, device=model.pos_emb.weight.device),
                                use_cache=True)
        except _ReachedPositionLookup:
            return None
        except Exception as error:  # noqa: BLE001  (whatever the original raises, the swapped forward raises)
            return type(error) if getattr(model, attribute) == model.pos_emb.num_embeddings else None
    raise TypeError("its forward with use_cache=True does not fail when the positions run past pos_emb; "
                    "the fused lookup would")


def _install_cache_forward(attribute):
    def install(model, check_ids):
        _install_forward(_lfs_cache_forward, **_LFS_TABLES, bound=(attribute, _overflow_error(model, attribute)))(
            model, check_ids)
    return install


def _cache_family(attribute, source):
    return Family(
        f"LLMs-from-scratch GPTModel with KV cache ({source})",
        f"tok_emb, pos_emb, drop_emb, trf_blocks (nn.ModuleList of blocks called as block(x, use_cache=...)), "
        f"final_norm, out_head, an int {attribute}; forward(in_idx, use_cache=False)",
        _LFS_FUSED + f"; with use_cache=True positions start at {attribute}",
        lambda m: _first(lambda: _lfs_modules(m), lambda: _int_attribute(m, attribute),
                         lambda: _signature_mismatch(m, ["in_idx", "use_cache=False"]),
                         lambda: _blocks_mismatch(m.trf_blocks, nn.ModuleList, ("use_cache",), "trf_blocks")),
        _install_cache_forward(attribute),
        _lfs_probe)


LLMS_FROM_SCRATCH_KV = _cache_family("current_pos", "ch04/03_kv-cache/gpt_with_kv_cache.py")
LLMS_FROM_SCRATCH_KV_OPTIMIZED = _cache_family("ptr_current_pos", "ch04/03_kv-cache/gpt_with_kv_cache_optimized.py")

LLMS_FROM_SCRATCH_PACKAGE_KV = Family(
    "LLMs-from-scratch GPTModel with KVCache (llms_from_scratch.kv_cache.gpt2)",
    "tok_emb, pos_emb, drop_emb, trf_blocks (blocks called as block(x, use_cache=..., start_pos=..., cache=...), "
    "returning (x, cache)), final_norm, out_head, an int current_pos; forward(in_idx, use_cache=False, cache=None)",
    _LFS_FUSED + "; positions start at current_pos",
    lambda m: _first(lambda: _lfs_modules(m), lambda: _int_attribute(m, "current_pos"),
                     lambda: _signature_mismatch(m, ["in_idx", "use_cache=False", "cache=None"]),
                     lambda: _blocks_mismatch(m.trf_blocks, nn.Module, ("use_cache", "start_pos", "cache"),
                                              "trf_blocks")),
    _install_forward(_lfs_package_cache_forward, **_LFS_TABLES),
    _lfs_probe)


# --- nanoGPT and minGPT -----------------------------------------------------------------------

def _check_block_size(seq_len, block_size):
    # (The originals assert; so does this, with their message.)
    if not seq_len <= block_size:
        raise AssertionError(f"Cannot forward sequence of length {seq_len}, block size is only {block_size}")


def _karpathy_lookup(self, idx, batched_positions=False):
    modules = self._modules["transformer"]._modules
    return _embed(self, modules["wte"], modules["wpe"], modules["drop"], idx, 0, batched_positions)


def _nanogpt_forward(self, idx, targets=None):
    b, t = idx.size()
    _check_block_size(t, self.config.block_size)
    x = _karpathy_lookup(self, idx)
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


def _mingpt_forward(self, idx, targets=None):
    b, t = idx.size()
    _check_block_size(t, self.block_size)
    x = _karpathy_lookup(self, idx, batched_positions=True)  # (minGPT: arange(0, t).unsqueeze(0))
    for block in self.transformer.h:
        x = block(x)
    x = self.transformer.ln_f(x)
    logits = self.lm_head(x)
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
    return logits, loss


def _karpathy_modules(model) -> Optional[str]:
    transformer = getattr(model, "transformer", None)
    if not isinstance(transformer, nn.ModuleDict):
        return "it has no transformer ModuleDict"
    if _is_hugging_face(model):
        return "it is a Hugging Face model"
    for name in ("wte", "wpe", "drop", "h", "ln_f"):
        if name not in transformer:
            return f"transformer has no {name}"
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        return "it has no lm_head"
    return _first(lambda: _plain(transformer.wte, nn.Embedding, "transformer.wte"),
                  lambda: _plain(transformer.wpe, nn.Embedding, "transformer.wpe"),
                  lambda: _plain(transformer.drop, nn.Dropout, "transformer.drop"),
                  lambda: _signature_mismatch(model, ["idx", "targets=None"]),
                  lambda: _blocks_mismatch(transformer.h, nn.ModuleList, (), "transformer.h"))


def _nanogpt_block_size(model) -> Optional[str]:
    if not isinstance(getattr(getattr(model, "config", None), "block_size", None), int):
        return "it has no config.block_size (nanoGPT keeps it there)"
    return None


def _mingpt_block_size(model) -> Optional[str]:
    if _nanogpt_block_size(model) is None:
        return "it has config.block_size (nanoGPT's layout)"
    return _int_attribute(model, "block_size")


def _karpathy_probe(model):
    ids = _probe_ids(model, model.transformer.wte.num_embeddings, model.transformer.wpe.num_embeddings)
    # Both branches of the forward: logits (nanoGPT: the last position's), and logits with the loss.
    return lambda: [*model(ids)[:1], *model(ids, ids)]


_KARPATHY_TABLES = dict(tok_emb=lambda m: m.transformer.wte, pos_emb=lambda m: m.transformer.wpe,
                        dropout=lambda m: m.transformer.drop)
_KARPATHY_FUSED = "transformer.wte + transformer.wpe and transformer.drop, in one kernel"

NANOGPT = Family(
    "nanoGPT GPT",
    "transformer.{wte, wpe, drop, h (blocks called as block(x)), ln_f}, lm_head, config.block_size; "
    "forward(idx, targets=None) returning (logits, loss)",
    _KARPATHY_FUSED,
    lambda m: _first(lambda: _karpathy_modules(m), lambda: _nanogpt_block_size(m)),
    _install_forward(_nanogpt_forward, **_KARPATHY_TABLES),
    _karpathy_probe)

MINGPT = Family(
    "minGPT GPT",
    "transformer.{wte, wpe, drop, h (blocks called as block(x)), ln_f}, lm_head, an int block_size; "
    "forward(idx, targets=None) returning (logits, loss)",
    _KARPATHY_FUSED,
    lambda m: _first(lambda: _karpathy_modules(m), lambda: _mingpt_block_size(m)),
    _install_forward(_mingpt_forward, **_KARPATHY_TABLES),
    _karpathy_probe)


# --- Hugging Face ---------------------------------------------------------------------------------
#
# The base models' forwards (transformers 4.45 to 5.x) compute `inputs_embeds = <token module>(input_ids)`
# (BioGPT 4.x then multiplies by embed_scale; 5.x's token module scales itself), then the
# positions (from position_ids, or from the attention mask for OPT and BioGPT's learned positions
# with an offset of 2), `inputs_embeds + <position module>(...)`, and then their own dropout. The
# forward is not replaced; within a call of the base model whose input_ids are given, the token
# module returns a zero placeholder for exactly those ids (stride 0, right shape, dtype and
# device: all the mask code reads) and the position module returns the fused sum. HF's own "+"
# with the placeholder and its dropout remain: one elementwise pass over B*T*D each.

class _HuggingFaceSpec(NamedTuple):
    base_classes: tuple          # class names of the base model (whose forward takes input_ids)
    wrappers: tuple              # attribute paths from a wrapper (e.g. a *ForCausalLM) to the base
    token: str
    position: str
    position_classes: tuple      # position module class names (besides nn.Embedding)
    offset_positions: bool       # forward(attention_mask, past_length, position_ids=None), offset 2


_HF_GPT2 = _HuggingFaceSpec(("GPT2Model",), ("transformer",), "wte", "wpe", (), False)
_HF_GPT_NEO = _HuggingFaceSpec(("GPTNeoModel",), ("transformer",), "wte", "wpe", (), False)
_HF_BIGCODE = _HuggingFaceSpec(("GPTBigCodeModel",), ("transformer",), "wte", "wpe", (), False)
_HF_OPT = _HuggingFaceSpec(("OPTDecoder",), ("model.decoder", "decoder"), "embed_tokens", "embed_positions",
                           ("OPTLearnedPositionalEmbedding",), True)
_HF_BIOGPT = _HuggingFaceSpec(("BioGptModel",), ("biogpt",), "embed_tokens", "embed_positions",
                              ("BioGptLearnedPositionalEmbedding",), True)


def _is_hugging_face(model) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def _hf_base(model, spec: _HuggingFaceSpec):
    if type(model).__name__ in spec.base_classes:
        return model
    for path in spec.wrappers:
        found = model
        for part in path.split("."):
            found = getattr(found, part, None)
        if found is not None and type(found).__name__ in spec.base_classes:
            return found
    return None


def _hf_token_scale(base, token) -> Optional[float]:
    """The token rows' scale as a number (1.0: none), or None where the fused op cannot stand in for
    it: a tensor (a learnable scale would lose its gradient, and reading one at each call would sync
    a GPU) or a number that is not finite."""
    # BioGPT: 5.x's BioGptScaledWordEmbedding scales in its forward; 4.x's base model after it.
    # (The modules' dicts, not getattr: a missing attribute costs nn.Module.__getattr__ 1.5 us.)
    scale = None
    for module in (token, base) if type(base).__name__ == "BioGptModel" else (token,):
        if "embed_scale" in module._parameters or "embed_scale" in module._buffers:
            return None
        scale = module.__dict__.get("embed_scale")
        if scale is not None:
            break
    if scale is None:
        return 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        return None
    return float(scale)


def _hf_mismatch(model, spec: _HuggingFaceSpec) -> Optional[str]:
    if not _is_hugging_face(model):
        return "it is not a Hugging Face model"
    base = _hf_base(model, spec)
    if base is None:
        return f"it is not (and does not hold) a {' / '.join(spec.base_classes)}"
    token, position = getattr(base, spec.token, None), getattr(base, spec.position, None)
    if not isinstance(token, nn.Embedding) or not isinstance(position, nn.Embedding):
        return f"{spec.token} and {spec.position} are not embeddings"
    if type(token).__name__ not in ("Embedding", "BioGptScaledWordEmbedding"):
        return f"{spec.token} is a {type(token).__name__}"
    if type(position) is not nn.Embedding and type(position).__name__ not in spec.position_classes:
        return f"{spec.position} is a {type(position).__name__}"
    if getattr(position, "offset", 2) != 2:
        return f"{spec.position} has a position offset of {position.offset}, not 2"
    if getattr(base, "project_in", None) is not None:
        # OPT-350m: the token rows are projected before the sum; nothing to fuse.
        return "it projects the token embeddings (project_in) before adding the positions"
    first = _parameters(_forward_of(base))[:1]
    if not first or first[0].split("=")[0] != "input_ids":
        return "its forward does not take input_ids first"
    if _hf_token_scale(base, token) is None:
        return "its token scale (embed_scale) is a tensor or not a finite number"
    return _first(lambda: _no_hooks(token, spec.token, _hf_token_forward),
                  lambda: _no_hooks(position, spec.position, _hf_position_forward))


class _HuggingFaceFrame:
    """One call of the base model: what its token lookup hands to its position lookup."""

    __slots__ = ("input_ids", "waiting", "wrapped")

    def __init__(self, input_ids=None, wrapped=(None, None, None)):
        self.input_ids = input_ids  # the ids to take over (None: this call is not fused)
        self.waiting = False        # the token lookup returned the placeholder; the position lookup is next
        self.wrapped = wrapped      # the state's (token, position, fused) when this call began


class _HuggingFaceCall(threading.local):
    """The calls of the base model in progress, per thread (threads calling one model at once, an
    inference server, each hand their own ids from the token lookup to the position lookup), as a
    stack: a call made inside another (from a hook) has its own frame and leaves the outer one as
    it was. Pushed and popped by the base model's forward (_hf_forward), inside its hooks:
    what its pre-hooks and forward hooks look up runs plain, and a call that raises leaves nothing
    armed."""

    def __init__(self):
        self.frames = []


class _HuggingFaceState:
    """Per base model: what the token lookup of the current call must hand to the position lookup."""

    def __init__(self, spec, base, check_ids):
        self.spec = spec
        self.check_ids = check_ids
        self.call = _HuggingFaceCall()
        self.wrapped = (None, None, None)
        self.attach(base)

    # (token, position, fused) is one attribute, replaced whole: a call reads one consistent triple.
    token = property(lambda self: self.wrapped[0])
    position = property(lambda self: self.wrapped[1])
    fused = property(lambda self: self.wrapped[2])

    def __getstate__(self):  # (torch.save, copy.deepcopy: a call in progress is not part of the model)
        state = dict(self.__dict__)
        del state["call"]
        return state

    def __setstate__(self, state):
        if "wrapped" not in state:  # pickled by 0.2.0 (before the triple; its base has _hf_arm)
            state["wrapped"] = (state.pop("token"), state.pop("position"), state.pop("fused"))
        self.__dict__.update(state)
        self.call = _HuggingFaceCall()

    def attach(self, base):
        """Take over the base model's current token and position modules. Both get their forwards
        before the triple that names them is published, so that a call armed in another thread
        meanwhile either sees the old triple (and these modules run plain) or the whole new one."""
        token, position = getattr(base, self.spec.token), getattr(base, self.spec.position)
        fused = FusedInputEmbedding.from_embeddings(token, position, check_ids=self.check_ids,
                                                    token_scale=_hf_token_scale(base, token))
        token.forward = functools.partial(_hf_token_forward, token, self)
        position.forward = functools.partial(_hf_position_forward, position, self)
        self.wrapped = (token, position, fused)


class _HuggingFaceForward(functools.partial):
    """The base model's forward, on its instance: ``_hf_forward`` bound to the model and the forward
    it had on its instance before the swap (None: the class's). A partial, as the other families'
    forwards, for what special-cases those (torch.export); with the model's own signature."""

    @property
    def __signature__(self):
        base, inner = self.args[0], self.args[1]
        return inspect.signature(inner if inner is not None else type(base).forward.__get__(base))


def _hf_forward(base, inner, *args, **kwargs):
    """The base model's call with this call's frame on the stack. Arming here rather than in a
    pre-hook keeps every hook of the model (a user's, FSDP2's) outside the frame."""
    state = base.__dict__[_HF_STATE]
    frames = state.call.frames
    frames.append(_hf_frame(base, state, args, kwargs))
    try:
        return inner(*args, **kwargs) if inner is not None else type(base).forward(base, *args, **kwargs)
    finally:
        frames.pop()


def _hf_frame(base, state, args, kwargs) -> _HuggingFaceFrame:
    """This call's frame: armed with its input_ids, or inert where its lookups must run plain."""
    token, position = getattr(base, state.spec.token), getattr(base, state.spec.position)
    wrapped = state.wrapped
    if token is not wrapped[0] or position is not wrapped[1] or (
            type(base).__name__ == "BioGptModel" and _hf_token_scale(base, token) != wrapped[2].token_scale):
        # Replaced since (set_input_embeddings, a weight loader), or BioGPT's scale set anew, which
        # its token module reads at each call: take over the modules as they are now, if they are
        # still of a kind the fused op stands in for.
        if _hf_mismatch(base, state.spec) is not None:
            return _HuggingFaceFrame()
        state.attach(base)
        wrapped = state.wrapped
    if _hooked(token) or _hooked(position) or not _hf_own_forward(token, _hf_token_forward, state) \
            or not _hf_own_forward(position, _hf_position_forward, state) or _mixed_dtypes(token, position):
        # Hooks added since the swap, a forward replaced or wrapped on the instance (accelerate's
        # offloading wraps it), tables of two dtypes: the lookups run as the modules' own calls.
        return _HuggingFaceFrame()
    return _HuggingFaceFrame(kwargs.get("input_ids", args[0] if args else None), wrapped)


def _hf_own_forward(module, function, state) -> bool:
    """Whether module's forward is still the swap's own: a partial of function bound to state."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "func", None) is function and forward.args[1] is state


def _hf_arm(base, args, kwargs):
    # The forward pre-hook of a model swapped by 0.2.0 (pickled then): give it the forward that arms
    # (from its next call on; this one, begun already, runs plain).
    if not isinstance(base.__dict__.get("forward"), _HuggingFaceForward):
        base.forward = _HuggingFaceForward(_hf_forward, base, base.__dict__.get("forward"))


def _hf_token_forward(module, state, input):
    # The first lookup after the base model's forward began is of its input_ids (perhaps reshaped:
    # GPT-2 views them as [-1, T]); token_type_ids come later, calls from outside the model are
    # not armed.
    frames = state.call.frames
    if not frames:
        return type(module).forward(module, input)
    call = frames[-1]
    armed = call.input_ids
    if armed is not None and not call.waiting and module is call.wrapped[0] and input.numel() == armed.numel() \
            and input.shape[-1] == armed.shape[-1]:
        call.input_ids, call.waiting = input, True
        weight = module.weight
        if type(weight) not in (torch.Tensor, nn.Parameter) and hasattr(weight, "to_local"):
            weight = weight.to_local()  # sharded by tokemb_fast.parallel, whose output is a local tensor
        return weight.new_zeros(()).expand(*input.shape, module.embedding_dim)
    return type(module).forward(module, input)


def _hf_position_forward(module, state, *args, **kwargs):
    frames = state.call.frames
    call = frames[-1] if frames else None
    if call is None or not call.waiting or module is not call.wrapped[1]:
        return type(module).forward(module, *args, **kwargs)
    call.waiting = False
    input_ids, call.input_ids = call.input_ids, None  # (the ids as the token lookup got them)
    if state.spec.offset_positions:
        position_ids = _hf_offset_positions(*args, **kwargs)
    else:
        position_ids = args[0] if args else kwargs["input"]
    return call.wrapped[2](input_ids, position_ids=position_ids)


def _hf_offset_positions(attention_mask, past_length=0, position_ids=None, **kwargs):
    """OPT's and BioGPT's learned positions, as their position modules compute them."""
    past_length = kwargs.pop("past_key_values_length", kwargs.pop("cache_length", past_length))
    if position_ids is None:
        position_ids = torch.cumsum(attention_mask, dim=1)
        position_ids = (position_ids * attention_mask - 1).long()
        position_ids = position_ids[:, past_length:]
    return position_ids + 2


def _hf_install(spec):
    def install(model, check_ids):
        base = _hf_base(model, spec)
        base.__dict__[_HF_STATE] = _HuggingFaceState(spec, base, check_ids)
        # (A forward set on the instance before, e.g. a wrapper, is kept and called inside.)
        base.forward = _HuggingFaceForward(_hf_forward, base, base.__dict__.get("forward"))
    return install


def _hf_probe(model):
    base = None
    for spec in _HF_SPECS:
        base = _hf_base(model, spec)
        if base is not None:
            break
    token = getattr(base, spec.token)
    ids = _probe_ids(model, token.num_embeddings, 8, seq_len=5)

    def run():
        out = model(input_ids=ids)
        for name in ("logits", "last_hidden_state"):
            if hasattr(out, name):
                return [getattr(out, name)]
        return [out[0]]
    return run


def _hf_family(name, spec, description, fused):
    return Family(name, description, fused, lambda m: _hf_mismatch(m, spec), _hf_install(spec), _hf_probe)


_HF_ADD = "HF's own add of the (zero) token placeholder and its dropout stay separate passes"
HF_GPT2 = _hf_family("Hugging Face GPT-2", _HF_GPT2, "GPT2Model or GPT2LMHeadModel (transformer.wte, transformer.wpe)",
                     "wte + wpe in one kernel; " + _HF_ADD)
HF_GPT_NEO = _hf_family("Hugging Face GPT-Neo", _HF_GPT_NEO, "GPTNeoModel or GPTNeoForCausalLM",
                        "wte + wpe in one kernel; " + _HF_ADD)
HF_BIGCODE = _hf_family("Hugging Face GPTBigCode", _HF_BIGCODE, "GPTBigCodeModel or GPTBigCodeForCausalLM (StarCoder)",
                        "wte + wpe in one kernel; " + _HF_ADD)
HF_OPT = _hf_family("Hugging Face OPT", _HF_OPT,
                    "OPTForCausalLM, OPTModel or OPTDecoder without project_in (learned positions, offset 2)",
                    "embed_tokens + embed_positions (positions from the attention mask or position_ids, offset 2) "
                    "in one kernel; HF's add of the placeholder stays a separate pass")
HF_BIOGPT = _hf_family("Hugging Face BioGPT", _HF_BIOGPT,
                       "BioGptForCausalLM or BioGptModel (a scaled word embedding, learned positions with offset 2)",
                       "sqrt(D) * embed_tokens + embed_positions in one kernel (the scale fused); " + _HF_ADD)
_HF_SPECS = (_HF_GPT2, _HF_GPT_NEO, _HF_BIGCODE, _HF_OPT, _HF_BIOGPT)

# --- Hugging Face encoders (BERT, RoBERTa, DistilBERT, ELECTRA, XLM-RoBERTa) -------------------------
#
# Their embedding is a module of its own (BertEmbeddings and its kin): word + token type +
# position, LayerNorm, dropout. The swap gives that module's instance a forward that runs the
# fused encoder op on its own submodules (FusedEncoderEmbedding.from_embeddings), so the whole
# block is one kernel; a call it cannot serve as the original would (inputs_embeds, positions
# past the table) runs the original forward.

class _EncoderSpec(NamedTuple):
    embeddings_class: str        # the embeddings module's class name
    module: str                  # the transformers.models submodule defining it
    token_types: bool            # whether it has a token-type table
    from_padding: bool           # RoBERTa's positions, made from the padding


_ENCODER_SPECS = {
    "bert": _EncoderSpec("BertEmbeddings", "bert", True, False),
    "roberta": _EncoderSpec("RobertaEmbeddings", "roberta", True, True),
    "distilbert": _EncoderSpec("Embeddings", "distilbert", False, False),
    "electra": _EncoderSpec("ElectraEmbeddings", "electra", True, False),
    "xlm-roberta": _EncoderSpec("XLMRobertaEmbeddings", "xlm_roberta", True, True),
}


def _encoder_embeddings(model, spec: _EncoderSpec):
    """The model's embedding modules of this family."""
    return [module for module in model.modules()
            if type(module).__name__ == spec.embeddings_class
            and type(module).__module__ == f"transformers.models.{spec.module}.modeling_{spec.module}"]


def _encoder_mismatch(model, spec: _EncoderSpec) -> Optional[str]:
    if not _is_hugging_face(model):
        return "it is not a Hugging Face model"
    found = _encoder_embeddings(model, spec)
    if not found:
        return f"it holds no {spec.embeddings_class} (transformers.models.{spec.module})"
    for module in found:
        reason = _first(lambda: _encoder_parts_mismatch(module, spec), lambda: _no_hooks(module, spec.embeddings_class))
        if reason is not None:
            return reason
        if getattr(module, "position_embedding_type", "absolute") != "absolute":
            return f"its position_embedding_type is {module.position_embedding_type!r}, not 'absolute'"
        first = _parameters(_forward_of(module))[:1]
        if not first or first[0].split("=")[0] != "input_ids":
            return f"{spec.embeddings_class}.forward does not take input_ids first"
    return None


_ENCODER_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def _encoder_parts_mismatch(module, spec: _EncoderSpec) -> Optional[str]:
    """Why the parts of an embeddings module are not what the fused op stands in for, or None."""
    tables = _ENCODER_TABLES if spec.token_types else _ENCODER_TABLES[:2]
    reason = _first(*[lambda name=name: _plain(getattr(module, name, None), nn.Embedding, name) for name in tables],
                    lambda: _plain(getattr(module, "LayerNorm", None), nn.LayerNorm, "LayerNorm"),
                    lambda: _plain(getattr(module, "dropout", None), nn.Dropout, "dropout"))
    if reason is not None:
        return reason
    for name in tables:
        table = getattr(module, name)
        for option in ("max_norm", "scale_grad_by_freq", "sparse"):
            if getattr(table, option):
                return f"{name} has {option} set"
    if tuple(module.LayerNorm.normalized_shape) != (module.word_embeddings.embedding_dim,):
        return "its LayerNorm does not normalise the embedding dimension"
    return None


def _encoder_fused(module) -> Optional[Callable]:
    """The fused call for an embeddings module's parts as they are now (see _embed): the module the
    swap made, a new one over parts replaced since by plain ones (inside torch.compile, which builds
    no module, the same call without one), or None where a call must run the module's own forward
    (hooks on a part, a part of another kind)."""
    fused = module.__dict__[_FUSED]
    parts, wrapped = module._modules, fused._modules
    # (Checked at every call: spelt out, about 0.7 us.)
    word, position, token_type = parts.get("word_embeddings"), parts.get("position_embeddings"), \
        parts.get("token_type_embeddings")
    layer_norm, dropout = parts.get("LayerNorm"), parts.get("dropout")
    if word is wrapped.get("word_embeddings") and position is wrapped.get("position_embeddings") and \
            token_type is wrapped.get("token_type_embeddings") and layer_norm is wrapped.get("LayerNorm") and \
            dropout is wrapped.get("dropout") and word is not None and position is not None and \
            layer_norm is not None and dropout is not None and \
            not _any_bypassed(word, position, layer_norm, dropout, *(() if token_type is None else (token_type,))) \
            and not _encoder_mixed_dtypes(word, position, token_type):
        return fused
    spec = next(spec for spec in _ENCODER_SPECS.values() if spec.embeddings_class == type(module).__name__)
    if _encoder_parts_mismatch(module, spec) is not None:  # (its _plain checks: kinds, forwards, hooks)
        return None
    if _encoder_mixed_dtypes(word, position, token_type):
        return None
    if torch.compiler.is_compiling():
        return functools.partial(encoder_lookup_with, parts, fused.pad_position_id, fused.check_ids, fused.backend)
    fused = FusedEncoderEmbedding.from_embeddings(module, pad_position_id=fused.pad_position_id,
                                                  check_ids=fused.check_ids, backend=fused.backend)
    module.__dict__[_FUSED] = fused
    return fused


def _encoder_mixed_dtypes(word, position, token_type) -> bool:
    # (See _mixed_dtypes: the original's sum promotes, the fused op takes one dtype.)
    return _mixed_dtypes(word, position) or (token_type is not None and _mixed_dtypes(word, token_type))


_SIGNATURES = {}


def _encoder_arguments(module, args, kwargs):
    """The original forward's arguments by name (HF calls with keywords only: no binding then)."""
    cls = type(module)
    signature = _SIGNATURES.get(cls)
    if signature is None:
        signature = _SIGNATURES[cls] = inspect.signature(cls.forward)
    if not args and all(name in signature.parameters for name in kwargs):
        return kwargs
    return signature.bind(module, *args, **kwargs).arguments


def _hf_encoder_forward(module, *args, **kwargs):
    arguments = _encoder_arguments(module, args, kwargs)
    input_ids = arguments.get("input_ids")
    fused = _encoder_fused(module)
    if fused is None or input_ids is None or arguments.get("inputs_embeds", arguments.get("input_embeds")) is not None:
        return type(module).forward(module, *args, **kwargs)
    settings = module.__dict__[_FUSED]  # (pad_position_id: the swap's, whichever call runs)
    position_ids = arguments.get("position_ids")
    past_length = 0
    if position_ids is None:
        past_length = int(arguments.get("cache_length", arguments.get("past_key_values_length", 0)) or 0)
        # The highest position the call can make (RoBERTa's: the pad id + past_length + T); a call
        # that might run past the table fails as the original does (at once, whatever it raises).
        highest = past_length + input_ids.shape[-1] - 1
        if settings.pad_position_id is not None:
            highest += settings.pad_position_id + 1
        if highest >= module._modules["position_embeddings"].num_embeddings:
            return type(module).forward(module, *args, **kwargs)
    return fused(input_ids, token_type_ids=arguments.get("token_type_ids"), position_ids=position_ids,
                 past_length=past_length)


def _encoder_install(spec: _EncoderSpec):
    def install(model, check_ids):
        for module in _encoder_embeddings(model, spec):
            module.__dict__[_FUSED] = FusedEncoderEmbedding.from_embeddings(
                module, pad_position_id=module.padding_idx if spec.from_padding else None, check_ids=check_ids)
            module.forward = functools.partial(_hf_encoder_forward, module)
    return install


def _encoder_probe(model):
    embeddings = next(module for spec in _ENCODER_SPECS.values() for module in _encoder_embeddings(model, spec))
    ids = _probe_ids(model, embeddings.word_embeddings.num_embeddings,
                     embeddings.position_embeddings.num_embeddings // 2, seq_len=5)

    def run():
        out = model(input_ids=ids)
        for name in ("logits", "last_hidden_state", "prediction_logits"):
            if getattr(out, name, None) is not None:
                return [getattr(out, name)]
        return [out[0]]
    return run


def _encoder_family(name, key, description, fused):
    spec = _ENCODER_SPECS[key]
    return Family(name, description, fused, lambda m: _encoder_mismatch(m, spec), _encoder_install(spec),
                  _encoder_probe)


_ENCODER_FUSED = ("word + token type + position, LayerNorm and dropout of {} in one kernel (the backward: one "
                  "kernel for the LayerNorm, then one per table)")
HF_BERT = _encoder_family("Hugging Face BERT", "bert", "any model holding a BertEmbeddings (BertModel, "
                          "BertForMaskedLM, ...)", _ENCODER_FUSED.format("BertEmbeddings"))
HF_ROBERTA = _encoder_family("Hugging Face RoBERTa", "roberta", "any model holding a RobertaEmbeddings (positions "
                             "from the padding)", _ENCODER_FUSED.format("RobertaEmbeddings") +
                             "; the positions computed in the kernel")
HF_DISTILBERT = _encoder_family("Hugging Face DistilBERT", "distilbert", "any model holding DistilBERT's Embeddings "
                                "(no token types)", _ENCODER_FUSED.format("Embeddings").replace("token type + ", ""))
HF_ELECTRA = _encoder_family("Hugging Face ELECTRA", "electra", "any model holding an ElectraEmbeddings (its "
                             "embeddings_project stays a separate layer)", _ENCODER_FUSED.format("ElectraEmbeddings"))
HF_XLM_ROBERTA = _encoder_family("Hugging Face XLM-RoBERTa", "xlm-roberta", "any model holding an "
                                 "XLMRobertaEmbeddings (positions from the padding)",
                                 _ENCODER_FUSED.format("XLMRobertaEmbeddings") + "; the positions computed in the kernel")

_FAMILIES = (LLMS_FROM_SCRATCH, LLMS_FROM_SCRATCH_KV, LLMS_FROM_SCRATCH_KV_OPTIMIZED, LLMS_FROM_SCRATCH_PACKAGE_KV,
             NANOGPT, MINGPT, HF_GPT2, HF_GPT_NEO, HF_BIGCODE, HF_OPT, HF_BIOGPT, HF_BERT, HF_ROBERTA, HF_DISTILBERT,
             HF_ELECTRA, HF_XLM_ROBERTA)


# --- the swap ---------------------------------------------------------------------------------

class _Snapshot:
    """Every module's own state (attributes, hooks, submodule/parameter/buffer slots, class), to
    put the model back exactly as it was: after a failed swap, and after each probe (a forward
    may move counters such as a KV cache's)."""

    _DICTS = ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
              "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")

    def __init__(self, model):
        self.saved = []
        for module in model.modules():
            attributes = dict(module.__dict__)
            inner = {name: type(attributes[name])(attributes[name]) for name in self._DICTS
                     if isinstance(attributes.get(name), dict)}
            self.saved.append((module, type(module), attributes, inner))

    def restore(self):
        for module, cls, attributes, inner in self.saved:
            module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for name, contents in inner.items():
                target = module.__dict__[name]
                target.clear()
                target.update(contents)


@contextlib.contextmanager
def _probing(model):
    """A forward of the model that leaves no trace: in eval mode, without grad, from the same random
    state each time (so that randomness a probe cannot turn off, e.g. train-mode dropout in modules
    the model shares with another, draws the same in every run); afterwards the model (modules,
    counters, hooks, caches) and the random state are as they were, whatever the forward raised."""
    snapshot = _Snapshot(model)
    devices = sorted({tensor.device.index for tensor in itertools.chain(model.parameters(), model.buffers())
                      if tensor.device.type == "cuda"})
    try:
        for module in model.modules():
            module.training = False
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(0)
            yield
    finally:
        snapshot.restore()


def _run_probe(model, probe) -> List[torch.Tensor]:
    """The probe's outputs (see _probing)."""
    with _probing(model):
        return [out.detach().float() for out in probe() if out is not None]


def _same(before, after) -> bool:
    if len(before) != len(after):
        return False
    for expected, got in zip(before, after):
        if expected.shape != got.shape:
            return False
        # The fused sum rounds once like the eager one; later layers may amplify last-bit
        # differences on a GPU (different kernels), so allow a little, scaled to the outputs' size.
        scale = expected.abs().max().clamp_min(1.0) if expected.numel() else 1.0
        if expected.numel() and not bool(((expected - got).abs().max() <= 1e-3 * scale).item()):
            return False
    return True


def _unknown(model) -> TypeError:
    lines = [f"swap_input_embeddings does not recognise {type(model).__name__}. It knows:"]
    for family in _FAMILIES:
        reason = family.mismatch(model)
        lines.append(f"  - {family.name}: {family.description} (not this model: {reason})")
    return TypeError("\n".join(lines))


def swap_input_embeddings(model: nn.Module, *, check_ids=True, verify: bool = True) -> nn.Module:
    """Fuse ``model``'s input embedding (and, where the family allows, its embedding dropout) in
    place; return ``model``.

    Idempotent. After a swap, ``model.tokemb_fast_family`` names the family it was swapped as.
    Raises ``TypeError`` listing the supported families (``supported_families()``)
    and why the model is none of them. ``verify`` runs a probe forward (eval mode, no grad)
    before and after the swap. Whatever goes wrong while swapping or verifying (an exception,
    different outputs), the model is put back exactly as it was (forward, modules, Parameters,
    hooks, attributes) and a ``RuntimeError`` naming the family and the cause is raised.
    ``check_ids`` is the fused calls' id check (see ``fused_input_embedding``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_input_embeddings takes an nn.Module (a GPT model), got {type(model).__name__}")
    check_mode(check_ids)
    if model.__dict__.get(_MARK, False):
        return model
    family = next((family for family in _FAMILIES if family.mismatch(model) is None), None)
    if family is None:
        raise _unknown(model)
    snapshot = _Snapshot(model)
    try:
        probe = family.probe(model) if verify else None
        before = _run_probe(model, probe) if verify else None
        family.install(model, check_ids)
        if verify:
            after = _run_probe(model, probe)
            if not _same(before, after):
                snapshot.restore()
                if not _same(before, _run_probe(model, probe)):
                    raise ValueError(
                        "two probe runs of the unswapped model already differ (eval mode, no grad, the same random "
                        "seed), so the swap cannot be verified: its forward is not deterministic, e.g. modules in "
                        "train mode that it reaches but does not hold (minGPT's Block.mlpf lambda still calls the "
                        "original's modules after copy.deepcopy); swap the model itself, or pass verify=False")
                raise ValueError("its outputs changed after the swap (its forward must differ from the family's)")
    except Exception as cause:
        snapshot.restore()
        raise RuntimeError(f"swap_input_embeddings: {type(model).__name__} looks like a {family.name}, but the swap "
                           f"failed ({type(cause).__name__}: {cause}); the model was left as it was") from cause
    model.__dict__[_MARK] = True
    model.__dict__["tokemb_fast_family"] = family.name
    return model

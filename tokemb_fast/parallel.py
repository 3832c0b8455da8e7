"""Tensor parallelism: the token table split by rows (vocabulary) across a group, on DTensor.

Megatron's ``VocabParallelEmbedding``, and torchtitan's ``RowwiseParallel`` on an embedding, run
a masked lookup per rank, then the position add, then a reduction. Here each rank runs the fused
op once on its shard, with ids outside its rows contributing zero and the position rows added by
one rank only (``TokenShard``), and DTensor does the one collective: a ``Partial`` output
redistributed to ``Replicate()`` (all-reduce) or ``Shard(1)`` (reduce-scatter over the sequence,
for sequence parallelism). Nothing here communicates by itself.

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from tokemb_fast.parallel import FusedEmbeddingParallel

    mesh = init_device_mesh("cuda", (world_size,))
    parallelize_module(model, mesh, {"tok_emb": FusedEmbeddingParallel()})  # after swap_input_embeddings

Why the sum is exact: each (b, t) row gets its token row from exactly one rank and its position
row from one rank, the other ranks contribute zeros, so the reduction adds two numbers and
zeros, in any order: the same rounding as the single-process op.

Dropout runs after the reduction, not inside the fused kernel: the mask of a partial sum would
be right (the same seed gives every rank the same mask, and a mask distributes over the sum),
but the scale would be applied to each partial and then summed, which rounds differently from
scaling the sum. After the reduction it is the single-process op's mask and rounding: a
separate elementwise pass (the masking kernel the sparse backward uses), with the seed drawn on
the group's first rank and broadcast (``distribute_tensor``): one 8-byte collective per call.
"""
import gc
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import ParallelStyle

from .autograd import dropout_after_reduction, dropout_seed
from .functional import _fused, resolve_backend
from .validation import check_table_options
from .options import TokenShard

__all__ = ["FusedEmbeddingParallel", "TENSOR_PARALLEL_ATTR", "vocab_parallel_lookup"]

_OUTPUT_LAYOUTS = "Replicate() or Shard(1) (the sequence dimension: sequence parallelism)"


#: Where the style leaves (output placement, use_local_output) for the fused op: in the token
#: embedding's __dict__, which FusedInputEmbedding.forward reads at each call (a swapped model's
#: fused op wraps that module; FSDP2 replaces parameters, never modules).
TENSOR_PARALLEL_ATTR = "tokemb_fast_tensor_parallel"


class FusedEmbeddingParallel(ParallelStyle):
    """Shard a token table by rows over a 1-D device mesh, for the fused op.

    Apply it to a ``FusedInputEmbedding``, or to the token ``nn.Embedding`` of a model that
    ``swap_input_embeddings`` swapped (``{"tok_emb": FusedEmbeddingParallel()}`` for
    LLMs-from-scratch's GPTModel, ``{"transformer.wte": ...}`` for nanoGPT).

    Args:
        output_layouts: ``Replicate()`` (default): every rank gets the whole [B, T, D] output
            (an all-reduce). ``Shard(1)``: each rank gets its part of the sequence (a
            reduce-scatter), as sequence-parallel layers that follow expect.
        use_local_output: return the rank's local tensor (default, as ``RowwiseParallel``)
            rather than the DTensor.

    The token table becomes a ``DTensor`` sharded on dim 0 (uneven shards are fine: 50257 rows
    over 4 ranks); a ``FusedInputEmbedding``'s learned position table becomes a replicated
    ``DTensor`` (a swapped model's stays a plain parameter, the same on every rank). Input ids
    must be the same on every rank (a ``DTensor`` is made replicated first). Ids are checked
    against the whole vocabulary, on every rank.
    """

    def __init__(self, *, output_layouts=None, use_local_output: bool = True):
        super().__init__()
        output_layouts = Replicate() if output_layouts is None else output_layouts
        if output_layouts not in (Replicate(), Shard(1)):
            raise ValueError(f"output_layouts must be {_OUTPUT_LAYOUTS}, got {output_layouts!r}")
        self.output_layouts = output_layouts
        self.use_local_output = bool(use_local_output)

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        from .module import FusedInputEmbedding

        if isinstance(module, FusedInputEmbedding):
            token, position = module.tok_emb, module.pos_emb
        elif type(module) is nn.Embedding:
            token, position = module, None
        else:
            raise TypeError(f"FusedEmbeddingParallel applies to a tokemb_fast.FusedInputEmbedding or to the token "
                            f"nn.Embedding of a model swapped by swap_input_embeddings, got {type(module).__name__}")
        if device_mesh.ndim != 1:
            raise ValueError(f"FusedEmbeddingParallel takes a 1-D mesh (the tensor-parallel dimension), got "
                             f"{device_mesh.ndim} dimensions: pass mesh['tp'] of a 2-D mesh")
        _check_supported(token=(token.max_norm, token.sparse),
                         position=(getattr(position, "max_norm", None), getattr(position, "sparse", False)))
        _check_no_empty_shard(token.num_embeddings, device_mesh.size())
        if isinstance(token.weight, DTensor):
            raise ValueError("the token table is a DTensor already: FusedEmbeddingParallel distributes it")
        if _shared_with_another_module(token):
            raise ValueError("the token table is shared with another module (an output layer tied to it, as GPT-2's "
                             "lm_head): sharding it here would silently untie them. Untie the weights first, or "
                             "leave the embedding replicated")
        _distribute_weight(token, device_mesh, Shard(0))
        if position is not None and isinstance(position.weight, nn.Parameter) and \
                not isinstance(position.weight, DTensor):
            _distribute_weight(position, device_mesh, Replicate())
        token.__dict__[TENSOR_PARALLEL_ATTR] = (self.output_layouts, self.use_local_output)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(output_layouts={self.output_layouts!r}, use_local_output={self.use_local_output})"


def _check_no_empty_shard(vocab_size: int, group_size: int) -> None:
    # DTensor splits rows as torch.chunk does: ceil(V / n) per rank, the last ranks get what is
    # left, possibly nothing (9 rows over 4 ranks: 3, 3, 3, 0).
    per_rank = -(-vocab_size // group_size)
    if per_rank * (group_size - 1) >= vocab_size:
        raise ValueError(f"a {vocab_size}-row token table split over {group_size} ranks leaves a rank without "
                         f"rows (DTensor gives each {per_rank}); use a smaller group")


def _shared_with_another_module(embedding: nn.Module) -> bool:
    """Whether another module holds the same weight Parameter (tied weights): a parameter is
    referred to by each owning module's ``_parameters`` dict."""
    for holder in gc.get_referrers(embedding.weight):
        if isinstance(holder, dict) and holder is not embedding._parameters and \
                any(isinstance(owner, dict) and owner.get("_parameters") is holder for owner in gc.get_referrers(holder)):
            return True
    return False


def _distribute_weight(embedding: nn.Module, device_mesh, placement) -> None:
    weight = embedding.weight
    embedding.weight = nn.Parameter(distribute_tensor(weight.detach(), device_mesh, [placement]),
                                    requires_grad=weight.requires_grad)


def _check_supported(**tables) -> None:
    """tables: name -> (max_norm, sparse), nn.Embedding's options that tensor parallelism refuses."""
    for name, (max_norm, sparse) in tables.items():
        if max_norm is not None:
            raise NotImplementedError(f"max_norm on the {name} table is not supported with tensor parallelism "
                                      "(it renormalises rows in place before the lookup)")
        if sparse:
            raise NotImplementedError(f"sparse=True on the {name} table is not supported with tensor parallelism "
                                      "(DTensor parameters take dense gradients)")


def _replicated_local(value, device_mesh) -> torch.Tensor:
    if not isinstance(value, DTensor):
        return value
    if value.device_mesh != device_mesh:
        raise ValueError("ids given as a DTensor must be on the token table's device mesh")
    return value.full_tensor()


def vocab_parallel_lookup(input_ids, token_weight, position_weight, position_ids, past_length, table_options,
                          dropout_p, check_ids, token_scale, backend, layout=None):
    """The fused op with a token table sharded by rows (a ``DTensor`` with ``Shard(0)`` on a 1-D
    mesh): one fused pass per rank, then DTensor's reduction to the output placement, then
    dropout. ``layout``: (output placement, use_local_output) as the style left it, or None for
    a replicated DTensor. Other arguments as ``tokemb_fast.functional._fused``'s."""
    output_layout, use_local_output = (Replicate(), False) if layout is None else layout
    if not isinstance(token_weight, DTensor):
        raise ValueError("the position table is a DTensor but the token table is not: tensor parallelism "
                         "shards the token table (FusedEmbeddingParallel does both)")
    mesh = token_weight.device_mesh
    if mesh.ndim != 1 or tuple(token_weight.placements) != (Shard(0),):
        raise ValueError(f"a DTensor token table must be sharded on rows over a 1-D mesh ([Shard(0)]), got "
                         f"{list(token_weight.placements)} on a {mesh.ndim}-D mesh")
    if output_layout not in (Replicate(), Shard(1)):
        raise ValueError(f"the output layout must be {_OUTPUT_LAYOUTS}, got {output_layout!r}")
    if isinstance(position_weight, DTensor):
        if position_weight.device_mesh != mesh or tuple(position_weight.placements) != (Replicate(),):
            raise ValueError(f"a DTensor position table must be replicated on the token table's mesh, got "
                             f"{list(position_weight.placements)}")
        position_weight = position_weight.to_local()
    input_ids = _replicated_local(input_ids, mesh)
    position_ids = _replicated_local(position_ids, mesh)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if output_layout == Shard(1) and input_ids.dim() != 2:
        raise ValueError(f"a Shard(1) output shards the sequence of [B, T] ids; got {input_ids.dim()}-D ids")
    (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, position_padding_idx, position_max_norm,
     position_norm_type, position_scale_grad_by_freq, position_sparse) = table_options
    _check_supported(token=(max_norm, sparse), position=(position_max_norm, position_sparse))

    vocab_size = token_weight.shape[0]
    local_shape, global_offset = compute_local_shape_and_global_offset(token_weight.shape, mesh,
                                                                       token_weight.placements)
    row_offset, local_rows = global_offset[0], local_shape[0]
    # Checked here against the whole table, by every rank alike (a rank that raised alone would
    # leave the others waiting in the collective).
    _check_no_empty_shard(vocab_size, mesh.size())
    padding_idx = check_table_options("token", vocab_size, padding_idx, None, norm_type)
    if padding_idx is not None:
        # nn.Embedding's padding row, as a row of this shard (None on the ranks without it).
        padding_idx = padding_idx - row_offset
        padding_idx = padding_idx if 0 <= padding_idx < local_rows else None
    shard = TokenShard(row_offset, vocab_size, mesh.get_local_rank() == 0)
    local_options = (padding_idx, None, norm_type, scale_grad_by_freq, False, position_padding_idx, None,
                     position_norm_type, position_scale_grad_by_freq, False)
    partial = _fused(input_ids, token_weight.to_local(), position_weight, position_ids, past_length, local_options,
                     0.0, check_ids, token_scale, backend, None, shard)
    out = DTensor.from_local(partial, mesh, [Partial()], run_check=False, shape=partial.shape,
                             stride=partial.stride()).redistribute(mesh, [output_layout])
    if dropout_p > 0:
        out = _dropout(out, dropout_p, backend)
    return out.to_local() if use_local_output else out


def _dropout(out: DTensor, dropout_p: float, backend: Optional[str]) -> DTensor:
    """Dropout of the reduced output with the single-process op's mask for the call's seed."""
    mesh, local = out.device_mesh, out.to_local()
    # One seed for the group, drawn on its first rank; every rank's generator advances alike.
    seed = distribute_tensor(dropout_seed(local.device), mesh, [Replicate()]).to_local()
    _, offset = compute_local_shape_and_global_offset(out.shape, mesh, out.placements)
    seq_len, seq_offset = (out.shape[-2], offset[-2]) if out.dim() >= 2 else (1, 0)
    if resolve_backend(backend, local.device) == "triton":
        masked = dropout_after_reduction(local, dropout_p, seed, seq_len, seq_offset)
    else:
        masked = _plain_dropout(local, dropout_p, seed, out.shape, offset)
    return DTensor.from_local(masked, mesh, out.placements, run_check=False, shape=out.shape, stride=out.stride())


def _plain_dropout(local: torch.Tensor, dropout_p: float, seed: torch.Tensor, global_shape, offset) -> torch.Tensor:
    # The plain-PyTorch path's mask (not the kernels' Philox stream): drawn for the whole output
    # from a generator seeded with the group's seed, so every rank takes its slice of one mask.
    generator = torch.Generator(device=local.device).manual_seed(int(seed.item()) % 2**63)
    keep = torch.rand(global_shape, generator=generator, device=local.device) >= dropout_p
    keep = keep[tuple(slice(start, start + size) for start, size in zip(offset, local.shape))]
    scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0
    return local * (keep.to(local.dtype) * scale)

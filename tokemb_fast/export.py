"""Exporting models that use the fused ops: what a consumer of an exported program needs.

An exported program (``torch.export.export``) of the Triton path holds the op
``tokemb_fast::input_embedding`` (the encoder op: ``tokemb_fast::encoder_embedding``), a pure function (exported programs write no id flag: see
``tokemb_fast.id_check``). Consumers that run PyTorch ops (``ep.module()``, AOTInductor on a GPU,
which compiles the op's Triton kernels) need nothing more. For consumers that do not know the op,
it decomposes into two embedding lookups and an add (``triton_ops.decomposed_input_embedding``):
``ep.run_decompositions(decomposition_table())``. The decomposition is also registered in PyTorch's
own table, where ``torch.onnx.export`` finds it (ONNX Gather + Add; no translation table to pass).
The plain-PyTorch path exports PyTorch's own ops and needs none of this. See docs/shipping.md.
"""
from typing import Callable, Dict

import torch


def decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """The op's decomposition, by overload: for a decomposition table of your own."""
    from .encoder import _ops_encoder
    encoder_ops = _ops_encoder()  # (imports Triton and both ops' launchers)
    from . import triton_ops
    return {torch.ops.tokemb_fast.input_embedding.default: triton_ops.decomposed_input_embedding,
            torch.ops.tokemb_fast.encoder_embedding.default: encoder_ops.decomposed_encoder_embedding}


def decomposition_table() -> Dict[torch._ops.OpOverload, Callable]:
    """``torch.export.default_decompositions()`` plus the op's decomposition: for
    ``ep.run_decompositions(...)``, leaving only core ATen ops."""
    table = torch.export.default_decompositions()
    table.update(decompositions())
    return table

"""tokemb-fast: the first layer of a GPT model (token embedding + absolute position embedding),
fused into one Triton kernel on the GPU with a deterministic hand-written backward, and plain
PyTorch on the CPU."""
from . import _source_tree  # noqa: F401  (first: makes tokemb_fast.kernels importable from a checkout)
from ._version import __version__
from .autograd import EmbeddingGradFunction, FusedInputEmbeddingFunction, dropout_seed
from .functional import backend_name, fused_input_embedding
from .id_check import check_ids_now
from .module import FusedInputEmbedding, SinusoidalPositionEmbedding, sinusoidal_table
from .options import LookupOptions, TableOptions, TokenShard
from .reference import input_embedding_reference
from .swap import supported_families, swap_input_embeddings


__all__ = [
    "EmbeddingGradFunction",
    "FusedInputEmbedding",
    "FusedInputEmbeddingFunction",
    "LookupOptions",
    "SinusoidalPositionEmbedding",
    "TableOptions",
    "TokenShard",
    "backend_name",
    "check_ids_now",
    "dropout_seed",
    "fused_input_embedding",
    "input_embedding_reference",
    "sinusoidal_table",
    "supported_families",
    "swap_input_embeddings",
    "__version__",
]

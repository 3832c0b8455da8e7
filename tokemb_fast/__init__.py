"""tokemb-fast: the first layer of a GPT model (token embedding + absolute position embedding),
fused into one Triton kernel on the GPU with a deterministic hand-written backward, and plain
PyTorch on the CPU."""
from . import _source_tree  # noqa: F401  (first: makes tokemb_fast.kernels importable from a checkout)
from ._version import __version__
from .autograd import EmbeddingGradFunction, FusedInputEmbeddingFunction, dropout_seed
from .encoder import EncoderOptions, FusedEncoderEmbeddingFunction, fused_encoder_embedding
from .functional import backend_name, fused_input_embedding
from .id_check import check_ids_now
from .module import FusedEncoderEmbedding, FusedInputEmbedding, SinusoidalPositionEmbedding, sinusoidal_table
from .options import LookupOptions, TableOptions, TokenShard
from .reference import encoder_embedding_reference, input_embedding_reference, positions_from_padding
from .swap import supported_families, swap_input_embeddings


__all__ = [
    "EmbeddingGradFunction",
    "EncoderOptions",
    "FusedEncoderEmbedding",
    "FusedEncoderEmbeddingFunction",
    "FusedInputEmbedding",
    "FusedInputEmbeddingFunction",
    "LookupOptions",
    "SinusoidalPositionEmbedding",
    "TableOptions",
    "TokenShard",
    "backend_name",
    "check_ids_now",
    "dropout_seed",
    "encoder_embedding_reference",
    "fused_encoder_embedding",
    "fused_input_embedding",
    "input_embedding_reference",
    "positions_from_padding",
    "sinusoidal_table",
    "supported_families",
    "swap_input_embeddings",
    "__version__",
]

"""The seed's data pipeline: GPT-2 tokenization (offline) and a sliding-window loader.

``tiktoken.get_encoding("gpt2")`` downloads its BPE ranks on first use; this module builds the
same encoding from the ranks shipped in ``tokemb_fast/assets`` so nothing touches the network.
"""
import base64
import functools
import hashlib
import operator
from importlib import resources
from typing import Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

GPT2_RANKS_FILE = "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
SAMPLE_TEXT_FILE = "the-verdict.txt"
END_OF_TEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257


def _asset(name: str):
    return resources.files("tokemb_fast").joinpath("assets", name)


def sample_text() -> str:
    """"The Verdict" (Edith Wharton, 1908, public domain): the LLMs-from-scratch sample text."""
    return _asset(SAMPLE_TEXT_FILE).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """The GPT-2 tiktoken encoding (50,257 tokens), built from package data with no download.

    Equal to ``tiktoken.get_encoding("gpt2")``: same merge ranks (checked by sha256), same split
    pattern, same ``<|endoftext|>`` special token.
    """
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    data = _asset(GPT2_RANKS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise RuntimeError(f"bundled {GPT2_RANKS_FILE} is corrupt: sha256 {digest}, expected {GPT2_RANKS_SHA256}")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: GPT2_VOCAB_SIZE - 1},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class SlidingWindowDataset(Dataset):
    """Next-token windows over one token stream: item i is (ids[s:s+L], ids[s+1:s+L+1]), s = i*stride.

    ``source`` is text (tokenized with ``tokenizer``, default GPT-2, ``<|endoftext|>`` allowed) or a
    sequence of token ids. Windows are sliced on demand from one int64 tensor.
    """

    def __init__(self, source: Union[str, Sequence[int], torch.Tensor], max_length: int, stride: int,
                 tokenizer=None):
        for name, value in (("max_length", max_length), ("stride", stride)):
            if isinstance(value, bool) or not hasattr(type(value), "__index__"):  # (ints, NumPy's included)
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        max_length, stride = operator.index(max_length), operator.index(stride)
        if isinstance(source, str):
            tokenizer = tokenizer if tokenizer is not None else gpt2_encoding()
            source = tokenizer.encode(source, allowed_special={END_OF_TEXT})
        ids = torch.as_tensor(source)
        # One stream of token ids: floats (1.5 would become 1), bools or a batch are a caller's mistake.
        # (An empty one is not: it is too short, below, whatever dtype [] became.)
        if ids.numel() and (ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex()):
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        if ids.dim() > 1:
            raise ValueError(f"token ids must be one stream ([N]), got shape {tuple(ids.shape)}")
        if ids.dtype == torch.uint64:  # (has no max() of its own: its bits read as int64 instead)
            ids = ids.contiguous().view(torch.int64)
            if bool((ids < 0).any()):
                raise ValueError("token ids must be < 2**63 (int64's range)")
        # int64 first: unsigned ids (nanoGPT's uint16 train.bin) have no min() of their own.
        ids = ids.to(torch.int64).reshape(-1)
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"token ids must be >= 0, got {int(ids.min())}")
        self.token_ids = ids
        self.max_length = max_length
        self.stride = stride
        n_tokens = self.token_ids.numel()
        if n_tokens < max_length + 1:
            raise ValueError(f"the text has {n_tokens} tokens; a window of max_length={max_length} "
                             f"needs at least {max_length + 1} (inputs plus the shifted target)")
        # Same count as the LLMs-from-scratch loader: starts 0, stride, ... below n - max_length.
        self._n_windows = len(range(0, n_tokens - max_length, stride))

    def __len__(self) -> int:
        return self._n_windows

    def __getitem__(self, index: int):
        if not -self._n_windows <= index < self._n_windows:
            raise IndexError(f"window {index} out of range for {self._n_windows} windows")
        start = (index % self._n_windows) * self.stride
        window = self.token_ids[start:start + self.max_length + 1]
        return window[:-1], window[1:]


def create_dataloader(text: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                      shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                      tokenizer=None, generator: Optional[torch.Generator] = None) -> DataLoader:
    """A DataLoader of (inputs, targets) int64 batches [batch_size, max_length] over ``text``."""
    dataset = SlidingWindowDataset(text, max_length=max_length, stride=stride, tokenizer=tokenizer)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)

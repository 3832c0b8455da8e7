"""The data pipeline against the known answers in shared/data/README.md."""
import hashlib
from importlib import resources

import pytest
import torch

from tokemb_fast.data import SlidingWindowDataset, create_dataloader, gpt2_encoding, sample_text

KNOWN_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
KNOWN_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617,
             34680, 27271, 13]
FIRST_BATCH = [[40, 367, 2885, 1464], [1807, 3619, 402, 271], [10899, 2138, 257, 7026], [15632, 438, 2016, 257],
               [922, 5891, 1576, 438], [568, 340, 373, 645], [1049, 5975, 284, 502], [284, 3285, 326, 11]]


def test_bundled_assets_are_the_published_files():
    assets = resources.files("tokemb_fast").joinpath("assets")
    digests = {name: hashlib.sha256(assets.joinpath(name).read_bytes()).hexdigest()
               for name in ("gpt2.tiktoken", "the-verdict.txt")}
    assert digests == {
        "gpt2.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        "the-verdict.txt": "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
    }
    assert "public domain" in assets.joinpath("NOTICE").read_text()


def test_gpt2_encoding_known_answer():
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257
    ids = enc.encode(KNOWN_TEXT, allowed_special={"<|endoftext|>"})
    assert ids == KNOWN_IDS
    assert enc.decode(ids) == KNOWN_TEXT


def test_sample_text_token_count():
    text = sample_text()
    assert len(text) == 20479
    assert len(gpt2_encoding().encode(text)) == 5145


def test_first_batch_known_answer():
    loader = create_dataloader(sample_text(), batch_size=8, max_length=4, stride=4, shuffle=False)
    inputs, targets = next(iter(loader))
    assert inputs.tolist() == FIRST_BATCH
    assert inputs.dtype == torch.int64 and inputs.shape == (8, 4)
    # Targets are the inputs shifted by one token.
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert targets[0].tolist() == [367, 2885, 1464, 1807]
    assert len(loader) == len(range(0, 5145 - 4, 4)) // 8


def test_sliding_window_overlap_and_length():
    dataset = SlidingWindowDataset(list(range(20)), max_length=5, stride=2)
    assert len(dataset) == len(range(0, 15, 2))
    x, y = dataset[1]
    assert x.tolist() == [2, 3, 4, 5, 6] and y.tolist() == [3, 4, 5, 6, 7]
    x, y = dataset[-1]
    assert y[-1].item() <= 19
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        SlidingWindowDataset([1, 2, 3], max_length=0, stride=1)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        SlidingWindowDataset([1, 2, 3], max_length=1, stride=0)
    with pytest.raises(ValueError, match="the text has 3 tokens; a window of max_length=3 needs at least 4"):
        SlidingWindowDataset([1, 2, 3], max_length=3, stride=1)
    # Silently taken once: floats truncated (1.5 -> 1), a batch flattened, negative ids, stride=True.
    with pytest.raises(TypeError, match="token ids must be integers, got torch.float32"):
        SlidingWindowDataset(torch.tensor([1.5, 2.0, 3.0, 4.0]), max_length=2, stride=1)
    with pytest.raises(ValueError, match=r"one stream \(\[N\]\), got shape \(2, 3\)"):
        SlidingWindowDataset(torch.arange(6).reshape(2, 3), max_length=2, stride=1)
    with pytest.raises(ValueError, match="token ids must be >= 0, got -1"):
        SlidingWindowDataset([1, -1, 3, 4], max_length=2, stride=1)
    with pytest.raises(TypeError, match="stride must be an int, got bool"):
        SlidingWindowDataset([1, 2, 3, 4], max_length=2, stride=True)
    with pytest.raises(TypeError, match="max_length must be an int, got float"):
        SlidingWindowDataset([1, 2, 3, 4], max_length=2.0, stride=1)
    import numpy
    windows = SlidingWindowDataset(numpy.arange(6, dtype=numpy.int32), max_length=numpy.int64(2), stride=numpy.int64(2))
    assert len(windows) == 2 and windows[1][0].tolist() == [2, 3] and windows[1][0].dtype == torch.int64
    # Unsigned ids (nanoGPT's uint16 train.bin) and empty input, each broken by the checks above once.
    for dtype in (numpy.uint16, numpy.uint32, numpy.uint64):
        windows = SlidingWindowDataset(numpy.arange(10, dtype=dtype), max_length=4, stride=1)
        assert len(windows) == 6 and windows[5][1].tolist() == [6, 7, 8, 9]
    with pytest.raises(ValueError, match="token ids must be < 2\\*\\*63"):
        SlidingWindowDataset(numpy.array([2 ** 63 + 5, 1, 2, 3], dtype=numpy.uint64), max_length=2, stride=1)
    for empty in ([], ""):
        with pytest.raises(ValueError, match="the text has 0 tokens"):
            SlidingWindowDataset(empty, max_length=2, stride=1)


def test_shuffled_loader_is_seeded():
    text = sample_text()
    first = [next(iter(create_dataloader(text, generator=torch.Generator().manual_seed(0))))[0] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert first[0].shape == (4, 256)

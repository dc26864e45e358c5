"""TokenDataModule: next-token windows over the cached splits, seeded shuffling, and clear size errors."""

import pickle

import numpy as np
import pytest
import torch

from moe_gpt.data import DataError, TokenDataModule
from moe_gpt.data.split import split_score

BLOCK = 8


def prose(count: int) -> dict[str, str]:
    return {f"part{i}.txt": f"Part {i}. " + "Some words about nothing in particular, repeated. " * 12 for i in range(count)}


@pytest.fixture
def datamodule(text_corpus) -> TokenDataModule:
    module = TokenDataModule(text_corpus(prose(6), val_fraction=0.3), block_size=BLOCK, seed=7)
    module.prepare_data()
    module.setup("fit")
    return module


def test_windows_shift_targets_by_one(datamodule):
    tokens = np.fromfile(datamodule.cache.train_path, dtype=np.uint16)
    x, y = datamodule.train_dataset[2]
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (BLOCK,)
    assert x.tolist() == tokens[2 * BLOCK : 3 * BLOCK].tolist()
    assert y.tolist() == tokens[2 * BLOCK + 1 : 3 * BLOCK + 1].tolist()


def test_windows_cover_the_split_once_with_stride_block_size(datamodule):
    windows = datamodule.train_dataset
    assert len(windows) == (datamodule.train_tokens - 1) // BLOCK
    targets = torch.cat([windows[i][1] for i in range(len(windows))])
    tokens = np.fromfile(datamodule.cache.train_path, dtype=np.uint16)
    assert targets.tolist() == tokens[1 : len(windows) * BLOCK + 1].tolist()  # every target used once


def test_counts_match_the_cache(datamodule):
    assert datamodule.train_tokens == datamodule.cache.train_tokens > 0
    assert datamodule.val_tokens == datamodule.cache.val_tokens > 0


def test_train_loader_shuffles_each_epoch_reproducibly(datamodule, text_corpus):
    def epoch_orders(module):
        loader = module.train_dataloader()
        return [torch.cat([x[:, 0] for x, _ in loader]).tolist() for _ in range(2)]

    first, second = epoch_orders(datamodule), epoch_orders(datamodule)
    assert first == second  # same seed, same order of batches
    assert first[0] != first[1]  # a new order each epoch
    in_order = [datamodule.train_dataset[i][0][0].item() for i in range(len(datamodule.train_dataset))]
    assert sorted(first[0]) == sorted(in_order) and first[0] != in_order


def test_val_loader_is_in_order(datamodule):
    x, y = next(iter(datamodule.val_dataloader()))
    assert x.shape == (2, BLOCK)
    assert torch.equal(x[1], datamodule.val_dataset[1][0]) and torch.equal(y[0], datamodule.val_dataset[0][1])


def test_windows_pickle_without_their_data(datamodule):
    # DataLoader workers get the file path, not a copy of the token array.
    windows = datamodule.train_dataset
    restored = pickle.loads(pickle.dumps(windows))
    assert len(pickle.dumps(windows)) < 1000
    assert torch.equal(restored[3][0], windows[3][0])


def test_split_shorter_than_block_is_an_error(text_corpus):
    module = TokenDataModule(text_corpus(prose(6), val_fraction=0.3), block_size=4096, seed=0)
    with pytest.raises(DataError, match=r"the train split has \d+ tokens, fewer than model.block_size \+ 1 = 4097") as error:
        module.setup("fit")
    assert "lower model.block_size" in str(error.value) and "\n" not in str(error.value)


def test_short_validation_split_suggests_val_fraction(text_corpus):
    long_text = "Plenty of training text here. " * 200
    # A short document that hashes below the long one; a val_fraction between them sends only it to val.
    short_text = next(t for t in (f"Tiny {i}." for i in range(100)) if split_score(t) < split_score(long_text))
    val_fraction = (split_score(short_text) + split_score(long_text)) / 2
    cfg = text_corpus({"long.txt": long_text, "short.txt": short_text}, val_fraction=val_fraction)
    with pytest.raises(DataError, match=r"the val split has \d+ tokens.*raise data.val_fraction"):
        TokenDataModule(cfg, block_size=64, seed=0).setup("fit")

"""TokenDataModule: next-token windows over the cached splits, seeded shuffling, and clear size errors."""

import pickle
from types import SimpleNamespace

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


def first_tokens(loader) -> list[int]:
    return torch.cat([x[:, 0] for x, _ in loader]).tolist()


def test_train_loader_shuffles_each_epoch_reproducibly(datamodule, text_corpus):
    def epoch_orders(module):
        loader = module.train_dataloader()
        orders = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)  # Lightning does this at the start of every epoch
            orders.append(first_tokens(loader))
        return orders

    first, second = epoch_orders(datamodule), epoch_orders(datamodule)
    assert first == second  # same seed, same order of batches
    assert first[0] != first[1]  # a new order each epoch
    in_order = [datamodule.train_dataset[i][0][0].item() for i in range(len(datamodule.train_dataset))]
    assert sorted(first[0]) == sorted(in_order) and first[0] != in_order


def test_processes_split_each_batch_of_the_one_process_order(datamodule):
    """Two processes with batch B see, step by step, the windows one process with batch 2B sees."""
    alone = first_tokens(datamodule.train_dataloader())
    shares = []
    for rank in (0, 1):
        datamodule.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        shares.append(first_tokens(datamodule.train_dataloader()))
    datamodule.trainer = None
    assert shares[0] == alone[0::2][: len(shares[0])] and shares[1] == alone[1::2][: len(shares[1])]
    assert len(shares[0]) == len(shares[1]) == len(alone) // 2  # equal shares: no process waits for the other


def test_train_loader_resumes_mid_epoch_with_the_next_batch(datamodule):
    loader = datamodule.train_dataloader()
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    expected = next(iterator)[0]
    resumed = datamodule.train_dataloader()
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))[0], expected)


def test_training_split_smaller_than_one_batch_is_an_error(text_corpus):
    module = TokenDataModule(text_corpus(prose(6), val_fraction=0.3, batch_size=512), block_size=BLOCK, seed=0)
    with pytest.raises(DataError, match=r"fewer than one batch each \(data.batch_size=512\)") as error:
        module.setup("fit")
    assert "\n" not in str(error.value)


def test_validation_holding_most_of_the_text_is_a_warning(text_corpus, caplog):
    long_text = "Plenty of words for one long document. " * 200
    # A short document that hashes above the long one; a val_fraction between them sends only the long one to val.
    short_text = next(t for t in (f"Short {i}. " * 40 for i in range(100)) if split_score(t) > split_score(long_text))
    val_fraction = (split_score(short_text) + split_score(long_text)) / 2
    cfg = text_corpus({"long.txt": long_text, "short.txt": short_text}, val_fraction=val_fraction, batch_size=1)
    with caplog.at_level("WARNING"):
        TokenDataModule(cfg, block_size=BLOCK, seed=0).setup("fit")
    assert "validation holds" in caplog.text and "data.val_fraction" in caplog.text


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

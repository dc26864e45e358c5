"""Lightning DataModule: next-token windows read from the token cache's memory maps."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from moe_gpt.config import DataConfig
from moe_gpt.data.errors import DataError
from moe_gpt.data.tokenizer import load_gpt2_tokenizer
from moe_gpt.data.tokens import TOKEN_DTYPE, TokenCache, build_or_load_token_cache

log = logging.getLogger(__name__)


class TokenWindows(Dataset):
    """Window ``i`` covers tokens ``[i*B, i*B + B]`` (B+1 tokens); x is its first B, y its last B.

    Consecutive windows share one token, so every token is a target exactly once.
    """

    def __init__(self, path: Path, block_size: int) -> None:
        self.path, self.block_size = path, block_size
        self._tokens: np.memmap | None = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        self.num_tokens = len(self._tokens)

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = index * self.block_size
        window = torch.from_numpy(self._memmap()[start : start + self.block_size + 1].astype(np.int64))
        return window[:-1], window[1:]

    def _memmap(self) -> np.memmap:
        if self._tokens is None:  # reopened in each DataLoader worker
            self._tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")
        return self._tokens

    def __getstate__(self) -> dict:
        # Pickling a memmap copies its data; workers reopen the file instead.
        return {**self.__dict__, "_tokens": None}


class TokenDataModule(L.LightningDataModule):
    """Builds (or reuses) the token cache for ``cfg`` and serves ``block_size`` windows from it."""

    def __init__(self, cfg: DataConfig, block_size: int, seed: int) -> None:
        super().__init__()
        if block_size < 1:
            raise DataError(f"block_size={block_size} must be positive (model.block_size)")
        self.cfg, self.block_size, self.seed = cfg, block_size, seed
        self.cache: TokenCache | None = None
        self.train_dataset: TokenWindows | None = None
        self.val_dataset: TokenWindows | None = None

    def prepare_data(self) -> None:
        # Runs on one process per node; setup() finds the cache it built (Lightning
        # says not to keep state from here).
        self._token_cache()

    def setup(self, stage: str | None = None) -> None:
        self.cache = self._token_cache()
        self.train_dataset = self._windows("train", self.cache.train_path)
        self.val_dataset = self._windows("val", self.cache.val_path)
        self._check_split_sizes(self.cache, self.train_dataset)

    def _check_split_sizes(self, cache: TokenCache, train: TokenWindows) -> None:
        """Refuse a training split smaller than one batch; warn when validation got most of the text."""
        processes = self._replicas()[0]
        if len(train) // processes < self.cfg.batch_size:
            raise DataError(
                f"the train split has {len(train)} windows of model.block_size={self.block_size} tokens for "
                f"{processes} process(es), fewer than one batch each (data.batch_size={self.cfg.batch_size}); "
                "add text, or lower data.batch_size or model.block_size"
            )
        if cache.val_tokens > cache.train_tokens:
            # Documents are split whole, by a hash of their text: a corpus of few documents splits unevenly.
            log.warning(
                "validation holds %d tokens and training only %d: with few documents the split by document is "
                "uneven; add documents (or split a long file into several), or lower data.val_fraction",
                cache.val_tokens,
                cache.train_tokens,
            )

    @property
    def train_tokens(self) -> int:
        return self._require_cache().train_tokens

    @property
    def val_tokens(self) -> int:
        return self._require_cache().val_tokens

    def train_dataloader(self) -> StatefulDataLoader:
        # Lightning saves and restores a StatefulDataLoader's position, so a resumed run continues
        # mid-epoch with the very next batch. The sampler shuffles each epoch with seed + epoch and
        # gives each process every world_size-th window of that order: N processes of batch B see
        # exactly the windows one process of batch N*B would, for any N.
        sampler = StatefulDistributedSampler(
            self._require(self.train_dataset), *self._replicas(), shuffle=True, seed=self.seed, drop_last=True
        )
        return StatefulDataLoader(self.train_dataset, sampler=sampler, **self._loader_settings())

    def val_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self._require(self.val_dataset), *self._replicas(), shuffle=False, drop_last=True)
        return DataLoader(self.val_dataset, sampler=sampler, **self._loader_settings())

    def _replicas(self) -> tuple[int, int]:
        """(number of processes, this process's rank): each takes its share of the windows."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader_settings(self) -> dict:
        return dict(
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # A generator of its own: otherwise every new iterator draws its worker seed from the
            # global RNG, and validating (or not) would change the dropout masks that follow.
            generator=torch.Generator().manual_seed(self.seed),
        )

    @staticmethod
    def _require(dataset: TokenWindows | None) -> TokenWindows:
        if dataset is None:
            raise RuntimeError("TokenDataModule.setup() must run before asking for a dataloader")
        return dataset

    def _token_cache(self) -> TokenCache:
        return build_or_load_token_cache(self.cfg, load_gpt2_tokenizer(self.cfg.tokenizer_dir))

    def _windows(self, split: str, path: Path) -> TokenWindows:
        tokens = path.stat().st_size // np.dtype(TOKEN_DTYPE).itemsize
        if tokens < self.block_size + 1:
            remedy = "raise data.val_fraction or add text" if split == "val" else "add text"
            raise DataError(
                f"the {split} split has {tokens} tokens, fewer than model.block_size + 1 = {self.block_size + 1}; "
                f"lower model.block_size or {remedy}"
            )
        return TokenWindows(path, self.block_size)

    def _require_cache(self) -> TokenCache:
        if self.cache is None:
            raise RuntimeError("TokenDataModule.setup() must run before reading token counts")
        return self.cache

"""A checkpoint's loss on a corpus it never trained on (``scripts/compare.py --eval-data``).

The corpus is a data option of ``configs/data`` (``shakespeare``, ``wikitext103``, ...) or a local
file or folder, tokenized with the run's own tokenizer and token cache. The loss is the pure
language-model cross-entropy of Lightning's validation loop over windows spread evenly across the
whole corpus (both of its splits: none of it was trained on). Each run keeps its loss in
``held_out.json``, so a re-run of the comparison evaluates only what it has not evaluated yet.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
from torch.utils.data import ConcatDataset, DataLoader, Subset

from moe_gpt.weights.safe_load import load_model
from moe_gpt.compose import CONFIG_DIR, compose_run_config
from moe_gpt.config import ConfigError, DataConfig, OptimConfig, TrainerConfig
from moe_gpt.data import TokenDataModule
from moe_gpt.training.lit_module import GPTLightningModule
from moe_gpt.training.run_folder import read_record, write_json

HELD_OUT_FILE = "held_out.json"


def data_options() -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / "data").glob("*.yaml"))


def eval_data_config(spec: str, training: DataConfig) -> DataConfig:
    """The corpus ``spec`` names, read with the training data's tokenizer, cache folder and batch size."""
    if spec in data_options():
        data = compose_run_config([f"data={spec}"]).data
    elif Path(spec).exists():
        text = compose_run_config(["data=text", "data.paths=[placeholder]"]).data
        data = dataclasses.replace(text, paths=[str(Path(spec).resolve())], name=f"eval-{Path(spec).stem}")
    else:
        raise ConfigError(
            f"--eval-data {spec}: neither a data option ({', '.join(data_options())}) nor an existing file or folder"
        )
    return dataclasses.replace(
        data, cache_dir=training.cache_dir, tokenizer_dir=training.tokenizer_dir, batch_size=training.batch_size
    )


def held_out_loss(checkpoint: Path, data: DataConfig, batches: int, trainer: TrainerConfig) -> dict[str, float]:
    """Mean cross-entropy (nats per token) over up to ``batches`` batches of windows of the corpus."""
    model = load_model(checkpoint)
    module = GPTLightningModule(model.config, OptimConfig(), max_steps=1)
    module.model.load_state_dict(model.state_dict())
    datamodule = TokenDataModule(data, block_size=model.config.block_size, seed=0)
    datamodule.setup("validate")
    windows = ConcatDataset([datamodule.train_dataset, datamodule.val_dataset])
    count = min(len(windows), batches * data.batch_size)
    evenly_spread = [i * len(windows) // count for i in range(count)]
    loader = DataLoader(Subset(windows, evenly_spread), batch_size=data.batch_size)
    evaluator = L.Trainer(
        accelerator=trainer.accelerator,
        devices=1,
        precision=trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loss = evaluator.validate(module, dataloaders=loader, verbose=False)[0]["val/loss"]
    return {"loss": loss, "windows": count, "tokens": count * model.config.block_size}


def cached_held_out_loss(run_dir: Path, checkpoint: Path, data: DataConfig, spec: str, trainer: TrainerConfig) -> float:
    """``held_out_loss`` of ``checkpoint`` on the corpus ``spec`` names (``data``, as ``eval_data_config``
    gives), over ``trainer.limit_val_batches`` batches; kept in ``run_dir`` and read from there when
    it was computed for the same ``spec``."""
    path = run_dir / HELD_OUT_FILE
    cached = read_record(path) if path.is_file() else {}
    if cached.get("eval_data") == spec:
        return cached["loss"]
    result = held_out_loss(checkpoint, data, trainer.limit_val_batches, trainer)
    write_json(path, {"eval_data": spec, "checkpoint": str(checkpoint), **result})
    return result["loss"]

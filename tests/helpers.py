"""Shared by the tests that train: a tiny run config, and ways to run train.py."""

import os
import subprocess
import sys
from pathlib import Path

from moe_gpt.compose import compose_run_config
from moe_gpt.run import train

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model/size=mini",
    "model.n_layer=2",
    "model.n_embd=32",
    "model.n_head=2",
    "model.block_size=32",
    "model.moe.num_experts=4",
    "data.batch_size=4",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "optim.warmup_steps=2",
    "logger.expert_stats_every_n_steps=2",
    "logger.heatmap_every_n_steps=2",
]


def run_train_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def train_in_process(overrides: list[str], run_dir: Path) -> dict:
    return train(compose_run_config(overrides, run_dir=str(run_dir)))

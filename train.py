"""Train a GPT-2 with dense or Mixture-of-Experts feed-forward blocks.

    python train.py                                   # MoE mini model on Python's stdlib, CPU
    python train.py model=dense                       # the same GPT-2 with dense FFNs
    python train.py model.moe.num_experts=16 model.moe.top_k=1 model.moe.activation=swish
    python train.py -m model.moe.num_experts=4,8      # a sweep (Hydra multirun)

Hydra composes ``configs/`` onto the typed schema in ``moe_gpt/config.py``; see README.md.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from moe_gpt.config import ConfigError, RunConfig, register_schema
from moe_gpt.data import DataError

log = logging.getLogger("train")
register_schema()


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float:
    from moe_gpt.run import train  # after Hydra parsed the CLI: --help stays instant

    try:
        run_config: RunConfig = OmegaConf.to_object(cfg)  # validates every value
        metrics = train(run_config, OmegaConf.to_container(cfg, resolve=True))
    except (ConfigError, DataError) as error:
        log.error("%s", error)
        sys.exit(2)
    return metrics["val_loss"]  # what a sweeper minimises


if __name__ == "__main__":
    main()

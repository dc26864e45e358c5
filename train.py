"""Train a GPT-2 with dense or Mixture-of-Experts feed-forward blocks.

    python train.py                                   # MoE mini model on Python's stdlib, CPU
    python train.py model=dense                       # the same GPT-2 with dense FFNs
    python train.py model.moe.num_experts=16 model.moe.top_k=1 model.moe.activation=swish
    python train.py -m model.moe.num_experts=4,8      # a sweep (Hydra multirun)
    python train.py -m hparams_search=moe_optuna      # an Optuna search

Hydra composes ``configs/`` onto the typed schema in ``moe_gpt/config.py``; see README.md.
Every job leaves ``metrics.json`` (success) or ``failure.json`` (any exception) in its directory.
A single run stops with exit code 2 on bad input; in a sweep a failed job is recorded and the
sweep goes on with the next one.
"""

import json
import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moe_gpt.config import ConfigError, RunConfig, register_schema
from moe_gpt.data import DataError

log = logging.getLogger("train")
register_schema()

USER_ERRORS = (ConfigError, DataError)  # bad input: one line, exit code 2, no traceback
# What a failed job returns to the sweeper. Not NaN: hydra-optuna-sweeper 1.3.0 answers a NaN by
# telling optuna a failed trial *with* a value, which optuna rejects, ending the whole study.
# +inf is the worst possible loss: the study goes on and TPE learns to avoid that region.
FAILED_JOB_OBJECTIVE = math.inf


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def record_failure(job_dir: Path, error: Exception, overrides: list[str]) -> None:
    """Write ``failure.json`` so a sweep summary can list this job and why it failed."""
    path = job_dir / "failure.json"
    if path.exists():
        log.warning("replacing %s, left by an earlier attempt in this directory", path)
    record = {"status": "failed", "error_type": type(error).__name__, "reason": one_line(error), "overrides": overrides}
    path.write_text(json.dumps(record, indent=2) + "\n")


def sweep_objective(metrics: dict) -> float:
    """What a sweeper minimises: the final validation loss, or +inf for a run that diverged."""
    val_loss = float(metrics["val_loss"])
    return val_loss if math.isfinite(val_loss) else FAILED_JOB_OBJECTIVE


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float:
    # Imported after Hydra parsed the command line, so --help and --cfg stay instant.
    from moe_gpt.console import tidy_lightning_logging
    from moe_gpt.run import train

    tidy_lightning_logging()
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        run_config: RunConfig = OmegaConf.to_object(cfg)  # validates every value
        metrics = train(run_config, OmegaConf.to_container(cfg, resolve=True))
    except Exception as error:
        record_failure(Path(hydra_cfg.runtime.output_dir), error, list(hydra_cfg.overrides.task))
        user_error = isinstance(error, USER_ERRORS)
        if not (in_sweep or user_error):
            raise  # a bug: Hydra prints the traceback, exit code 1
        # sys.exit would end the whole sweep (Hydra's launchers only catch Exception), so a
        # sweep logs the failure (with the traceback when it is not bad input) and goes on.
        log.error("%s", one_line(error), exc_info=None if user_error else error)
        if in_sweep:
            return FAILED_JOB_OBJECTIVE
        sys.exit(2)
    return sweep_objective(metrics)


if __name__ == "__main__":
    main()

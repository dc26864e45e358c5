"""Train a GPT-2 with dense or Mixture-of-Experts feed-forward blocks.

    python train.py                                   # MoE mini model on Python's stdlib, CPU
    python train.py model=dense                       # the same GPT-2 with dense FFNs
    python train.py model.moe.num_experts=16 model.moe.top_k=1 model.moe.activation=swish
    python train.py hydra.run.dir=outputs/moe/<run> resume=last   # continue a run (its own settings)
    python train.py -m model.moe.num_experts=4,8      # a sweep (Hydra multirun)
    python train.py -m hparams_search=moe_optuna      # an Optuna search

Hydra composes ``configs/`` onto the typed schema in ``moe_gpt/config.py``; see README.md.
Exit codes (moe_gpt/errors.py): 0 done, 2 bad input (one line), 3 diverged, 130/143 stopped by
Ctrl-C/SIGTERM after saving last.ckpt, 1 a bug (traceback). Every job leaves ``metrics.json``
or ``failure.json`` in its folder. In a sweep a failed or diverged job is recorded and the sweep
goes on with the next one; a stop signal ends the sweep.
"""

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moe_gpt.cli.common import USER_ERRORS, entry_point
from moe_gpt.compose import CONFIG_DIR, check_known_keys
from moe_gpt.config import RunConfig, register_schema
from moe_gpt.training.cpu_memory import reuse_freed_cpu_memory
from moe_gpt.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, Diverged, Interrupted, one_line

if TYPE_CHECKING:
    from moe_gpt.training.run import RunRecord  # imported lazily below: Lightning takes seconds to import

log = logging.getLogger("train")
register_schema()

# What a failed job returns to the sweeper. Not NaN: hydra-optuna-sweeper 1.3.0 answers a NaN by
# telling optuna a failed trial *with* a value, which optuna rejects, ending the whole study.
# +inf is the worst possible loss: the study goes on and TPE learns to avoid that region.
FAILED_JOB_OBJECTIVE = math.inf
_command_started: Optional[float] = None  # when main() began: a run folder made after it is this command's


def sweep_objective(metrics: dict) -> float:
    """What a sweeper minimises: the final validation loss, or +inf for a run that diverged."""
    val_loss = metrics["val_loss"]
    return val_loss if val_loss is not None and math.isfinite(val_loss) else FAILED_JOB_OBJECTIVE


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def train_job(cfg: DictConfig) -> float:
    """One Hydra job: a single run, or one job of a sweep."""
    reuse_freed_cpu_memory()  # here, not at import: also in sweep jobs, which call train_job() directly
    # Imported after Hydra parsed the command line, so --help and --cfg stay instant.
    from lightning.pytorch.utilities import rank_zero_only

    from moe_gpt.training.console import tidy_lightning_logging
    from moe_gpt.training.run import RunRecord, train
    from moe_gpt.training.run_folder import settle_rank_before_trainer

    tidy_lightning_logging()
    settle_rank_before_trainer()
    if rank_zero_only.rank != 0:
        logging.getLogger().setLevel(logging.ERROR)  # the other processes of a run: their errors only
    hydra_cfg = HydraConfig.get()
    record = RunRecord(overrides=list(hydra_cfg.overrides.task))
    try:
        cfg, record.overrides = compose_for_resume(cfg, record.overrides, Path(hydra_cfg.runtime.output_dir))
        check_known_keys(cfg, record.overrides)  # after the resume's recomposition: its keys count too
        run_config: RunConfig = OmegaConf.to_object(cfg)  # validates every value
        record.resolved_config = OmegaConf.to_container(cfg, resolve=True)
        record.save_config_files = lambda folder: save_config_files(folder, cfg, record.overrides)
        metrics = train(run_config, record)
    except (Exception, Interrupted) as error:
        return end_failed_job(error, cfg, record, in_sweep=hydra_cfg.mode == RunMode.MULTIRUN)
    return sweep_objective(metrics)


def end_failed_job(error: BaseException, cfg: DictConfig, record: "RunRecord", in_sweep: bool) -> float:
    """Record why the job failed, then exit with its code, or (in a sweep) return the worst objective."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        record_or_leave_no_trace(error, cfg, record, in_sweep)
    if isinstance(error, Interrupted):
        log.error("%s", one_line(error))
        sys.exit(error.exit_code)  # ends a sweep too: the signal was meant for the whole command
    user_error = isinstance(error, USER_ERRORS + (Diverged,))
    if not (in_sweep or user_error):
        raise error  # a bug: the traceback, exit code 1
    # sys.exit would end the whole sweep (Hydra's launchers only catch Exception), so a
    # sweep logs the failure (with the traceback when it is not bad input) and goes on.
    log.error("%s", one_line(error), exc_info=None if user_error else error)
    if in_sweep:
        return FAILED_JOB_OBJECTIVE
    sys.exit(EXIT_DIVERGED if isinstance(error, Diverged) else EXIT_BAD_INPUT)


def record_or_leave_no_trace(error: BaseException, cfg: DictConfig, record: "RunRecord", in_sweep: bool) -> None:
    """``failure.json`` in a folder this run owns; nothing at all anywhere else.

    A run that claimed its folder records why it stopped. A command refused before that (bad
    input, a folder of another run) writes nothing, and the empty folder Hydra made for it goes.
    A sweep's job folder is the sweep's own: the failure is recorded there so the sweep summary
    lists it, unless another run is in it.
    """
    from moe_gpt.training.run_folder import FolderRefused, claimed, record_failure

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if record.claimed:
        record_failure(run_dir, error, record.overrides, step=getattr(error, "step", None))
    elif in_sweep:
        try:
            with claimed(run_dir, resume_from=None):
                save_config_files(run_dir, cfg, record.overrides)  # a sweep summary finds its jobs by these
                record_failure(run_dir, error, record.overrides)
        except FolderRefused:
            pass
    else:
        remove_if_made_for_this_command(run_dir)


def remove_if_made_for_this_command(run_dir: Path) -> None:
    """Hydra creates the run folder before the job starts; a refused command leaves no empty one behind."""
    made_now = _command_started is not None and run_dir.is_dir() and run_dir.stat().st_mtime >= _command_started
    if made_now and not any(run_dir.iterdir()):
        run_dir.rmdir()


def compose_for_resume(cfg: DictConfig, overrides: list[str], run_dir: Path) -> tuple[DictConfig, list[str]]:
    """When resuming: the config of the run that wrote the checkpoint, with this command line's changes.

    The checkpoint holds that run's overrides; composing them with this command's (which win) gives
    the resumed run's config, so nothing has to be repeated.
    """
    from moe_gpt.compose import merge_overrides
    from moe_gpt.training.resume import find_resume, saved_overrides

    resume = find_resume(OmegaConf.select(cfg, "resume"), run_dir)
    saved = None if resume is None else saved_overrides(resume)
    if saved is None:
        return cfg, overrides
    merged = merge_overrides(saved, overrides)
    log.info("resuming %s with the overrides %s", resume.path, " ".join(merged))
    return hydra.compose(config_name="config", overrides=merged), merged


def save_config_files(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """Hydra's record of the run in ``<run_dir>/.hydra/``, written once the run owns the folder.

    (``hydra.output_subdir`` is null, so that Hydra itself writes nothing into a folder the run may refuse.)
    """
    folder = run_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml", resolve=True)
    OmegaConf.save(OmegaConf.create({"hydra": HydraConfig.get()}), folder / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(overrides), folder / "overrides.yaml")


# Each Hydra job keeps freed CPU memory itself (train_job), sweep jobs included.
@entry_point(runs_model=False)
def main(argv: list[str]) -> None:
    """``python train.py <argv>``; returns train.py's exit code (moe_gpt/errors.py)."""
    # Hydra prints its own composition errors over 7-15 lines and exits 1; with this set it raises
    # them instead, and they get the one-line, exit-code-2 treatment of any bad input.
    global _command_started
    _command_started = time.time() - 1.0  # a folder's time stamp can be up to a tick older than the clock
    saved_argv, saved_full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    # Hydra reads its command line from sys.argv; the program keeps its path, since Lightning starts a
    # multi-process run's other processes by running sys.argv again.
    sys.argv = [saved_argv[0], *argv]
    try:
        train_job()
    finally:
        sys.argv = saved_argv
        if saved_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full_error


if __name__ == "__main__":
    raise SystemExit(main())

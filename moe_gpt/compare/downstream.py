"""Downstream scores of a checkpoint through lm-evaluation-harness (``scripts/evaluate.py``,
``scripts/compare.py --eval-tasks``).

The checkpoint (or a run folder's best one) is read through ``weights/safe_load.py`` and handed to
``lm_eval.simple_evaluate`` as a ``MoeGptLM``. Tasks are lm-eval's, or YAML files in an
``--include-path`` folder (a local task reads JSONL with ``dataset_path: json`` and ``data_files``).
A task whose data is on the Hugging Face hub and not in the local cache, offline, is one line
saying what to do instead.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from moe_gpt.config import ConfigError
from moe_gpt.data import load_gpt2_tokenizer
from moe_gpt.data.tokenizer import GPT2_N_VOCAB
from moe_gpt.reporting import cell, markdown_table
from moe_gpt.training.run_folder import read_record, saved_checkpoint, write_json

OUT_IN_RUN_FOLDER = "lm_eval"  # where a run folder's scores go
RESULTS_FILE = "results.json"
CONSOLE_LOG = "output.log"  # in a comparison: what lm-eval printed while scoring the run
TABLE_FILE = "results.md"
STDERR_SUFFIX = "_stderr"


@dataclass(frozen=True)
class EvalSettings:
    tasks: list[str]
    limit: Optional[int] = None  # documents per task; None: all
    include_path: Optional[str] = None  # a folder of task YAML files
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    device: str = "cpu"
    tokenizer_dir: str = "data/tokenizer"


def eval_settings(
    tasks: str, limit: Optional[int], include_path: Optional[str], flag: str = "--", **rest: Any
) -> EvalSettings:
    """EvalSettings from the command line (``tasks`` comma-separated); errors name ``<flag>tasks``, ``<flag>limit``."""
    names = [task.strip() for task in tasks.split(",") if task.strip()]
    if not names:
        raise ConfigError(f"{flag}tasks is empty; name at least one lm-eval task, e.g. {flag}tasks arc_easy")
    if limit is not None and limit < 1:
        raise ConfigError(f"{flag}limit {limit} must be >= 1 (leave it out to evaluate every document)")
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise ConfigError(
            f"{flag}include-path {include_path} is not a folder; pass the folder that holds your task YAML files"
        )
    return EvalSettings(tasks=names, limit=limit, include_path=include_path, **rest)


def checkpoint_of(path: str | Path) -> Path:
    """The checkpoint ``path`` names: a .ckpt file, or a run folder's best.ckpt (else its last.ckpt)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"--checkpoint {path} does not exist; pass a .ckpt or a run folder")
    if not path.is_dir():
        return path
    checkpoint = saved_checkpoint(path)
    if checkpoint is None:
        raise ConfigError(
            f"--checkpoint {path}: a folder without checkpoints/best.ckpt or last.ckpt; pass a run folder or a .ckpt"
        )
    return checkpoint


def task_manager(settings: EvalSettings):
    """lm-eval's TaskManager; only the ``--include-path`` folder when it holds every task asked for.

    Indexing lm-eval's own ~15,000 task files takes 10 to 50 s on a 2-core machine, so it is
    skipped when no built-in task is needed.
    """
    from lm_eval.tasks import TaskManager

    if settings.include_path is not None:
        folder = Path(settings.include_path).expanduser()
        local = TaskManager(include_path=str(folder), include_defaults=False)
        if all(task in local.all_tasks for task in settings.tasks):
            return local
        return TaskManager(include_path=str(folder))
    return TaskManager()


def evaluate_checkpoint(path: str | Path, settings: EvalSettings) -> dict[str, Any]:
    """lm-eval's results for the checkpoint (``results``, ``samples``, ``configs``, ...), with ``checkpoint``."""
    import lm_eval

    from moe_gpt.compare.lm_eval_model import MoeGptLM
    from moe_gpt.training.resume import RUN_RECORD  # these import torch: evaluate.py checks its arguments first
    from moe_gpt.weights.safe_load import model_from_checkpoint, read_checkpoint

    checkpoint_path = checkpoint_of(path)
    checkpoint = read_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint, checkpoint_path).to(settings.device)
    if model.config.vocab_size != GPT2_N_VOCAB:
        raise ConfigError(
            f"{checkpoint_path} has model.vocab_size={model.config.vocab_size}, not GPT-2's {GPT2_N_VOCAB}; "
            "lm-eval's texts cannot be tokenized for it"
        )
    tokenizer = load_gpt2_tokenizer(settings.tokenizer_dir)
    manager = task_manager(settings)
    lm = MoeGptLM(model, tokenizer, batch_size=settings.batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=settings.tasks,
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            task_manager=manager,
            log_samples=True,
        )
    except KeyError as error:
        if "not a registered task" not in str(error):  # lm-eval's words for a task name it does not know
            raise
        unknown = error.args[0] if error.args else error
        raise ConfigError(f"--tasks: {unknown}; see `lm-eval ls tasks` or --include-path") from None
    except Exception as error:
        hint = offline_hint(error, settings)
        if hint is None:
            raise
        raise hint from None
    results["checkpoint"] = str(checkpoint_path)
    results["wandb_id"] = checkpoint.get(RUN_RECORD, {}).get("wandb_id")
    results["logger"] = checkpoint.get(RUN_RECORD, {}).get("config", {}).get("logger")
    return results


def offline_hint(error: BaseException, settings: EvalSettings) -> Optional[ConfigError]:
    """One line for a task whose data is on the hub and cannot be fetched here; None for other errors."""
    text = f"{type(error).__name__}: {error}"
    if not any(marker in text for marker in HUB_MARKERS):
        return None
    return ConfigError(
        f"--tasks {','.join(settings.tasks)}: a task's data is on the Hugging Face hub and cannot be downloaded here "
        f"({one_line_reason(error)}); evaluate it where the hub is reachable, copy its dataset into the HF cache "
        "and set HF_DATASETS_OFFLINE=1, or write a local task (dataset_path: json, data_files) in a folder passed "
        "as --include-path"
    )


# What datasets and huggingface_hub say when the hub cannot be reached or offline mode is on.
HUB_MARKERS = (
    "OfflineModeIsEnabled",
    "offline mode",
    "Couldn't reach",
    "ConnectionError",
    "LocalEntryNotFound",
    "HF_HUB_OFFLINE",
)


def one_line_reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__


def scores(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task and metric: ``task``, ``metric``, ``value``, ``stderr`` (None where lm-eval has none),
    ``higher_is_better``."""
    rows = []
    for task, metrics in results["results"].items():
        directions = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")  # "acc,none": a metric under a filter
            if not comma or metric.endswith(STDERR_SUFFIX) or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}{STDERR_SUFFIX},{filter_name}")
            rows.append({
                "task": task,
                "metric": metric,
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "higher_is_better": bool(directions.get(metric, True)),
            })
    return rows


def results_table(results: dict[str, Any]) -> str:
    rows = [
        [cell(row["task"]), cell(row["metric"]), cell(row["value"], "{:.4f}"), cell(row["stderr"], "{:.4f}")]
        for row in scores(results)
    ]
    return markdown_table(["task", "metric", "value", "stderr"], rows)


def write_results(out: Path, results: dict[str, Any], settings: EvalSettings) -> list[Path]:
    """``results.json`` (scores, task configs and versions; no samples), ``results.md``, and each task's
    per-document records as ``samples_<task>.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": results["checkpoint"],
        "settings": settings_record(settings),
        "scores": scores(results),
        "results": results["results"],
        "n-samples": results.get("n-samples"),
        "versions": results.get("versions"),
        "configs": results.get("configs"),
    }
    written = [out / RESULTS_FILE, out / TABLE_FILE]
    write_json(out / RESULTS_FILE, json.loads(json.dumps(record, default=str)))
    (out / TABLE_FILE).write_text(f"# lm-eval: {results['checkpoint']}\n\n{results_table(results)}\n")
    for task, samples in results.get("samples", {}).items():
        path = out / f"samples_{task}.jsonl"
        path.write_text("".join(json.dumps(sample, default=str) + "\n" for sample in samples))
        written.append(path)
    return written


def log_to_wandb(run_dir: Optional[Path], results: dict[str, Any]) -> Optional[str]:
    """Add the scores to the W&B run the checkpoint's training logged to (``eval/<task>/<metric>``).

    Only when the run logged to W&B and its folder still holds the W&B files; returns the run id.
    """
    logger = results.get("logger") or {}
    logged = logger.get("kind") == "wandb" and results.get("wandb_id")
    if run_dir is None or not logged or not (run_dir / "wandb").is_dir():
        return None
    import wandb

    run = wandb.init(
        project=logger.get("project"),
        id=results["wandb_id"],
        resume="allow",
        dir=str(run_dir),
        mode=logger.get("mode", "offline"),
        # The command prints where the scores went; W&B's banner would bury the table.
        settings=wandb.Settings(silent=True, console="off"),
    )
    try:
        run.summary.update({f"eval/{row['task']}/{row['metric']}": row["value"] for row in scores(results)})
    finally:
        run.finish()
    return results["wandb_id"]


def settings_record(settings: EvalSettings) -> dict[str, Any]:
    """What decides the scores (not where or how fast they are computed)."""
    return {
        "tasks": settings.tasks,
        "limit": settings.limit,
        "include_path": settings.include_path,
        "num_fewshot": settings.num_fewshot,
    }


def cached_scores(run_dir: Path, checkpoint: Path, settings: EvalSettings) -> list[dict[str, Any]]:
    """``scores`` of ``checkpoint``, evaluated into ``<run_dir>/lm_eval`` (as evaluate.py does), or read from
    there when that evaluation had the same settings: a re-run comparison evaluates only what is new."""
    path = run_dir / OUT_IN_RUN_FOLDER / RESULTS_FILE
    if path.is_file():
        cached = read_record(path)
        if cached.get("settings") == settings_record(settings) and cached.get("checkpoint") == str(checkpoint):
            return cached["scores"]
    folder = run_dir / OUT_IN_RUN_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    # lm-eval's progress bars and notes go to the run's lm_eval/output.log, so the comparison's console
    # says only what each run did, as for its training (the run's output.log).
    with open(folder / CONSOLE_LOG, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        results = evaluate_checkpoint(checkpoint, settings)
    write_results(folder, results, settings)
    log_to_wandb(run_dir, results)
    return scores(results)


def report_fields(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A comparison row's share of the scores: ``downstream`` {"<task> <metric>": value} and, per key,
    ``downstream_higher_is_better``."""
    return {
        "downstream": {f"{row['task']} {row['metric']}": row["value"] for row in rows},
        "downstream_higher_is_better": {f"{row['task']} {row['metric']}": row["higher_is_better"] for row in rows},
    }

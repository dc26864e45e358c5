"""How runs fail: bad input is one line and exit code 2 before any work, divergence is loud, and a
run never writes into a folder that is not its own."""

import json
import math
from pathlib import Path
from typing import Optional

import lightning as L
import pytest
import torch

from moe_gpt.compose import compose_run_config
from moe_gpt.errors import Diverged
from moe_gpt.training.resume import RUN_RECORD
from moe_gpt.training.run import RunRecord, train
from moe_gpt.training.run_folder import write_json
from tests.helpers import (
    TINY,
    csv_column,
    error_lines,
    folder_state,
    start_train_cli,
    train_in_process,
    train_main,
    wait_for_file,
)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "data=nope",
            "error: In 'config': Could not find 'data/nope' Available options in 'data': fineweb_edu shakespeare",
        ),
        (
            "model.moe.top_k=two",
            "error: Error merging override model.moe.top_k=two: Value 'two' of type 'str' could not be converted to Integer",
        ),
        (
            "model.moe.num_expert=4",
            "error: Could not override 'model.moe.num_expert': Key 'num_expert' not in 'MoEConfig'",
        ),
    ],
)
def test_a_config_that_does_not_compose_is_one_line_and_exit_code_2(tmp_path, override, message):
    result = train_main([override, f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.beta1=1.5", "optim.beta1=1.5 must be in [0, 1)"),
        ("optim.lr=inf", "optim.lr=inf must be a finite positive number"),
        ("trainer.precision=bogus", "trainer.precision='bogus' is unknown; choose one of 32-true, bf16-mixed"),
        ("trainer.devices=0", "trainer.devices=0 must be a positive number"),
        ("seed=-1", "seed=-1 must be between 0 and 4294967295"),
        ("model.vocab_size=100", "model.vocab_size=100 is smaller than the GPT-2 tokenizer's 50257 token ids"),
        (
            "model.moe.every_n_layers=3",
            "model.moe.every_n_layers=3 and model.moe.first_k_dense=0 leave no MoE block among model.n_layer=2",
        ),
        ("trainer.accelerator=gpu", "trainer.accelerator=gpu but no CUDA GPU is available here; use trainer=cpu"),
        (
            "trainer.devices=-1",
            "trainer.devices=-1 does not work with trainer.accelerator=cpu: -1 and device ids are for GPUs; give the "
            "number of CPU processes, e.g. trainer.devices=2",
        ),
        ("trainer.devices=[0,1]", "trainer.devices=[0, 1] does not work with trainer.accelerator=cpu: -1 and device ids"),
        ("trainer.gradient_clip_val=nan", "trainer.gradient_clip_val=nan must be a finite number >= 0 (0 turns clipping off)"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1.0 must be a finite number >= 0"),
        ("trainer.gradient_clip_val=inf", "trainer.gradient_clip_val=inf must be a finite number >= 0"),
        (
            "trainer.accelerator=auto trainer.devices=-1",
            "trainer.devices=-1 does not work with trainer.accelerator=auto on this machine, which has no GPU",
        ),
    ],
)
def test_a_bad_value_is_one_line_and_exit_code_2_before_any_data(tmp_path, corpus_overrides, override, message):
    if override.startswith(("trainer.accelerator=gpu", "trainer.accelerator=auto")) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_refused_before_anything(tmp_path, corpus_overrides, override.split(), message)


def assert_refused_before_anything(tmp_path: Path, corpus_overrides: list[str], overrides: list[str], message: str) -> None:
    """``train.py`` with TINY and ``overrides`` exits 2 with one error line holding ``message``, before any data
    is built and without writing its run folder."""
    cache = tmp_path / "fresh-token-cache"
    args = TINY + corpus_overrides + [f"data.cache_dir={cache}", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    result = train_main(args)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not cache.exists()
    assert not (tmp_path / "run").exists()  # refused before the folder was claimed: nothing written, not even it


UNKNOWN_KEYS = [
    ("+model.moe.num_expert=4", "+model.moe.num_expert=4: model.moe has no key num_expert; did you mean model.moe.num_experts?"),
    ("++model.moe.num_expert=4", "++model.moe.num_expert=4: model.moe has no key num_expert; did you mean model.moe.num_experts?"),
    ("+trainer.max_step=5", "+trainer.max_step=5: trainer has no key max_step; did you mean trainer.max_steps?"),
    ("+foo=1", "+foo=1: the config has no key foo; its keys are model, data, optim, trainer"),
]


@pytest.mark.parametrize("override,message", UNKNOWN_KEYS)
def test_a_plus_override_of_a_key_the_schema_lacks_is_one_line_and_exit_code_2(tmp_path, corpus_overrides, override, message):
    # Hydra adds +keys past the schema's struct mode; without the check the run trained and ignored them.
    assert_refused_before_anything(tmp_path, corpus_overrides, [override], message)


def run_folder_with(checkpoint: Path, folder: Path, overrides: list[str]) -> Path:
    """A run folder whose last.ckpt is ``checkpoint``, recorded as written by ``train.py <overrides>``."""
    state = torch.load(checkpoint, weights_only=True)
    state[RUN_RECORD]["overrides"] = overrides
    (folder / "checkpoints").mkdir(parents=True)
    torch.save(state, folder / "checkpoints" / "last.ckpt")
    return folder


@pytest.mark.parametrize("saved", [True, False], ids=["saved-in-the-checkpoint", "typed-now"])
def test_a_resume_refuses_a_plus_key_the_schema_lacks_and_leaves_the_run_unchanged(
    tiny_moe_checkpoint, corpus_overrides, tmp_path, saved
):
    # A checkpoint from before the check may carry such a key; resume=last recomposes it with the new overrides.
    override, message = UNKNOWN_KEYS[2]
    earlier = TINY + corpus_overrides + ["logger=none", "trainer.max_steps=2"]
    run_dir = run_folder_with(tiny_moe_checkpoint, tmp_path / "run", earlier + [override] * saved)
    before = folder_state(run_dir)
    result = train_main([f"hydra.run.dir={run_dir}", "resume=last", "trainer.max_steps=4"] + [override] * (not saved))
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert folder_state(run_dir) == before


def test_divergence_stops_the_run_with_one_line_and_keeps_finite_checkpoints(tmp_path, corpus_overrides):
    args = (
        TINY
        + corpus_overrides
        + ["optim.lr=1e3", "logger=csv", "checkpoint.every_n_steps=1", f"hydra.run.dir={tmp_path}"]
    )
    result = train_main(args)
    assert result.returncode == 3
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "training diverged:" in errors[0] and "lower optim.lr" in errors[0], result.stderr[
        -2000:
    ]
    failure = json.loads((tmp_path / "failure.json").read_text())
    assert failure["error_type"] == "Diverged" and f"at step {failure['step']}" in failure["reason"]
    assert not (tmp_path / "metrics.json").exists()
    for name in ("last.ckpt", "best.ckpt"):
        checkpoint = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert checkpoint["global_step"] < failure["step"]
        assert all(torch.isfinite(tensor).all() for tensor in checkpoint["state_dict"].values()), name


def test_a_non_finite_loss_stops_before_the_optimizer_step(tmp_path, corpus_overrides):
    # Checkpoints only at the end: the loss check, not the checkpoint check, has to catch it.
    with pytest.raises(
        Diverged, match=r"training diverged: the loss is nan at step \d+; lower optim.lr \(now 1e\+30\)"
    ) as stopped:
        train_in_process(TINY + corpus_overrides + ["optim.lr=1e30", "logger=csv", "trainer.max_steps=20"], tmp_path)
    logged = csv_column(tmp_path, "train/loss")
    assert all(math.isfinite(loss) for _, loss in logged) and len(logged) == stopped.value.step - 1


class NaNAtStep(L.Callback):
    """Makes every loss of optimizer step ``bad`` NaN (the last layer norm outputs NaN), and keeps the weights,
    buffers and AdamW state as they were before that step and as they are when the run stops."""

    def __init__(self, bad: int):
        self.bad = bad
        self.before: dict[str, torch.Tensor] = {}
        self.at_stop: dict[str, torch.Tensor] = {}
        self.steps_done_at_stop: Optional[int] = None
        self._hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.bad and self._hook is None:
            self._hook = pl_module.model.transformer.ln_f.register_forward_hook(lambda m, i, out: out * math.nan)
        elif trainer.global_step + 1 > self.bad and self._hook is not None:
            self._hook.remove()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.bad - 1:
            self.before = training_state(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self.at_stop, self.steps_done_at_stop = training_state(trainer, pl_module), trainer.global_step


def training_state(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    state = {f"model.{key}": value.detach().clone() for key, value in pl_module.model.state_dict().items()}
    optimizer = trainer.optimizers[0]
    for index, parameter in enumerate(pl_module.model.parameters()):
        state.update({f"adamw.{index}.{key}": value.clone() for key, value in optimizer.state[parameter].items()})
    return state


@pytest.mark.parametrize(
    "when,checked_in",
    [(["checkpoint.every_n_steps=100"], "training_step"), (["checkpoint.every_n_steps=3"], "on_save_checkpoint")],
    ids=["at-the-next-logging-step", "at-a-checkpoint-before-it"],
)
def test_a_non_finite_step_is_skipped_on_the_device_and_stops_the_run_before_anything_sees_it(
    tmp_path, corpus_overrides, when, checked_in
):
    # Everything logged every 4 steps, the loss NaN at step 2: steps 2 and 3 run without a look at it on the host
    # and change nothing (aux_free: the selection biases neither); step 4 looks and stops before its update, or
    # the checkpoint of step 3 does and is not written.
    every_4 = ["trainer.log_every_n_steps=4", "logger.expert_stats_every_n_steps=4", "logger.heatmap_every_n_steps=4"]
    settings = every_4 + ["trainer.max_steps=8", "trainer.val_check_interval=8", "logger=csv"]
    aux_free = ["model.moe.router=sigmoid", "model.moe.load_balance=aux_free", "model.moe.aux_loss_coef=0"]
    poison = NaNAtStep(bad=2)
    cfg = compose_run_config(TINY + corpus_overrides + settings + aux_free + when, run_dir=str(tmp_path))
    with pytest.raises(Diverged, match=r"training diverged: the loss is nan at step 2; lower optim.lr") as stopped:
        train(cfg, RunRecord(callbacks=[poison]))
    assert stopped.value.step == 2 and poison.steps_done_at_stop == 3
    assert checked_in in [entry.name for entry in stopped.traceback]
    assert poison.at_stop.keys() == poison.before.keys() and any(key.endswith("exp_avg_sq") for key in poison.before)
    changed = [key for key in poison.before if not torch.equal(poison.before[key], poison.at_stop[key])]
    assert not changed, f"changed by the skipped steps: {changed}"
    logged = csv_column(tmp_path, "train/loss") if (tmp_path / "csv" / "metrics.csv").exists() else []
    assert all(math.isfinite(loss) for _, loss in logged)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_a_diverged_job_fails_in_the_sweep_summary_and_gives_optuna_infinity(
    tmp_path, corpus_overrides, load_script, capsys
):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *TINY, *corpus_overrides, "hparams_search=moe_optuna", "hydra.sweeper.n_trials=1", "optim.lr=1e30"]
    result = train_main([*args, "logger=none", f"hydra.sweep.dir={sweep_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep_dir / "optimization_results.yaml").read_text().count("best_value: .inf") == 1
    load_script("summarize_sweep").main([str(sweep_dir)])
    assert "| failed | Diverged: training diverged:" in capsys.readouterr().out


def test_records_are_strict_json(tmp_path):
    write_json(tmp_path / "metrics.json", {"val_loss": float("nan"), "history": [{"loss": float("inf")}], "ok": 1.5})

    def refuse(constant):
        raise AssertionError(f"{constant} in JSON")

    record = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert record == {"val_loss": None, "history": [{"loss": None}], "ok": 1.5}


def test_a_folder_with_another_runs_checkpoints_is_refused_and_left_untouched(tmp_path, corpus_overrides):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"earlier run")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("earlier: run\n")
    (tmp_path / "train.log").write_text("earlier run's log\n")
    before = folder_state(tmp_path)
    result = train_main(TINY + corpus_overrides + [f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "already holds checkpoints; pass resume=last" in errors[0]
    assert folder_state(tmp_path) == before


@pytest.mark.slow
def test_a_second_run_in_the_folder_of_a_live_run_is_refused(tmp_path, corpus_overrides):
    # The subject is a lock held by another live process, so the first run is one (the second runs here).
    # No checkpoint while the test runs: the lock, not the checkpoints, has to keep the second run out.
    endless = ["trainer.max_steps=100000", "checkpoint.every_n_steps=100000", "trainer.val_check_interval=100000"]
    first = start_train_cli(TINY + corpus_overrides + endless + [f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    try:
        wait_for_file(tmp_path / "train.log", first, containing="Seed set to")  # the folder is claimed and recorded
        before = folder_state(tmp_path / ".hydra")
        result = train_main(TINY + corpus_overrides + [f"hydra.run.dir={tmp_path}"])
        assert result.returncode == 2
        errors = error_lines(result.stderr)
        assert len(errors) == 1 and f"another run is training in {tmp_path} right now" in errors[0]
        assert folder_state(tmp_path / ".hydra") == before and not (tmp_path / "failure.json").exists()
    finally:
        first.kill()
        first.wait()

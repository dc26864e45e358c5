"""What a run prints where no progress bar is drawn (``> log``, ``nohup``, ``| tee``, SLURM's ``.out``): a plain
line at every logging step and after every validation, in train.log always and on the console then."""

import re

from tests.helpers import TINY, train_main

# TINY: 6 steps, validation every 3; logging every 2 steps here.
STEP_LINE = re.compile(r"step (\d+)/6  loss \d+\.\d{3}  [\d,]+ tokens/s  eta (\d+:\d\d:\d\d|-:--:--)")
VAL_LINE = re.compile(r"step (\d+)/6  val loss \d+\.\d{3} \(best \d+\.\d{3}\)")


def _steps(pattern: re.Pattern, text: str) -> list[int]:
    return [int(match.group(1)) for match in pattern.finditer(text)]


def test_a_run_whose_output_is_not_a_terminal_logs_each_logging_step_and_validation(tmp_path, corpus_overrides):
    run_dir = tmp_path / "run"
    result = train_main(TINY + corpus_overrides + ["logger=none", "trainer.log_every_n_steps=2", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    train_log = (run_dir / "train.log").read_text()
    for text in (result.stderr, train_log):  # the console (pytest's stdout is no terminal) and train.log
        assert _steps(STEP_LINE, text) == [2, 4, 6]
        assert _steps(VAL_LINE, text) == [3, 6]
    assert re.search(r"step 6/6  loss .* eta 0:00:00", train_log)  # the last step has no time left


def test_on_a_terminal_the_bar_shows_progress_and_the_lines_go_to_train_log_only(tmp_path, corpus_overrides, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich's switch: its console counts as a terminal and draws the bar live
    run_dir = tmp_path / "run"
    result = train_main(TINY + corpus_overrides + ["logger=none", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _steps(STEP_LINE, (run_dir / "train.log").read_text()) == [1, 2, 3, 4, 5, 6]
    assert not STEP_LINE.search(result.stderr) and not VAL_LINE.search(result.stderr)

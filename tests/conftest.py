"""Shared test fixtures."""

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from moe_gpt.config import (
    DataConfig,
    GPTConfig,
    LoggerConfig,
    OptimConfig,
    RunConfig,
    TrainerConfig,
)

# Set before datasets / huggingface_hub are imported: tests never reach the network, and
# the tokenizer always comes from the local ranks file, the same on every machine.
os.environ["HF_HUB_OFFLINE"] = "1"  # forced, not defaulted: tests never reach the network
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("MOE_GPT_TOKENIZER_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO_ROOT / "data" / "tokenizer"


@pytest.hookimpl(trylast=True)  # after -m has deselected: the shares are of the tests that run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each xdist worker starts with its share of the slow tests, and the quick ones come last.

    pytest-xdist's worksteal hands worker i the i-th contiguous share of the collection and, when one
    runs out, moves the end of another's queue over. Dealing the slow tests out among the shares and
    putting each share's slow tests first leaves quick tests at every queue's end, so no worker is left
    alone with a minute-long test (the longest-first rule of scheduling). A file's slow tests stay together,
    as they share module-scoped runs. The order is the same in every worker, as xdist requires; in one
    process the slow tests simply run first.
    """
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    slow_by_file: dict[str, list[pytest.Item]] = {}
    for item in items:
        if item.get_closest_marker("slow"):
            slow_by_file.setdefault(item.nodeid.split("::")[0], []).append(item)
    slow: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for number, group in enumerate(slow_by_file.values()):  # the files in turn
        slow[number % workers].extend(group)
    quick = [item for item in items if not item.get_closest_marker("slow")]
    order, remaining = [], len(items)
    for worker in range(workers):
        share = remaining // (workers - worker)  # the size worksteal gives this worker, in its order
        take = max(share - len(slow[worker]), 0)
        order += slow[worker] + quick[:take]
        quick, remaining = quick[take:], remaining - share
    items[:] = order + quick


@pytest.fixture(scope="session")
def gpt2():
    """The GPT-2 tokenizer from data/tokenizer/gpt2.tiktoken (offline path)."""
    if not (TOKENIZER_DIR / "gpt2.tiktoken").is_file():
        pytest.fail("data/tokenizer/gpt2.tiktoken is missing; run `python scripts/fetch_tokenizer.py` once", pytrace=False)
    from moe_gpt.data import load_gpt2_tokenizer

    return load_gpt2_tokenizer(TOKENIZER_DIR, offline=True)


@pytest.fixture
def text_corpus(tmp_path: Path, gpt2) -> Callable[..., DataConfig]:  # gpt2: fail early if the ranks file is missing
    """Factory: write ``{relative path: text or bytes}`` under tmp_path/corpus, return a DataConfig for it."""

    def make(files: dict[str, str | bytes], **overrides) -> DataConfig:
        root = tmp_path / "corpus"
        for relative, content in files.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        settings = dict(
            corpus="text",
            name="tiny",
            paths=[str(root)],
            cache_dir=str(tmp_path / "cache"),
            tokenizer_dir=str(TOKENIZER_DIR),
            val_fraction=0.3,
            batch_size=2,
        )
        return DataConfig(**{**settings, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> DataConfig:
    """A few stdlib modules as a local text corpus with its own token cache, shared by the session."""
    import json.decoder
    import json.encoder
    import subprocess
    import textwrap

    root = tmp_path_factory.mktemp("tiny_corpus")
    for module in (textwrap, json.decoder, json.encoder, subprocess):
        (root / f"{Path(module.__file__).stem}.txt").write_text(Path(module.__file__).read_text())
    return DataConfig(
        corpus="text",
        name="tiny",
        paths=[str(root / "*.txt")],
        cache_dir=str(root / "tokens"),
        tokenizer_dir=str(TOKENIZER_DIR),
        val_fraction=0.3,
        batch_size=4,
    )


@pytest.fixture(scope="session")
def tiny_run_config(tiny_corpus) -> Callable[..., RunConfig]:
    """Factory: a RunConfig for a 2-layer, 32-wide GPT-2 trained 2 steps on the CPU (a real run in seconds).

    The model is dense unless ``model=`` says otherwise; any other RunConfig field can be given.
    """

    def make(run_dir: Path, **fields) -> RunConfig:
        settings = dict(
            model=GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, use_moe=False),
            data=tiny_corpus,
            optim=OptimConfig(warmup_steps=1),
            trainer=TrainerConfig(
                accelerator="cpu",
                devices=1,
                max_steps=2,
                val_check_interval=2,
                limit_val_batches=1,
                num_sanity_val_steps=0,  # seconds per run that no tiny-run test looks at
                enable_model_summary=False,
            ),
            logger=LoggerConfig(kind="none"),
            run_dir=str(run_dir),
        )
        return RunConfig(**{**settings, **fields})

    return make


@pytest.fixture
def tmpdir_elsewhere(tmp_path, monkeypatch) -> Path:
    """TMPDIR on another filesystem than tmp_path (a tmpfs), where a rename from TMPDIR cannot be atomic."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp_path")
    folder = shm / f"moe-gpt-test-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    yield folder
    shutil.rmtree(folder)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_run_config) -> Path:
    """``last.ckpt`` of the tiny dense GPT-2 after 2 steps of the real Lightning Trainer."""
    from moe_gpt.training.run import train

    run_dir = tmp_path_factory.mktemp("tiny_run")
    train(tiny_run_config(run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_moe_checkpoint(tmp_path_factory, corpus_overrides) -> Path:
    """``last.ckpt`` of the TINY MoE GPT-2 (2 layers, 4 experts) after 2 steps of train.py's run; copy it to modify it."""
    from tests.helpers import TINY, train_in_process

    run_dir = tmp_path_factory.mktemp("tiny_moe_run")
    train_in_process(TINY + corpus_overrides + ["logger=none", "trainer.max_steps=2"], run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def finished_moe_run(tmp_path_factory, corpus_overrides) -> Path:
    """The folder of a finished 3-step TINY MoE run of train.py with a CSV log; copy it to change it."""
    from tests.helpers import TINY, train_main

    run_dir = tmp_path_factory.mktemp("finished_moe") / "run"
    args = TINY + corpus_overrides + ["logger=csv", "trainer.max_steps=3", f"hydra.run.dir={run_dir}"]
    assert train_main(args).returncode == 0
    return run_dir


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory) -> Path:
    """A random ``transformers`` GPT-2 (2 layers, 32 wide, 32 positions, GPT-2's vocabulary) saved with save_pretrained."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257))
    with torch.no_grad():
        # HF starts biases at 0 and LayerNorm gains at 1: random values make any mixed-up weight visible.
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    directory = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def corpus_overrides(tmp_path_factory) -> list[str]:
    """A small local text corpus (a few stdlib modules, copied at test time) and its own cache dir."""
    import json as json_module
    import subprocess
    import textwrap

    root = tmp_path_factory.mktemp("corpus")
    for module in (textwrap, json_module.decoder, json_module.encoder, subprocess):
        (root / f"{Path(module.__file__).stem}.txt").write_text(Path(module.__file__).read_text())
    return [
        "data=text",
        "data.name=e2e",
        f"data.paths=[{root}/*.txt]",
        f"data.cache_dir={root / 'tokens'}",
        f"data.tokenizer_dir={TOKENIZER_DIR}",
        "data.val_fraction=0.3",
    ]


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """Factory: the module behind ``scripts/<name>.py`` (``moe_gpt.cli.<name>``), so its ``main(argv)`` runs in-process."""
    from tests.helpers import cli_module

    return cli_module

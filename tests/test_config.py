"""Config validation and Hydra composition of the real configs/ tree."""

import re
from dataclasses import MISSING, asdict, fields, is_dataclass

import pytest
import yaml
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import OmegaConf

from moe_gpt.compose import compose_run_config
from moe_gpt.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    GPTConfig,
    LoggerConfig,
    MoEConfig,
    OptimConfig,
    RunConfig,
    TrainerConfig,
    config_warnings,
    run_warnings,
)
from tests.helpers import REPO, train_main


@pytest.mark.parametrize(
    "build,key",
    [
        (lambda: MoEConfig(num_experts=0, top_k=1), "model.moe.num_experts"),
        (lambda: MoEConfig(num_experts=4, top_k=5), "model.moe.top_k"),
        (lambda: MoEConfig(num_experts=4, top_k=0), "model.moe.top_k"),
        (lambda: MoEConfig(activation="gelu2"), "model.moe.activation"),
        (lambda: MoEConfig(load_balance="aux"), "model.moe.load_balance"),
        (lambda: MoEConfig(dropout=1.0), "model.moe.dropout"),
        (lambda: MoEConfig(hidden_size=0), "model.moe.hidden_size"),
        (lambda: MoEConfig(every_n_layers=0), "model.moe.every_n_layers"),
        (lambda: MoEConfig(aux_loss_coef=-1), "model.moe.aux_loss_coef"),
        (lambda: GPTConfig(n_embd=100, n_head=3), "model.n_embd"),
        (lambda: GPTConfig(n_layer=0), "model.n_layer"),
        (lambda: GPTConfig(block_size=-4), "model.block_size"),
        (lambda: GPTConfig(dropout=-0.1), "model.dropout"),
        (lambda: GPTConfig(loss_chunk_size=-1), "model.loss_chunk_size"),
        (lambda: DataConfig(corpus="web"), "data.corpus"),
        (lambda: DataConfig(corpus="text"), "data.paths"),
        (lambda: DataConfig(corpus="hub"), "data.hub_path"),
        (lambda: DataConfig(corpus="hub", hub_path="x", streaming=True), "data.max_documents"),
        (lambda: DataConfig(batch_size=0), "data.batch_size"),
        (lambda: DataConfig(encoding_errors="ignore"), "data.encoding_errors"),
        (lambda: OptimConfig(lr=0), "optim.lr"),
        (lambda: OptimConfig(lr=float("inf")), "optim.lr"),
        (lambda: OptimConfig(lr=float("nan")), "optim.lr"),
        (lambda: OptimConfig(beta1=1.5), "optim.beta1"),
        (lambda: OptimConfig(beta2=-0.1), "optim.beta2"),
        (lambda: OptimConfig(eps=0), "optim.eps"),
        (lambda: TrainerConfig(precision="bogus"), "trainer.precision"),
        (lambda: TrainerConfig(devices=0), "trainer.devices"),
        (lambda: TrainerConfig(devices=[]), "trainer.devices"),
        (lambda: TrainerConfig(devices="gpu"), "trainer.devices"),
        (lambda: TrainerConfig(num_nodes=0), "trainer.num_nodes"),
        (lambda: TrainerConfig(num_sanity_val_steps=-2), "trainer.num_sanity_val_steps"),
        (lambda: CheckpointConfig(every_n_steps=0), "checkpoint.every_n_steps"),
        (lambda: RunConfig(seed=-1), "seed"),
        (lambda: RunConfig(seed=2**32), "seed"),
        (lambda: GPTConfig(n_layer=4, use_moe=True, moe=MoEConfig(every_n_layers=5)), "model.moe.every_n_layers"),
        (lambda: TrainerConfig(max_steps=0), "trainer.max_steps"),
        (lambda: LoggerConfig(kind="tensorboard"), "logger.kind"),
        (lambda: LoggerConfig(mode="sometimes"), "logger.mode"),
    ],
)
def test_invalid_value_is_an_error_naming_the_key(build, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        build()
    assert "\n" not in str(error.value)


def test_valid_edge_values_are_kept_as_given():
    assert (MoEConfig(num_experts=1, top_k=1).num_experts, MoEConfig(num_experts=1, top_k=1).top_k) == (1, 1)
    assert MoEConfig(num_experts=4, top_k=4).top_k == 4
    model = GPTConfig(n_embd=96, n_head=3, dropout=0.0)
    assert (model.n_embd, model.n_head, model.dropout) == (96, 3, 0.0)
    assert [TrainerConfig(num_sanity_val_steps=n).num_sanity_val_steps for n in (-1, 0, 2)] == [-1, 0, 2]


def test_warnings_for_top_k_equal_to_experts_and_too_few_tokens_per_expert():
    assert any("top_k=4" in w for w in config_warnings(GPTConfig(use_moe=True, moe=MoEConfig(num_experts=4, top_k=4))))
    # 4 x 32 tokens x top-1 over 8 experts: 16 token-slots each per step; 4 x 64 x 1 / 8 = 32 is enough.
    tiny = ["data.batch_size=4", "model.block_size=32", "model.moe.num_experts=8", "model.moe.top_k=1"]
    assert any(
        "each expert gets 16 token-slots" in w and "raise data.batch_size" in w
        for w in run_warnings(compose_run_config(tiny))
    )
    assert run_warnings(compose_run_config([*tiny, "trainer.accumulate_grad_batches=2"])) == []
    assert any(
        "one expert" in w for w in config_warnings(GPTConfig(use_moe=True, moe=MoEConfig(num_experts=1, top_k=1)))
    )
    assert config_warnings(GPTConfig(n_embd=256, use_moe=True, moe=MoEConfig(num_experts=8, top_k=2))) == []
    assert config_warnings(GPTConfig(use_moe=False, moe=MoEConfig(num_experts=64, top_k=64))) == []


def test_device_settings_lightning_accepts_are_passed_to_it_unchanged():
    for devices in ("auto", 1, 4, "2"):  # on the CPU: a number of processes
        assert TrainerConfig(accelerator="cpu", devices=devices).devices == devices
    for devices in ("auto", -1, 1, 4, "2", "0,1", [0, 1]):  # -1 and device ids: GPUs only
        assert TrainerConfig(accelerator="gpu", devices=devices).devices == devices


def test_warmup_longer_than_training_is_a_warning():
    run = compose_run_config(["trainer.max_steps=10", "optim.warmup_steps=50"])
    assert any(
        "optim.warmup_steps=50 is longer than trainer.max_steps=10" in w and "set optim.warmup_steps=2" in w
        for w in run_warnings(run)
    )
    assert not any("warmup" in w for w in run_warnings(compose_run_config(["trainer.max_steps=100"])))


def test_default_config_is_moe_on_stdlib_cpu_wandb():
    run = compose_run_config([])
    assert run.model.use_moe and run.data.corpus == "stdlib"
    assert run.trainer.accelerator == "cpu" and run.logger.kind == "wandb" and run.logger.mode == "offline"


def test_command_line_selects_experts_top_k_and_activation():
    run = compose_run_config(["model.moe.num_experts=16", "model.moe.top_k=1", "model.moe.activation=swish"])
    assert (run.model.moe.num_experts, run.model.moe.top_k, run.model.moe.activation) == (16, 1, "swish")


def test_dense_and_moe_presets_differ_only_in_use_moe():
    dense, moe = compose_run_config(["model=dense"]), compose_run_config(["model=moe"])
    assert not dense.model.use_moe and moe.model.use_moe
    dense.model.use_moe = True
    assert dense.model == moe.model


def test_size_preset_gpt2_small():
    model = compose_run_config(["model/size=gpt2_small", "model=dense"]).model
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size) == (12, 12, 768, 1024)


@pytest.mark.parametrize("override", ["model.moe.num_expert=4", "trainer.max_step=3", "data.batchsize=2"])
def test_misspelled_key_is_an_error(override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].split(".")[-1]):
        compose_run_config([override])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigCompositionException, match="top_k"):
        compose_run_config(["model.moe.top_k=two"])


def test_invalid_combination_fails_when_the_run_config_is_built():
    with pytest.raises(ConfigError, match="model.moe.top_k=9"):
        compose_run_config(["model.moe.num_experts=4", "model.moe.top_k=9"])


@pytest.mark.parametrize("preset", ["stdlib", "text", "shakespeare", "tinystories", "wikitext103", "fineweb_edu"])
def test_every_data_preset_composes(preset):
    overrides = [f"data={preset}"] + (["data.paths=[x.txt]"] if preset == "text" else [])
    assert compose_run_config(overrides).data.name in (preset, "text")


@pytest.mark.parametrize(
    "group,choice,key,value",
    [
        ("trainer", "gpu", "trainer.accelerator", "gpu"),
        ("trainer", "gpu", "trainer.precision", "bf16-mixed"),
        ("logger", "csv", "logger.kind", "csv"),
        ("logger", "none", "logger.kind", "none"),
    ],
)
def test_every_trainer_and_logger_preset_composes_into_its_settings(group, choice, key, value):
    run = OmegaConf.structured(compose_run_config([f"{group}={choice}"]))
    assert OmegaConf.select(run, key) == value


def test_help_lists_the_main_keys_with_their_real_defaults():
    result = train_main(["--help"])
    assert result.returncode == 0
    assert "Main keys:" in result.stdout and "model.moe.num_experts=8" in result.stdout
    assert all(len(line) <= 100 for line in result.stdout.splitlines())
    defaults = OmegaConf.structured(compose_run_config([]))
    shown = re.findall(r"^  ([a-z_]+\.[a-z_.]+)=(\S+)\s", result.stdout, flags=re.MULTILINE)
    checked = [(key, value) for key, value in shown if not key.startswith("hydra.") and value != "PATH"]
    assert len(checked) >= 10
    for key, value in checked:  # the help must not drift from the defaults it states
        actual = OmegaConf.select(defaults, key, throw_on_missing=True)
        assert str(actual).lower() in (value, "none" if value == "null" else value), key


CONFIGS = REPO / "configs"
# The groups whose options fill RunConfig fields (model/size/ fills model too, through `@package model`).
OPTION_GROUPS = ("model", "trainer", "logger", "data", "checkpoint", "distill")


def schema_defaults(schema: type) -> dict:
    """The dataclass defaults as written in moe_gpt/config.py (before any __post_init__), nested as in YAML."""
    defaults = {}
    for f in fields(schema):
        value = f.default if f.default is not MISSING else f.default_factory()
        defaults[f.name] = schema_defaults(type(value)) if is_dataclass(value) else value
    return defaults


def repeated_defaults(values: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Keys of ``values`` set to their default; a key the schema lacks counts too (Hydra would refuse it)."""
    repeated = []
    for key, value in values.items():
        if key not in defaults:
            repeated.append(f"{prefix}{key} (not in the schema)")
        elif isinstance(value, dict) and isinstance(defaults[key], dict):
            repeated += repeated_defaults(value, defaults[key], f"{prefix}{key}.")
        elif value == defaults[key]:
            repeated.append(f"{prefix}{key}={value!r}")
    return repeated


def test_the_dataclass_defaults_are_the_default_run():
    composed, defaults = asdict(compose_run_config([])), asdict(RunConfig())
    del composed["run_dir"], defaults["run_dir"]  # Hydra sets it to the run's folder
    assert defaults == composed


@pytest.mark.parametrize(
    "path",
    [CONFIGS / "config.yaml"] + sorted(path for group in OPTION_GROUPS for path in (CONFIGS / group).rglob("*.yaml")),
    ids=lambda path: str(path.relative_to(CONFIGS)),
)
def test_no_yaml_option_repeats_a_default(path):
    # The defaults live in moe_gpt/config.py only; an option sets just what it changes, so no value
    # can silently disagree with the dataclass (an option file of comments alone is fine).
    values = yaml.safe_load(path.read_text()) or {}
    if path.name == "config.yaml":  # the primary config: its own keys, not Hydra's or the defaults list
        values = {key: value for key, value in values.items() if key not in ("defaults", "hydra")}
        defaults = schema_defaults(RunConfig)
    else:
        defaults = schema_defaults(RunConfig)[path.relative_to(CONFIGS).parts[0]]
    assert repeated_defaults(values, defaults) == []


KEY_LINE = re.compile(r"^\s*(- )?[^\s#-][^:#]*:(\s|$)")  # `key:`, also `- key: value` in a defaults list
BLOCK_SCALAR = re.compile(r":\s*[|>][-+]?\s*(#.*)?$")  # `key: |-`: the indented lines after it are text


def uncommented_keys(path) -> list[str]:
    """``file:line: text`` of each key line with neither a trailing comment nor a comment line right above."""
    missing, previous, block_indent = [], "", None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if block_indent is not None:
            if not stripped or indent > block_indent:
                continue
            block_indent = None
        if KEY_LINE.match(line):
            if not re.search(r"\s#", line) and not previous.startswith("#"):
                missing.append(f"{path.relative_to(CONFIGS)}:{number}: {stripped}")
            if BLOCK_SCALAR.search(line):
                block_indent = indent
        previous = stripped
    return missing


def test_every_yaml_key_has_a_comment():
    # A trailing comment, or a comment line right above; what each key means is never left to guess.
    paths = sorted(CONFIGS.rglob("*.yaml"))
    assert len(paths) > 20
    assert [line for path in paths for line in uncommented_keys(path)] == []


@pytest.mark.parametrize("group", ["experiment", "hparams_search"])
def test_a_misspelled_preset_is_an_error_not_silently_the_default_run(group):
    with pytest.raises(HydraException, match=f"Could not find '{group}/no_such_preset'"):
        compose_run_config([f"{group}=no_such_preset"])


def test_cfg_job_shows_the_sanity_validation_and_model_summary_settings():
    result = train_main(["--cfg", "job", "trainer.num_sanity_val_steps=0"])
    assert result.returncode == 0
    trainer = yaml.safe_load(result.stdout)["trainer"]
    assert (trainer["num_sanity_val_steps"], trainer["enable_model_summary"]) == (0, True)

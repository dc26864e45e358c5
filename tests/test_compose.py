"""Override strings read by Hydra's grammar: which key each one sets, which wins when two lists meet, and which
keys a composed config may hold."""

import pytest

from moe_gpt.compose import compose_run_config, merge_overrides, override_key
from moe_gpt.config import ConfigError


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.n_layer=6", "model.n_layer"),
        ("+logger.tags=[a,b]", "logger.tags"),
        ("++optim.lr=5e-4", "optim.lr"),
        ("~init_from", "init_from"),
        ("~init_from=/runs/a/best.ckpt", "init_from"),
        ("hydra.run.dir='runs/lr=3e-4'", "hydra.run.dir"),  # a quoted value may hold '='
        ("model.moe.num_experts=4,8", "model.moe.num_experts"),  # a sweep
        ("model/size=mini", "model/size"),
        ("model@extra=dense", "model@extra"),  # a group placed at another package is another key
    ],
)
def test_override_key_is_the_key_hydra_sets(override, key):
    assert override_key(override) == key


def test_later_overrides_win_whatever_their_prefix():
    earlier = ["model=dense", "+logger.tags=[a]", "optim.lr=1e-3", "init_from=/runs/a.ckpt", "hydra.run.dir='x=1'"]
    later = ["++logger.tags=[b]", "optim.lr=5e-4", "~init_from", "hydra.run.dir=y"]
    assert merge_overrides(earlier, later) == ["model=dense", *later]


def test_an_override_hydra_cannot_parse_is_refused_with_how_to_quote_it():
    with pytest.raises(ConfigError, match=r"^the override 'hydra.run.dir=a=b' is not valid Hydra syntax .*key='a=b'$"):
        merge_overrides(["hydra.run.dir=a=b"], ["optim.lr=1"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["++model.moe.num_experts=4"],  # ++ on a key the schema has: just a change
        ["model=dense", "model/size=mini"],
        ["experiment=compare_small"],  # a _global_ preset that sets keys across groups
        ["hparams_search=moe_optuna", "hydra/launcher=slurm"],  # Hydra's settings only
        ["+hydra.job.env_set.MOE_GPT_PROBE=1", "hydra.job.name=probe"],
    ],
)
def test_overrides_of_keys_the_schema_has_and_group_choices_compose(overrides):
    compose_run_config(overrides)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+model.moe.num_expert=4"], "+model.moe.num_expert=4: model.moe has no key num_expert; did you mean model.moe.num_experts?"),
        (["++model.moe.num_expert=4"], "++model.moe.num_expert=4: model.moe has no key num_expert; did you mean model.moe.num_experts?"),
        (["+trainer.max_step=5"], "+trainer.max_step=5: trainer has no key max_step; did you mean trainer.max_steps?"),
        (["+foo=1"], "+foo=1: the config has no key foo; its keys are model, data, optim, trainer, logger, checkpoint"),
        (["model=dense", "+model.moe.extra={a: 1}"], "+model.moe.extra={a: 1}: model.moe has no key extra;"),
    ],
)
def test_a_plus_override_of_a_key_the_schema_lacks_is_refused(overrides, message):
    with pytest.raises(ConfigError) as refused:
        compose_run_config(overrides)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)

"""Override strings read by Hydra's grammar: which key each one sets, and which wins when two lists meet."""

import pytest

from moe_gpt.compose import merge_overrides, override_key
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

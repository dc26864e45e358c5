"""The one list that decides what a resume may change covers every key, and its rules hold."""

import dataclasses

import pytest
import torch

from moe_gpt.config import GPTConfig, MoEConfig
from moe_gpt.model.gpt import GPT
from moe_gpt.training.resume_changes import APPLIED, NOT_COMPARED, REFUSED, WEIGHTS, config_keys


def test_every_config_key_has_exactly_one_rule():
    keys = config_keys()
    ruled = [*REFUSED, *APPLIED, *NOT_COMPARED]
    assert sorted(ruled) == sorted(keys), (
        f"without a rule: {sorted(set(keys) - set(ruled))}; not config keys: {sorted(set(ruled) - set(keys))}"
    )
    assert len(ruled) == len(set(ruled)), "a key has two rules"


# A value other than the default for each model setting a resume applies.
APPLIED_MODEL_VALUES = {
    "model.moe.top_k": 1,
    "model.moe.dropout": 0.2,
    "model.moe.normalize_top_k": False,
    "model.moe.num_groups": 2,
    "model.moe.topk_groups": 1,
    "model.moe.top_p": 0.5,
    "model.moe.min_experts_per_token": 2,
    "model.moe.aux_loss_coef": 0.1,
    "model.moe.z_loss_coef": 0.0,
    "model.moe.bias_update_rate": 0.01,
    "model.moe.capacity_factor": 1.25,
    "model.moe.eval_capacity_factor": 2.0,
    "model.moe.experts_impl": "loop",
    "model.moe.growth_noise": 0.0,
    "model.dropout": 0.1,
    "model.loss_chunk_size": 0,
}


def test_every_model_setting_a_resume_applies_is_listed_here():
    assert sorted(APPLIED_MODEL_VALUES) == sorted(key for key in APPLIED if key.startswith("model."))


def with_setting(key: str, value) -> GPTConfig:
    base = GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, moe=MoEConfig(num_experts=4))
    name = key.rsplit(".", 1)[1]
    if key.startswith("model.moe."):
        return dataclasses.replace(base, moe=dataclasses.replace(base.moe, **{name: value}))
    return dataclasses.replace(base, **{name: value})


def shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    torch.manual_seed(0)
    return {name: tuple(tensor.shape) for name, tensor in GPT(config).state_dict().items()}


@pytest.mark.parametrize("key,value", APPLIED_MODEL_VALUES.items())
def test_a_setting_a_resume_applies_keeps_every_weight_the_checkpoint_holds(key, value):
    assert shapes(with_setting(key, value)) == shapes(with_setting("model.dropout", 0.0))


@pytest.mark.parametrize(
    "key,value", [("model.moe.router", "noisy"), ("model.moe.load_balance", "aux_free"), ("model.moe.num_shared_experts", 1)]
)
def test_the_refused_kinds_change_the_weights_a_checkpoint_holds(key, value):
    assert REFUSED[key] == WEIGHTS
    assert shapes(with_setting(key, value)) != shapes(with_setting("model.dropout", 0.0))

"""The learning-rate schedule the LightningModule gives Lightning: linear warmup to optim.lr, then cosine
decay to optim.min_lr_ratio * optim.lr at trainer.max_steps, held there after it."""

import math

import pytest

from moe_gpt.config import GPTConfig, OptimConfig
from moe_gpt.training.lit_module import GPTLightningModule


def learning_rates(optim: OptimConfig, max_steps: int, steps: list[int]) -> dict[int, list[float]]:
    """Each param group's learning rate at the optimizer steps ``steps``, as Lightning steps the scheduler
    (once after every optimizer step)."""
    module = GPTLightningModule(GPTConfig(), optim, max_steps=max_steps)  # the default mini MoE model
    configured = module.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "step"
    seen = {}
    for step in range(max(steps) + 1):
        if step in steps:
            seen[step] = [group["lr"] for group in optimizer.param_groups]
        optimizer.step()  # no gradients: the weights stay, only the scheduler's bookkeeping moves on
        schedule.step()
    return seen


def test_the_default_schedule_warms_up_decays_and_holds_the_floor():
    # The defaults: lr 1e-3, 50 warmup steps, floor 0.1 * lr, trainer.max_steps 250.
    expected = {
        0: 1e-3 / 50,  # the first step already trains, at lr / warmup_steps
        24: 1e-3 * 25 / 50,
        49: 1e-3,  # warmup's last step reaches the peak
        50: 1e-3,  # the decay starts from the peak
        150: 1e-4 + 0.9e-3 * 0.5,  # half way: the cosine is at its middle
        200: 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.75)),
        250: 1e-4,  # trainer.max_steps: the floor
        400: 1e-4,  # held after max_steps (a resumed run that trains on)
    }
    seen = learning_rates(OptimConfig(), 250, list(expected))
    for step, lr in expected.items():
        assert seen[step] == pytest.approx([lr, lr], rel=1e-9), step  # both groups: decayed and not decayed


@pytest.mark.parametrize(
    "lr,min_lr_ratio,warmup_steps,max_steps",
    [(3e-4, 0.0, 10, 40), (1e-3, 1.0, 5, 20), (2e-3, 0.1, 0, 30)],
    ids=["decay to zero", "no decay", "no warmup"],
)
def test_every_step_follows_warmup_then_cosine_to_the_floor(lr, min_lr_ratio, warmup_steps, max_steps):
    optim = OptimConfig(lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps)
    steps = list(range(max_steps + 10))
    seen = learning_rates(optim, max_steps, steps)
    floor = min_lr_ratio * lr
    for step in steps:
        if step < warmup_steps:
            expected = lr * (step + 1) / warmup_steps
        else:
            progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
            expected = floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        assert seen[step] == pytest.approx([expected, expected], rel=1e-9, abs=1e-15), step
    assert seen[warmup_steps][0] == pytest.approx(lr) and seen[max_steps][0] == pytest.approx(floor, abs=1e-15)


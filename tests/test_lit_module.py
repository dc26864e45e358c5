"""The LightningModule's own arithmetic: validation weighting and the checkpoint guard."""

import pytest
import torch

from moe_gpt.config import GPTConfig, OptimConfig
from moe_gpt.training.lit_module import GPTLightningModule, _refuse_non_finite_weights
from moe_gpt.model.lm_loss import IGNORE_INDEX
from moe_gpt.errors import Diverged


def test_validation_averages_over_the_targets_that_count():
    module = GPTLightningModule(
        GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16, use_moe=False), OptimConfig(), max_steps=10
    ).eval()
    torch.manual_seed(0)
    full = torch.randint(0, 50257, (2, 8)), torch.randint(0, 50257, (2, 8))
    x, y = torch.randint(0, 50257, (2, 8)), torch.randint(0, 50257, (2, 8))
    y[:, 2:] = IGNORE_INDEX  # 4 of 16 targets count
    with torch.no_grad():
        module.validation_step(full, 0)
        module.validation_step((x, y), 1)
        losses = [module.model(*batch).lm_loss for batch in (full, (x, y))]
    expected = (losses[0] * 16 + losses[1] * 4) / 20  # per target token, not per batch element
    torch.testing.assert_close(module.val_loss.compute(), expected)


def test_a_checkpoint_with_a_non_finite_weight_is_refused():
    state = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "step": torch.tensor(5)}
    with pytest.raises(Diverged, match="b holds non-finite values at step 7") as stopped:
        _refuse_non_finite_weights(state, 7)
    assert stopped.value.step == 7
    _refuse_non_finite_weights({"a": torch.ones(3), "step": torch.tensor(5)}, 7)  # finite: saved


def test_the_logged_learning_rates_are_named_after_their_parameter_groups(finished_moe_run):
    header = (finished_moe_run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"lr/with_weight_decay", "lr/without_weight_decay"} <= set(header)
    assert not any("pg1" in column or "lr-AdamW" in column for column in header)

"""The statistics behind compare.py's verdict: paired differences over seeds and their confidence interval."""

import math
import random

import pytest
from scipy.stats import t as student_t

from moe_gpt.compare.verdict import paired_difference, spread, verdict


def noisy(values: list[float], scale: float, seed: int) -> list[float]:
    generator = random.Random(seed)
    return [value + generator.gauss(0.0, scale) for value in values]


def test_a_known_difference_is_detected_and_the_better_variant_named():
    baseline = noisy([4.0] * 5, scale=0.05, seed=0)  # seed-to-seed noise shared by both variants
    candidate = noisy([b - 0.03 for b in baseline], scale=0.005, seed=1)  # 0.03 nats better on every seed
    difference = paired_difference(candidate, baseline)
    assert difference.excludes_zero and difference.high < 0
    assert difference.low < -0.03 < difference.high  # the true difference is inside the interval
    sentence = verdict("moe-8-2", "dense", difference)
    assert (
        sentence.startswith("moe-8-2 beats dense: val loss lower by 0.0")
        and "95% CI" in sentence
        and "5 seeds" in sentence
    )


def test_identical_variants_give_an_interval_containing_zero_and_no_winner():
    baseline = noisy([4.0] * 4, scale=0.05, seed=2)
    candidate = noisy(baseline, scale=0.01, seed=3)  # the same model, a little run-to-run noise
    difference = paired_difference(candidate, baseline)
    assert difference.low < 0 < difference.high
    assert verdict("moe-8-2", "dense", difference).startswith("no difference shown between moe-8-2 and dense")


def test_a_worse_candidate_is_named_as_the_loser():
    difference = paired_difference([4.1, 4.2, 4.15], [4.0, 4.1, 4.05])
    assert verdict("moe-4-1", "dense", difference).startswith("dense beats moe-4-1: val loss lower by 0.1000")


def test_the_interval_is_the_students_t_interval_of_the_differences():
    candidate, baseline = [1.0, 2.0, 4.0], [0.0, 0.0, 0.0]
    difference = paired_difference(candidate, baseline)
    half_width = student_t.ppf(0.975, df=2) * math.sqrt(7 / 3) / math.sqrt(3)  # sample std of 1, 2, 4 is sqrt(7/3)
    assert (difference.mean, difference.n) == (pytest.approx(7 / 3), 3)
    assert difference.low == pytest.approx(7 / 3 - half_width) and difference.high == pytest.approx(7 / 3 + half_width)
    assert student_t.ppf(0.975, df=1) == pytest.approx(12.706, abs=1e-3)  # two seeds give a very wide interval


def test_one_seed_gives_no_interval_and_says_how_to_get_one():
    difference = paired_difference([3.9], [4.0])
    assert difference.low is None and not difference.excludes_zero
    assert "--seeds 3 or more" in verdict("moe-8-2", "dense", difference)
    assert spread([3.9]).std is None and spread([1.0, 3.0]).std == pytest.approx(math.sqrt(2))


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])

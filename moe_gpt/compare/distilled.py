"""How much of the teacher's gain a distilled student keeps: (dense - student) / (dense - teacher), per seed.

For a ``distill:<variant>`` student in a comparison that also trains ``dense`` and the teacher's
variant, each seed gives the share of the teacher's val-loss gain over dense that the student, a
dense model of the same size as ``dense``, keeps at equal tokens (Switch Transformers report about
30% for their distilled dense students); the mean gets a 95% t-interval over the seeds.
"""

from __future__ import annotations

import math
from typing import Any

from moe_gpt.compare.verdict import mean_interval

BASELINE = "dense"


def gain_kept_sentences(rows: list[dict[str, Any]], teachers: dict[str, str]) -> list[str]:
    """One sentence per student whose teacher and ``dense`` are in ``rows`` (``teachers``: student -> teacher)."""
    losses = {(row["variant"], row["seed"]): row["val_loss"] for row in rows if row["status"] == "ok"}
    sentences = []
    for student, teacher in teachers.items():
        seeds = sorted(
            seed for (name, seed) in losses if name == student and (teacher, seed) in losses and (BASELINE, seed) in losses
        )
        shares = [share_kept(losses[BASELINE, s], losses[teacher, s], losses[student, s]) for s in seeds]
        if seeds:
            sentences.append(gain_kept_sentence(student, teacher, shares))
    return sentences


def gain_kept_sentence(student: str, teacher: str, shares: list[float]) -> str:
    """The mean share over the seeds where the teacher beat dense (nan elsewhere: no gain to keep)."""
    kept = [share for share in shares if not math.isnan(share)]
    without_gain = len(shares) - len(kept)
    skipped = f"; {teacher} no better than {BASELINE} in {without_gain} of them" if without_gain else ""
    if not kept:
        return f"{student}: {teacher} is no better than {BASELINE} in any seed, so there is no gain to keep"
    result = mean_interval(kept)
    interval = "one seed, no interval" if result.low is None else f"95% CI {result.low:.0%} to {result.high:.0%}"
    per_seed = ", ".join("n/a" if math.isnan(share) else f"{share:.0%}" for share in shares)
    return (
        f"{student} keeps {result.mean:.0%} of {teacher}'s val-loss gain over {BASELINE} ({interval}, "
        f"{len(shares)} seeds{skipped}; per seed: {per_seed})"
    )


def share_kept(dense: float, teacher: float, student: float) -> float:
    """The student's gain over dense as a share of the teacher's (1: as good as the teacher; 0: no better than
    dense). A teacher no better than dense has no gain to keep: nan."""
    gain = dense - teacher
    return (dense - student) / gain if gain > 0 else float("nan")

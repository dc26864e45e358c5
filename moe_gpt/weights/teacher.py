"""A distillation teacher: a training checkpoint, read safely and frozen, checked against the student first.

``distill.teacher=<ckpt>`` is read like every checkpoint (``weights_only``, stored checksums), and a
teacher that cannot teach this student (another vocabulary, a shorter block size) is refused with one
line before any data is read. The teacher is never saved in the student's checkpoints: they record
its path, size and SHA-256 instead (``TEACHER_RECORD``), and a resume reloads it from its path and
refuses a file that is gone or changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from moe_gpt.config import ConfigError, DistillConfig, GPTConfig
from moe_gpt.model.gpt import GPT
from moe_gpt.model.lm_loss import SoftTargets
from moe_gpt.weights.gather import check_gatherable, checkpoint_usage, gathered_state_dict
from moe_gpt.weights.safe_load import model_from_checkpoint, read_checkpoint

TEACHER_RECORD = "distill"  # student checkpoint key: {"teacher": path, "size": bytes, "sha256": hex digest}


@dataclass
class Teacher:
    model: GPT  # eval mode, every parameter frozen
    path: Path
    fingerprint: dict[str, Any]  # TEACHER_RECORD's value
    alpha: float
    temperature: float
    usage: Optional[Tensor] = None  # token-slots per expert per MoE layer from its checkpoint, if it counted any

    def student_weights(self, student: GPTConfig) -> dict[str, Tensor]:
        """distill.init=experts: a dense student's first weights, gathered from this teacher (gather.py)."""
        return gathered_state_dict(self.model, self.usage, student, f"distill.teacher={self.path}")

    def soft_targets(self, idx: Tensor) -> SoftTargets:
        """The teacher's view of a batch (B, T), for the student's loss; computed without autograd."""
        with torch.no_grad():
            hidden = self.model.final_hidden(idx)  # (B, T, C_teacher)
        return SoftTargets(hidden.flatten(0, 1), self.model.lm_head.weight, self.alpha, self.temperature)


def load_teacher(distill: DistillConfig, student: GPTConfig) -> Optional[Teacher]:
    """``distill.teacher`` read, checked against the student and frozen; None without one."""
    if distill.teacher is None:
        return None
    what = f"distill.teacher={distill.teacher}"
    path = Path(distill.teacher).expanduser()
    try:
        checkpoint = read_checkpoint(path)
        model = model_from_checkpoint(checkpoint, path)
    except ConfigError as error:
        raise ConfigError(f"{what}: {error}") from None
    check_teacher_fits(model.config, student, what)
    if distill.init == "experts":
        check_gatherable(model.config, student, what)
    model.requires_grad_(False)
    for layer in model.moe_layers():  # how the experts run is this machine's choice, as for the student
        layer.experts.impl = student.moe.experts_impl
    usage = checkpoint_usage(checkpoint, model.config.moe.num_experts) if model.config.use_moe else None
    return Teacher(model.eval(), path, fingerprint(path), distill.alpha, distill.temperature, usage)


def check_teacher_fits(teacher: GPTConfig, student: GPTConfig, what: str) -> None:
    """The student learns the teacher's distribution over the same token ids, at positions the teacher knows."""
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(
            f"{what} has model.vocab_size={teacher.vocab_size} but the student has {student.vocab_size}; "
            "distil only between models of the same tokenizer"
        )
    if teacher.block_size < student.block_size:
        raise ConfigError(
            f"{what} was trained on {teacher.block_size}-token windows but the student has model.block_size="
            f"{student.block_size}; set model.block_size={teacher.block_size} or lower"
        )


def fingerprint(path: Path) -> dict[str, Any]:
    """The teacher file's path, size and SHA-256: what a resume checks before it trusts the same path again."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return {"teacher": str(path), "size": path.stat().st_size, "sha256": digest.hexdigest()}


def check_same_teacher(checkpoint: dict[str, Any], teacher: Optional[Teacher], resume: str) -> None:
    """A resumed distillation continues with the very teacher file it started with."""
    saved = checkpoint.get(TEACHER_RECORD)
    if saved is None or teacher is None:
        return  # distill.teacher itself cannot change on resume (resume_changes.py)
    if (saved["size"], saved["sha256"]) != (teacher.fingerprint["size"], teacher.fingerprint["sha256"]):
        raise ConfigError(
            f"resume={resume}: distill.teacher={saved['teacher']} is not the file this run was distilled from (its "
            f"size or SHA-256 changed since); put the original teacher back, or start a new run"
        )

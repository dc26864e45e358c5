"""One training run: the LightningModule, the Trainer and its loggers, callbacks (checkpoints, preemption, expert usage, progress), the run folder, resume."""

"""Counting, optimizer step by optimizer step, what makes a training step wait on the host.

On a GPU the host queues kernels ahead of the device; reading a value back (``.item()``, ``bool(t)``,
``float(t)``, ``.tolist()``, ``.cpu()``), an operator whose output size depends on the data
(``nonzero``, boolean masks, ``unique``) or a blocking collective makes it wait until the device has
caught up, and the device then idles while the host prepares the next kernels.
``torch.cuda.set_sync_debug_mode`` reports these on CUDA only; on the CPU this counter sees them:
scalar reads and data-dependent operators through a ``TorchDispatchMode`` (whatever Python call led
there: ``item``, ``bool``, ``float``, f-strings), the copies to host memory and the collectives by
wrapping the Python functions.

``python -m tests.host_syncs OUT_DIR <train.py overrides>`` trains with the counter and writes
``OUT_DIR/host_syncs_rank<N>.json`` per process; Lightning starts a multi-process run's other
processes by re-running this command line, so each one counts its own.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.distributed
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Operators whose result the host must read: a scalar, or a size that depends on the values.
READING_OPS = {
    aten._local_scalar_dense.default: "scalar read (.item() / bool / float / int)",
    aten.nonzero.default: "nonzero (boolean mask)",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
    aten.unique_dim.default: "unique_dim",
    aten.equal.default: "torch.equal",
}
TENSOR_METHODS = ("tolist", "cpu", "numpy")  # copies to the host that never reach the dispatcher on the CPU
COLLECTIVES = (
    "all_reduce", "broadcast", "barrier", "monitored_barrier", "all_gather", "all_gather_into_tensor",
    "all_gather_object", "broadcast_object_list", "gather", "gather_object", "scatter", "scatter_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv",
)  # fmt: skip
_HERE = str(Path(__file__).resolve())


class HostSyncCounter(L.Callback):
    """Every host read and collective of a fit, by the optimizer step whose batch was running.

    A batch's window runs from its ``on_train_batch_start`` to the next batch's: Lightning's work after
    the batch (its metrics, the progress bar, validation) and before the next one (fetching it, its own
    per-batch broadcast) counts for the step that just ran. ``events[step]`` lists ``what @ file:line``.
    """

    def __init__(self) -> None:
        self.events: dict[int, list[str]] = defaultdict(list)
        self._step: Optional[int] = None
        self._restore: list[tuple[Any, str, Any]] = []
        self._mode: Optional[_ReadingOps] = None
        self._inside = threading.local()  # a wrapped call in progress: its own scalar reads are not counted again

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in TENSOR_METHODS:
            self._wrap(torch.Tensor, name, f"Tensor.{name}()")
        for name in COLLECTIVES:
            self._wrap(torch.distributed, name, f"torch.distributed.{name}")
        self._mode = _ReadingOps(self)
        self._mode.__enter__()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self._step = trainer.global_step + 1  # the optimizer step this batch belongs to

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._uninstall()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._uninstall()

    def record(self, what: str) -> None:
        if self._step is not None and not getattr(self._inside, "depth", 0):
            self.events[self._step].append(f"{what} @ {_caller()}")

    def _wrap(self, owner: Any, name: str, what: str) -> None:
        original = getattr(owner, name)
        if not callable(original):
            return

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.record(what)
            self._inside.depth = getattr(self._inside, "depth", 0) + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._inside.depth -= 1

        self._restore.append((owner, name, original))
        setattr(owner, name, counted)

    def _uninstall(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()
        self._step = None


class _ReadingOps(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Callable, types, args=(), kwargs=None):
        if func in READING_OPS:
            self.counter.record(READING_OPS[func])
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """The innermost frame outside torch and this file: the code that asked for the read."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if path != _HERE and "/site-packages/torch/" not in path:
            parts = path.split("/")
            return f"{'/'.join(parts[-3:])}:{frame.lineno}"
    return "?"


def main(argv: Optional[list[str]] = None) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    from moe_gpt.compose import compose_run_config
    from moe_gpt.training.run import RunRecord, train

    out_dir, *overrides = sys.argv[1:] if argv is None else argv
    counter = HostSyncCounter()
    run_dir = Path(out_dir) / "run"
    train(compose_run_config(overrides, run_dir=str(run_dir)), RunRecord(callbacks=[counter]))
    (Path(out_dir) / f"host_syncs_rank{rank_zero_only.rank}.json").write_text(json.dumps(counter.events, indent=1))


if __name__ == "__main__":
    main()

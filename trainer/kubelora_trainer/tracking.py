"""Experiment trackers fed from the log history: TensorBoard event files and, when configured, MLflow.

Why here and like this: every train/eval record already passes through `metrics.MetricsLog.append`
(rank 0 only), so the trackers hang off that one path instead of the training loop. Each record
becomes scalars named `<kind>/<key>` (train/loss, train/lr, train/grad_norm, train/tokens_per_s,
eval/loss, eval/exact_match) at its optimizer step.

* TensorBoard: `torch.utils.tensorboard.SummaryWriter` (the `tensorboard` package, a trainer
  dependency) writes `<run dir>/tensorboard/events.out.tfevents.*`; point a TensorBoard at the run dir
  (or the PVC holding it). A resumed run opens its writer with `purge_step` = the checkpoint's step + 1,
  so TensorBoard drops the events the killed session wrote past the checkpoint (the same rule as
  `MetricsLog.truncate_after`).
* MLflow (the `mlflow` extra, off unless `tracking.mlflow` is set): one MLflow run per trainer
  session through `MlflowClient`, marked FINISHED or FAILED when the session ends.

A tracker that cannot start (package missing, server unreachable) logs one warning and is switched
off: the training run and its own files never depend on a tracker.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, Protocol

from .config import MlflowConfig, TrackingConfig

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
#: Record keys that become scalars (when present and finite), tagged `<record kind>/<key>`.
SCALAR_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "exact_match")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numeric values of one log record, by tag (`train/loss`, `eval/exact_match`, ...)."""
    kind = record.get("kind") or "train"
    out: dict[str, float] = {}
    for key in SCALAR_KEYS:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return out


class Tracker(Protocol):
    """One destination of the scalars."""

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


class TensorBoardTracker:
    """Event files under `<run dir>/tensorboard/`, opened at the first record (after any resume)."""

    def __init__(self, run_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=purge_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # a few records a minute: flushing each keeps a live TensorBoard current

    def close(self, failed: bool) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per trainer session; metrics keep the optimizer step."""

    def __init__(self, cfg: MlflowConfig, run_dir: Path) -> None:
        # Optional (the `mlflow` extra, not in the trainer images): `Trackers._start` turns it off on ImportError.
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment)
        run = self.client.create_run(experiment_id, run_name=cfg.run_name or run_dir.name)
        self.run_id = run.info.run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class Trackers:
    """The configured trackers of one run dir, started lazily so that a resume can set the purge step first."""

    def __init__(self, cfg: TrackingConfig | None, run_dir: Path) -> None:
        self.cfg = cfg or TrackingConfig()
        self.run_dir = run_dir
        self.purge_step: int | None = None
        self._active: list[Tracker] | None = None

    def resumed_at(self, step: int) -> None:
        """The run continues after `step`: events past it (from the killed session) are dropped."""
        self.purge_step = step + 1

    def _start(self) -> list[Tracker]:
        active: list[Tracker] = []
        if self.cfg.tensorboard:
            try:
                active.append(TensorBoardTracker(self.run_dir, self.purge_step))
            except ImportError as err:
                log.warning("TensorBoard event files are off: %s (install the `tensorboard` package)", err)
        if self.cfg.mlflow is not None:
            try:
                active.append(MlflowTracker(self.cfg.mlflow, self.run_dir))
            except ImportError as err:
                log.warning("MLflow tracking is off: %s (install kubelora[mlflow])", err)
            except Exception as err:  # an unreachable server must not fail the training run
                log.warning("MLflow tracking is off: cannot start a run at %s: %s", self.cfg.mlflow.tracking_uri, err)
        return active

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if not values:
            return
        if self._active is None:
            self._active = self._start()
        step = int(record.get("step") or 0)
        for tracker in list(self._active):
            try:
                tracker.log(step, values)
            except Exception as err:  # e.g. the MLflow server went away mid-run
                log.warning("%s stopped logging: %s", type(tracker).__name__, err)
                self._active.remove(tracker)

    def close(self, failed: bool | None = None) -> None:
        """End every tracker; `failed` defaults to "an exception is propagating" (called from a `finally`)."""
        if failed is None:
            failed = sys.exc_info()[0] is not None
        for tracker in self._active or []:
            try:
                tracker.close(failed)
            except Exception as err:
                log.warning("closing %s: %s", type(tracker).__name__, err)
        self._active = []

"""Atomic, resumable checkpoints.

A checkpoint is a directory `checkpoints/step-000050/` holding the trainable weights
(safetensors), optimizer and scheduler state, and `state.json`. It is written under a
temporary name and renamed into place, with `state.json` written last inside it, so a
process killed at any moment leaves either a complete checkpoint or none.

Each checkpoint records the settings it was trained with (`settings_record`): `resume: auto`
continues only with the same ones, and `SaveCadence` writes one every `saveSteps` steps and every
`saveMinutes` minutes of training.

Why no RNG state is stored: the recipe reseeds every optimizer step from (seed, step, rank),
so dropout and data order after a resume equal those of an uninterrupted run without
having to carry generator state across ranks or world sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import distributed as dist_
from . import jsonsafe

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    path: Path


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_complete(run_dir: Path) -> list[CheckpointRef]:
    """Complete checkpoints, oldest first (a directory without state.json is ignored)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file():
            found.append(CheckpointRef(int(m.group(1)), child))
    return sorted(found, key=lambda c: c.step)


def latest(run_dir: Path) -> CheckpointRef | None:
    done = list_complete(run_dir)
    return done[-1] if done else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int | None,
) -> Path:
    """Write a checkpoint atomically and prune old ones down to `keep`."""
    return write(run_dir, step, trainable_state(model), optimizer.state_dict(), scheduler.state_dict(), state, keep)


def write(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    state: dict[str, Any],
    keep: int | None,
) -> Path:
    """`save` from tensors already in hand: a DeepSpeed run gathers them from all ranks first."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=root))
    try:
        save_file(weights, str(tmp / WEIGHTS_FILE))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        _write_json_atomic(tmp / STATE_FILE, {"step": step, **state})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(root)
    if keep is not None:
        for old in list_complete(run_dir)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    return final


def load(ref: CheckpointRef, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
    """Restore weights, optimizer and scheduler in place; return the saved state dict."""
    weights, optimizer_state = read(ref)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"checkpoint {ref.path} does not match the model: missing {missing[:3]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(optimizer_state)
    return load_scheduler(ref, scheduler)


def read(ref: CheckpointRef) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable weights by name and the optimizer state_dict of a checkpoint (CPU tensors)."""
    weights = load_file(str(ref.path / WEIGHTS_FILE))
    optimizer_state = torch.load(ref.path / "optimizer.pt", map_location="cpu", weights_only=True)
    return weights, optimizer_state


def load_scheduler(ref: CheckpointRef, scheduler: Any) -> dict:
    """Restore the LR scheduler; return the checkpoint's state.json."""
    scheduler.load_state_dict(torch.load(ref.path / "scheduler.pt", map_location="cpu", weights_only=True))
    return json.loads((ref.path / STATE_FILE).read_text())


def read_state(ref: CheckpointRef) -> dict[str, Any]:
    """A checkpoint's state.json, read before any weights are loaded (to refuse a resume early)."""
    return dict(json.loads((ref.path / STATE_FILE).read_text()))


# ---------------------------------------------------------------------- the settings a checkpoint belongs to
def settings_record(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint stores about its settings: each one flat (`training.learningRate`) and a sha256.

    `fields` are the result-defining settings by section (`rundir.result_fields`). The flat values,
    not only the hash, are kept so that a refusal can name what changed and from what.
    """
    flat = {f"{section}.{key}": value for section, values in fields.items() for key, value in values.items()}
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"sha256": digest, "fields": flat}


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{field: (this run's value, the checkpoint's value)}` for every setting that differs.

    Only fields both records know are compared: one a later trainer added has no value in an
    older checkpoint, and refusing every resume across an upgrade would be wrong.
    """
    if saved.get("sha256") == current["sha256"]:
        return {}
    old, new = saved.get("fields") or {}, current["fields"]
    return {k: (new[k], old[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """`training.learningRate 1e-05 != 0.0005 in checkpoint; lora.alpha 32 != 16 in checkpoint`."""
    return "; ".join(f"{k} {json.dumps(now)} != {json.dumps(then)} in checkpoint" for k, (now, then) in changes.items())


# ---------------------------------------------------------------------- when to write one
@dataclass(frozen=True)
class StepDecision:
    """What every rank does after an optimizer step: write a checkpoint, then stop (SIGTERM)."""

    save: bool
    stop: bool


class SaveCadence:
    """When to checkpoint: every `save_steps` steps, every `save_minutes` minutes, at the end, on SIGTERM.

    Why minutes as well as steps: a step takes milliseconds on a tiny model and minutes on a large
    one, so no default step count bounds the work an OOM kill or node loss throws away; a time
    cadence does. Steps are the same on every rank, clocks are not (ranks drift by up to a step),
    and a checkpoint is a collective act (a barrier, ZeRO gathers): so only rank 0's clock counts,
    and `decide` shares it with the SIGTERM flag in one all-reduce per step.
    """

    def __init__(self, save_steps: int | None, save_minutes: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.save_steps = save_steps
        self.interval_s = save_minutes * 60.0 if save_minutes else None
        self.clock = clock
        self.since = clock()

    def due_by_time(self) -> bool:
        """This process's clock says a checkpoint is due (only rank 0's answer is used)."""
        return self.interval_s is not None and self.clock() - self.since >= self.interval_s

    def decide(self, step: int, last: bool, stop_requested: bool, world: dist_.WorldView,
               device: torch.device) -> StepDecision:
        """The same decision on every rank: stop if any rank got SIGTERM, save by steps, rank 0's clock,
        at the last step or before stopping."""
        stop, timed = dist_.any_rank([stop_requested, world.is_main and self.due_by_time()], world, device)
        by_steps = self.save_steps is not None and step % self.save_steps == 0
        return StepDecision(save=by_steps or timed or last or stop, stop=stop)

    def saved(self) -> None:
        """A checkpoint was written: the time cadence counts from now."""
        self.since = self.clock()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write aside, fsync, rename; NaN/Infinity become null (`jsonsafe`: the file stays valid JSON)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(jsonsafe.dumps(data, indent=2))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Public helper: other modules publish summary/baseline files the same way."""
    _write_json_atomic(path, data)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

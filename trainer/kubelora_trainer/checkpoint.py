"""Atomic, resumable checkpoints.

A checkpoint is a directory `checkpoints/step-000050/` holding the trainable weights
(safetensors), optimizer and scheduler state, and `state.json`. It is written under a
temporary name and renamed into place, with `state.json` written last inside it, so a
process killed at any moment leaves either a complete checkpoint or none.

Why no RNG state is stored: the recipe reseeds every optimizer step from (seed, step, rank),
so dropout and data order after a resume equal those of an uninterrupted run without
having to carry generator state across ranks or world sizes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=2)
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

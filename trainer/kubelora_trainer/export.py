"""Publish the run's results: adapter, merged model, loss plot, samples and summary.

Every published directory is written under a temporary name and renamed into place, so a
reader (or the S3 uploader) never sees half an adapter. `summary.json` is written last:
its presence is what marks a run as finished.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import segment_attention
from .checkpoint import write_json_atomic
from .evaluate import GenerationResult

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
SUMMARY_FILE = "summary.json"
INIT_ADAPTER_DIR = "initial_adapter"  # no dots: peft uses the folder name as an adapter name


def is_finished(run_dir: Path) -> bool:
    """A run is finished when its summary exists (written after the adapter was published)."""
    return (run_dir / SUMMARY_FILE).is_file() and (run_dir / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def _publish_dir(build: Path, final: Path) -> None:
    """Replace `final` with the fully written `build` directory in one rename."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(build, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_initial_adapter(peft_model: Any, run_dir: Path) -> Path:
    """Keep the untrained adapter of olora/pissa runs: those inits move weight out of the base
    model, and peft needs the initial adapter to turn the trained one back into a plain LoRA
    that applies to the *original* base weights."""
    target = run_dir / INIT_ADAPTER_DIR
    if (target / "adapter_model.safetensors").is_file():
        return target
    build = Path(tempfile.mkdtemp(prefix=".init.", dir=run_dir))
    config = peft_model.peft_config["default"]
    saved_init = config.init_lora_weights
    config.init_lora_weights = True  # what a reader of the initial adapter should assume
    try:
        peft_model.save_pretrained(str(build), safe_serialization=True)
    finally:
        config.init_lora_weights = saved_init
    _publish_dir(build, target)
    return target


def save_adapter(peft_model: Any, run_dir: Path, tokenizer: Any, initial_adapter: Path | None) -> Path:
    """Write `adapter/` in PEFT format (adapter_config.json + adapter_model.safetensors)."""
    build = Path(tempfile.mkdtemp(prefix=".adapter.", dir=run_dir))
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if initial_adapter is not None:
        kwargs["path_initial_model_for_weight_conversion"] = str(initial_adapter)
    peft_model.save_pretrained(str(build), **kwargs)
    tokenizer.save_pretrained(str(build))
    final = run_dir / ADAPTER_DIR
    _publish_dir(build, final)
    return final


def save_merged(peft_model: Any, run_dir: Path, tokenizer: Any) -> Path:
    """Fold the adapter into the base weights and save a standalone model (no peft needed to load).

    Must run last: merge_and_unload changes the model in place.
    """
    build = Path(tempfile.mkdtemp(prefix=".merged.", dir=run_dir))
    merged = peft_model.merge_and_unload()
    segment_attention.disable(merged)  # the saved config must name an attention anyone can load
    merged.config.use_cache = True
    merged.save_pretrained(str(build), safe_serialization=True)
    tokenizer.save_pretrained(str(build))
    final = run_dir / MERGED_DIR
    _publish_dir(build, final)
    return final


def plot_loss(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Train and eval loss against step, as a PNG (matplotlib's headless backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
    evals = [(r["step"], r["loss"]) for r in history if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_samples(
    path: Path, before: Sequence[GenerationResult] | None, after: Sequence[GenerationResult], limit: int
) -> None:
    """Markdown of base vs fine-tuned completions for the first held-out prompts."""
    lines = ["# Sample generations (held-out prompts)", ""]
    for i, res in enumerate(after[:limit]):
        lines += [f"## Sample {i + 1}", "", "Prompt:", "", "```", res.prompt.rstrip(), "```", ""]
        if res.answer is not None:
            lines += [f"Expected: `{res.answer}`", ""]
        if before is not None and i < len(before):
            lines += [f"Base model: `{before[i].generated.strip()}`", ""]
        lines += [f"Fine-tuned: `{res.generated.strip()}`", ""]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write summary.json (last: it marks the run finished). A figure that is not a number (eval
    loss over no rows) is written as null: NaN is not JSON, and the operator, jq and dashboards must
    be able to read the file."""
    path = run_dir / SUMMARY_FILE
    write_json_atomic(path, summary)
    return path

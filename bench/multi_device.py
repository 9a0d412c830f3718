#!/usr/bin/env python3
"""Multi-device benchmark: the trainer CLI on 1 device and on N devices (DDP, ZeRO-3, FSDP2), one invocation.

Why a separate script from ``trainer_throughput.py``: the question here is not "how fast against the
Hugging Face recipes" but "does an N-device job train the same model as a 1-device job with N times
the rows, and how close to N times as fast" — on device-only backends (nccl here, xccl on Intel GPUs),
where every collective must run on the device's tensors. So every contender is the real
``kubelora-train run`` (``torchrun`` for N > 1), on one random-init model and one dataset, with the same
global batch; the script compares loss curves step by step and reports steady tokens/s and the peak
device memory each rank's summary recorded.

Usage (on a machine with N GPUs; the model is built here, random weights, the shape of Llama-3.2-1B)::

    python bench/multi_device.py --tokenizer DIR --devices 2 --steps 30 --rows 16 --seq 1024 \
        --contenders single,single-share,ddp,zero3,fsdp --out bench/results/multi-device.json

``--tokenizer`` is a saved Hugging Face tokenizer directory (any; the bundled SmolLM2's works).
The throughput figure is the steady rate over the steps after ``--skip`` (first steps warm up kernels).
The sharded contenders (zero3, fsdp) also get their throughput and rank 0's peak device memory as
ratios to the ddp contender of the same invocation (the targets of issue 10 are stated that way).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B's shape (random init): the measurement setup.
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    # SmolLM2-135M's shape: small enough for a smoke run on CPU.
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152},
}


def build_model(tokenizer_dir: Path, shape: str, out: Path) -> Path:
    """A random-init Llama of `shape` saved with the tokenizer: throughput and loss-curve equality only."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dims = dict(SHAPES[shape])
    dims["vocab_size"] = max(dims["vocab_size"], len(tok))
    config = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, torch_dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def build_data(path: Path, n: int, words: int, seed: int) -> Path:
    """Instruction records whose response is `words` pseudo-random words: about one full row each."""
    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in ("ka", "lo", "mi", "su", "te", "ra", "no", "vi") for b in
             ("n", "s", "t", "r", "l", "m", "x", "p")]
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(json.dumps({"instruction": f"Continue sequence {i}.", "input": "", "output": text}) + "\n")
    return path


#: Contender -> the trainer's `distributed` settings that select its engine.
ENGINES: dict[str, dict[str, Any]] = {"ddp": {}, "zero3": {"deepspeedStage": 3}, "fsdp": {"fsdp": True}}


def config(model: Path, data: Path, run_dir: Path, args: argparse.Namespace, per_rank_rows: int,
           engine: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"nameOrPath": str(model), "dtype": "bf16"},
        "data": {"path": str(data), "cutoffLen": args.seq, "packing": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": "all-linear"},
        "training": {"maxSteps": args.steps, "microBatchSize": per_rank_rows, "learningRate": 1e-4,
                     "warmupSteps": 2, "loggingSteps": 1, "seed": 7, "saveSteps": 10_000,
                     "evalSteps": None},
        "evaluation": {"before": False, "exactMatch": False},
        "distributed": dict(engine),
        "output": {"dir": str(run_dir), "plot": False},
        "device": args.device,
    }


def run_one(name: str, nproc: int, engine: dict[str, Any], model: Path, data: Path, work: Path,
            args: argparse.Namespace, rows: int) -> dict[str, Any]:
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config(model, data, run_dir, args, rows // nproc, engine)))
    if nproc == 1:
        cmd = [sys.executable, "-m", "kubelora_trainer.cli", "run", str(cfg_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "kubelora_trainer.cli", "run", str(cfg_path)]
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    result: dict[str, Any] = {"name": name, "nproc": nproc, "engine": engine, "rc": done.returncode,
                              "wall_s": round(time.monotonic() - t0, 1)}
    if done.returncode != 0:
        result["stderr_tail"] = done.stderr[-3000:]
        return result
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    summary = json.loads((run_dir / "summary.json").read_text())
    steady = [r for r in train if r["step"] > args.skip]
    tokens = sum(r["tokens"] for r in steady)
    span = steady[-1]["elapsed_s"] - train[args.skip - 1]["elapsed_s"] if args.skip else steady[-1]["elapsed_s"]
    result.update(losses=[r["loss"] for r in train], steady_tokens_per_s=round(tokens / span, 1),
                  peak_device_memory_gib=round((summary.get("peak_device_memory_bytes") or 0) / 2**30, 2),
                  model_device_memory_gib=round((summary.get("model_device_memory_bytes") or 0) / 2**30, 2),
                  backend=summary.get("backend"), world_size=summary.get("world_size"))
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="steps left out of the steady rate")
    p.add_argument("--rows", type=int, default=16, help="global rows per optimizer step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--contenders", default="single,ddp,zero3")
    p.add_argument("--work", type=Path, default=Path("/tmp/kubelora-multi-device"))
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / f"model-{args.shape}"
    if not (model / "config.json").is_file():
        build_model(args.tokenizer, args.shape, model)
    data = build_data(args.work / "data.jsonl", n=args.rows * (args.steps + 2), words=args.seq // 2 - 30, seed=1)
    # `single-share`: one device with one rank's share of the rows, the ideal per-device rate of the
    # N-device runs (their scaling efficiency is tokens/s / (N x this)); its loss curve is not comparable.
    plan = {"single": (1, {}, args.rows), "single-share": (1, {}, args.rows // args.devices),
            **{name: (args.devices, engine, args.rows) for name, engine in ENGINES.items()}}
    results = []
    for name in args.contenders.split(","):
        nproc, engine, rows = plan[name]
        r = run_one(name, nproc, engine, model, data, args.work, args, rows)
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
        results.append(r)
    ref = next((r for r in results if r["name"] == "single" and r["rc"] == 0), None)
    share = next((r for r in results if r["name"] == "single-share" and r["rc"] == 0), None)
    ddp = next((r for r in results if r["name"] == "ddp" and r["rc"] == 0), None)
    for r in results:
        if ddp is not None and r["rc"] == 0 and r["name"] in ("zero3", "fsdp"):
            r["throughput_vs_ddp"] = round(r["steady_tokens_per_s"] / ddp["steady_tokens_per_s"], 3)
            if ddp["peak_device_memory_gib"]:
                r["peak_memory_vs_ddp"] = round(r["peak_device_memory_gib"] / ddp["peak_device_memory_gib"], 3)
            if ddp["model_device_memory_gib"]:  # the loaded model (base share + adapter) before any activation
                r["model_memory_vs_ddp"] = round(r["model_device_memory_gib"] / ddp["model_device_memory_gib"], 3)
        if share is not None and r["rc"] == 0 and r["name"] in ENGINES:
            r["scaling_efficiency"] = round(r["steady_tokens_per_s"] / (args.devices * share["steady_tokens_per_s"]), 3)
        if ref is not None and r is not ref and r is not share and r["rc"] == 0:
            diffs = [abs(a - b) for a, b in zip(ref["losses"], r["losses"], strict=True)]
            r["max_abs_loss_diff_vs_single"] = max(diffs)
            r["speedup_vs_single"] = round(r["steady_tokens_per_s"] / ref["steady_tokens_per_s"], 3)
    meta = {"shape": args.shape, "seq": args.seq, "global_rows": args.rows, "steps": args.steps,
            "devices": args.devices, "device": args.device, "date": time.strftime("%Y-%m-%d"),
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE",)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    for r in results:
        print(r["name"], r["rc"], r.get("steady_tokens_per_s"), r.get("peak_device_memory_gib"),
              r.get("model_device_memory_gib"), r.get("speedup_vs_single"), r.get("scaling_efficiency"),
              r.get("max_abs_loss_diff_vs_single"), r.get("throughput_vs_ddp"), r.get("peak_memory_vs_ddp"),
              r.get("model_memory_vs_ddp"))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

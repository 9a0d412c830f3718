"""Probe: does transformers' Trainer drive DeepSpeed ZeRO-3 with a peft LoRA model on CPU (gloo)?

Issue 5 asked to find out (kubelora itself calls ``deepspeed.initialize`` from its own recipe, see
docs/deepspeed.md). Three optimizer steps of SmolLM2-135M + LoRA r 8 all-linear, micro-batch 1, rows of
at most 64 tokens, ZeRO-3 with every batch key left to the Trainer (``auto``), then ``save_model``.
Not a test and not a benchmark: it prints one ``PROBE_RESULT`` line and the saved adapter's files.

    DS_BUILD_OPS=0 torchrun --nproc-per-node 2 bench/hf_trainer_deepspeed_probe.py            # fp32
    PROBE_DTYPE=bf16 torchrun --nproc-per-node 2 bench/hf_trainer_deepspeed_probe.py          # bf16
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "trainer"))
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from kubelora_trainer.config import parse_config, resolve_relative_paths  # noqa: E402
from kubelora_trainer.data import build_datasets  # noqa: E402
from kubelora_trainer.lora import attach_lora  # noqa: E402
from kubelora_trainer.model import load_tokenizer, materialize  # noqa: E402
from trainer_throughput import pad_collator  # noqa: E402  (bench/, beside this script)
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

OUT = Path(os.environ.get("PROBE_OUT", Path(tempfile.gettempdir()) / "hf-trainer-deepspeed-probe"))

dtype = os.environ.get("PROBE_DTYPE", "fp32")
cfg = resolve_relative_paths(
    parse_config(
        {
            "model": {"nameOrPath": "smollm2-135m", "dtype": dtype},
            "data": {"path": "sample://train.jsonl", "cutoffLen": 64, "packing": False, "maxSamples": 64},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": "all-linear"},
            "output": {"dir": str(OUT), "overwrite": True},
            "device": "cpu",
        }
    ),
    REPO,
)
source = materialize(cfg.model)
tok = load_tokenizer(source, cfg.model)
data = build_datasets(cfg.data, tok, 7)
rows = data.train_rows
pad = int(tok.pad_token_id)


collate = pad_collator(pad)  # the benchmark's per-batch padding (labels -100 on padding)

ds = Dataset.from_dict({"input_ids": [list(r.input_ids) for r in rows], "labels": [list(r.labels) for r in rows]})
model = AutoModelForCausalLM.from_pretrained(
    source.location, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32
)
model = attach_lora(model, cfg.lora, 7)
ds_cfg = {
    "zero_optimization": {"stage": 3},
    "bf16": {"enabled": dtype == "bf16"},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
}
args = TrainingArguments(
    output_dir=str(OUT),
    max_steps=3,
    per_device_train_batch_size=1,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    deepspeed=ds_cfg,
    bf16=dtype == "bf16",
    use_cpu=True,
    remove_unused_columns=False,
    learning_rate=1e-3,
    disable_tqdm=True,
)
t0 = time.time()
tr = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate)
tr.train()
losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
if int(os.environ.get("RANK", "0")) == 0:
    print(
        "PROBE_RESULT",
        json.dumps(
            {
                "dtype": dtype,
                "losses": losses,
                "wall_s": round(time.time() - t0, 1),
                "engine": type(tr.model_wrapped).__name__,
            }
        ),
    )
tr.save_model(str(OUT / "adapter"))
if int(os.environ.get("RANK", "0")) == 0:
    print("saved", sorted(os.listdir(OUT / "adapter")))

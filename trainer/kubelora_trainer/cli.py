"""`kubelora-train`: run, eval, merge and generate from the command line.

Why the error handling looks like this: users (and the operator, which reads the pod's
termination message) need one specific line and an exit class (`contract`: 2 bad input, 143
preempted, 1 anything else) for every failure, never only a traceback; unexpected failures still
print their traceback after recording their line. Under the pods' launcher wrapper
(`kubelora_trainer.launch`) each process records its exit for the wrapper instead of writing the
termination message itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import contract, jsonsafe, sources
from .config import ConfigError, load_config
from .contract import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED, EXIT_RETRYABLE

TERMINATION_LOG = contract.termination_log_path()


def _fail(message: str, code: int) -> int:
    line = contract.one_line(message)
    print(f"kubelora-train: error: {line}", file=sys.stderr)
    contract.record_exit(code, line, TERMINATION_LOG)
    return code


def success_message(summary: dict, gauges: dict[str, float] | None = None) -> str:
    """The termination message of a finished run (`contract.success_message`; URI only when not a pod path),
    with the final values of the metrics gauges (ProgressState keys)."""
    adapter = summary.get("adapter") or {}
    metrics = {contract.METRIC_PREFIX + key: value for key, value in (gauges or {}).items()}
    return contract.success_message(
        summary.get("artifact_uri"), adapter.get("sha256"), adapter.get("size_bytes"), metrics
    )


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Error classes that mean "your input is wrong" (imported lazily: they pull in torch)."""
    from .artifacts import ArtifactError
    from .data import DataError
    from .device import DeviceError
    from .distributed import DistributedError
    from .lora import LoraTargetError
    from .model import ModelError
    from .recipe import RunDirError, TrainingDiverged

    return (ConfigError, ArtifactError, DataError, ModelError, LoraTargetError, RunDirError, DeviceError, DistributedError,
            TrainingDiverged)


def cmd_run(args: argparse.Namespace) -> int:
    from .metrics import ProgressState, serve_metrics
    from .recipe import LoRAFineTuneRecipe

    cfg = sources.localize(load_config(args.config, args.set))  # s3:// model/data: fetched once, cached
    progress = ProgressState()
    port = os.environ.get(contract.METRICS_PORT_ENV)
    recipe = LoRAFineTuneRecipe(cfg, progress)
    if port and recipe.world.is_main:
        serve_metrics(progress, int(port))
    try:
        summary = recipe.run()
    except BaseException:
        progress.update(phase=4)
        raise
    finally:
        recipe.close()
    if summary:
        contract.record_exit(EXIT_OK, success_message(summary, progress.snapshot()), TERMINATION_LOG)
        keys = ("device", "dtype", "steps", "train_tokens_per_s", "eval_loss_before", "eval_loss_after",
                "exact_match_before", "exact_match_after", "wall_s")
        print(jsonsafe.dumps({k: summary.get(k) for k in keys}, indent=2))
        print(f"run dir: {cfg.output.dir}")
    return 0


def _load_for_inference(base_cfg_path: str | None, adapter: str, overrides: list[str]):  # noqa: ANN202
    """Base model (from the run's config.yaml) with the adapter applied, in eval mode."""
    from .device import resolve_dtype, select_device
    from .model import load_lora_model, load_tokenizer, materialize

    run_dir = Path(adapter).parent
    cfg_path = base_cfg_path or str(run_dir / "config.yaml")
    cfg = load_config(cfg_path, overrides)
    device = select_device(cfg.device)
    source = materialize(cfg.model)
    tok = load_tokenizer(source, cfg.model)
    dtype, _ = resolve_dtype(cfg.model.dtype, device)
    cfg.model.dtype = dtype  # type: ignore[assignment]  # resolved: later code sees bf16/fp32
    model = load_lora_model(source, cfg.model, device, dtype, adapter=adapter).to(device.torch_device).eval()
    return cfg, device, tok, model


def _autocast_for(dtype: str, device_type: str):  # noqa: ANN202
    """bf16 autocast for a bf16 base (as in training), nothing otherwise."""
    import contextlib

    import torch

    if dtype == "bf16":
        return lambda: torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def cmd_generate(args: argparse.Namespace) -> int:
    from .data import encode_prompt, prompt_only
    from .evaluate import generate

    cfg, device, tok, model = _load_for_inference(args.config, args.adapter, args.set)
    record = {"instruction": args.instruction, "input": args.input or ""}
    prompt = prompt_only(record, cfg.data, tok)
    ids = [encode_prompt(prompt, tok, cfg.data)]

    autocast = _autocast_for(cfg.model.dtype, device.type)

    out = generate(model, ids, int(tok.pad_token_id), tok.eos_token_id, args.max_new_tokens,
                   device.torch_device, autocast)
    print(tok.decode(out[0], skip_special_tokens=True).strip())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import build_datasets, collate, encode_prompt
    from .distributed import WorldView
    from .evaluate import GenerationResult, eval_loss, exact_match, generate
    from .loss import CausalLMLoss

    cfg, device, tok, model = _load_for_inference(args.config, args.adapter, args.set)
    data = build_datasets(cfg.data, tok, cfg.training.seed)

    autocast = _autocast_for(cfg.model.dtype, device.type)

    pad = int(tok.pad_token_id)
    bs = cfg.training.micro_batch_size
    batches = [collate(data.eval_rows[i : i + bs], pad) for i in range(0, len(data.eval_rows), bs)]
    loss = eval_loss(CausalLMLoss(model), batches, device.torch_device, autocast, WorldView())
    prompts = data.eval_prompts[: cfg.evaluation.max_exact_match_samples]
    gen = generate(model, [encode_prompt(p, tok, data.cfg) for p, _ in prompts], pad, tok.eos_token_id,
                   cfg.evaluation.max_new_tokens, device.torch_device, autocast)
    texts = tok.batch_decode(gen, skip_special_tokens=True)
    em = exact_match([GenerationResult(p, a, g) for (p, a), g in zip(prompts, texts, strict=True)])
    print(jsonsafe.dumps({"eval_loss": loss, "exact_match": em, "samples": len(prompts)}, indent=2))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .export import save_merged

    # Always onto an unquantized base: folding a QLoRA adapter into 4-bit weights would lose the
    # adapter's precision and give a model that only bitsandbytes can load.
    sets = ["model.quantization=none", *args.set]
    _, _, tok, model = _load_for_inference(args.config, args.adapter, sets)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    merged = save_merged(model, out, tok)
    print(f"merged model: {merged}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Fetch s3:// sources into the cache and check local ones (the operator's `<name>-fetch` pod)."""
    s3 = sources.S3Source(endpoint=args.endpoint, region=args.region, verify_tls=not args.no_verify_tls)
    fetched = sources.fetch_all(args.sources, args.cache, s3)
    for f in fetched:
        print(jsonsafe.dumps(dataclasses.asdict(f)))
    contract.record_exit(EXIT_OK, sources.success_message(fetched), TERMINATION_LOG)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubelora-train", description="LoRA fine-tuning of causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="fine-tune with a YAML config")
    run.add_argument("config", help="YAML config file (see examples/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set training.maxSteps=20 (repeatable)")
    run.set_defaults(func=cmd_run)

    def adapter_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("adapter", help="adapter directory (a run's adapter/)")
        p.add_argument("--config", help="run config (default: config.yaml next to the adapter)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")

    ev = sub.add_parser("eval", help="held-out loss and exact match of an adapter")
    adapter_args(ev)
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="answer one instruction with an adapter")
    adapter_args(gen)
    gen.add_argument("--instruction", required=True)
    gen.add_argument("--input", default="")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.set_defaults(func=cmd_generate)

    merge = sub.add_parser("merge", help="fold an adapter into its base model")
    adapter_args(merge)
    merge.add_argument("--output", required=True, help="directory that receives merged/")
    merge.set_defaults(func=cmd_merge)
    fetch = sub.add_parser("fetch", help="fetch s3:// model/data sources into a cache once; check local ones")
    fetch.add_argument("sources", nargs="+", metavar="SOURCE", help="s3://bucket/key, hf://org/name[@revision], or a local path")
    fetch.add_argument("--cache", required=True, help="cache root (one verified directory per s3:// source)")
    fetch.add_argument("--endpoint", help="S3-compatible endpoint URL (default: AWS S3)")
    fetch.add_argument("--region", help="bucket region")
    fetch.add_argument("--no-verify-tls", action="store_true", help="do not verify the endpoint's certificate")
    fetch.set_defaults(func=cmd_fetch)
    return parser


def _quiet_libraries() -> None:
    """Keep the run log about the run: no per-tensor loading bars or library deprecation notices."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    warnings.filterwarnings("ignore", message=r".*OLoRA changes the base weights.*")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="kubelora: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    try:
        return int(args.func(args))
    except ConfigError as err:
        return _fail(str(err), EXIT_BAD_INPUT)
    except Exception as err:
        from .artifacts import ArtifactUnavailable
        from .recipe import Preempted

        if isinstance(err, Preempted):
            return _fail(str(err), EXIT_PREEMPTED)
        if isinstance(err, ArtifactUnavailable | sources.SourceUnavailable):  # the store's fault, not the input's: worth a restart
            return _fail(str(err), EXIT_RETRYABLE)
        if isinstance(err, _bad_input_errors()):
            return _fail(str(err), EXIT_BAD_INPUT)
        contract.record_exit(EXIT_RETRYABLE, contract.one_line(f"{type(err).__name__}: {err}"), TERMINATION_LOG)
        raise


if __name__ == "__main__":
    sys.exit(main())

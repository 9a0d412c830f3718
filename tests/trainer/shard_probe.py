"""One rank of test_fsdp_memory's check: what a rank holds after the recipe's setup and at its peak in a step.

Run as `python shard_probe.py CONFIG OUT_DIR` with the torchrun env (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); writes OUT_DIR/rank-<RANK>.json. The recipe builds everything (model, engine),
then one optimizer step runs its micro-batches through the engine while hooks on every decoder layer
and the head record the parameter elements this rank stores (shards plus any gathered full copies;
`fsdp.held_summary` / `zero.held_summary`), before and after each forward and after each backward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def main() -> None:
    from kubelora_trainer import fsdp, zero
    from kubelora_trainer.config import load_config
    from kubelora_trainer.recipe import LoRAFineTuneRecipe

    config, out = sys.argv[1], Path(sys.argv[2])
    recipe = LoRAFineTuneRecipe(load_config(config))
    recipe.setup()
    model = recipe.model
    held = fsdp.held_summary if recipe.cfg.distributed.fsdp else zero.held_summary
    after_setup, total = held(model)
    samples: list[int] = []

    def record(*_: Any) -> None:
        samples.append(held(model)[0])

    base = model.get_base_model()
    for module in [*base.get_decoder().layers, base.get_output_embeddings()]:
        module.register_forward_pre_hook(record)
        module.register_forward_hook(record)
        module.register_full_backward_hook(record)
    batches = list(recipe.micro_batches(recipe.rows_for_step(0)))
    for i, batch in enumerate(batches):
        with recipe.engine.no_sync(i == len(batches) - 1), recipe.rt.autocast():
            loss, count = recipe.engine.module(**batch)
        recipe.engine.backward(loss / max(1, int(count)))
    recipe.engine.step()
    rank = recipe.world.rank
    (out / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "total": total, "after_setup": after_setup, "peak": max(samples), "samples": len(samples)}))


if __name__ == "__main__":
    main()

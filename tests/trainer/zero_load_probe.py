"""One rank of test_deepspeed's loading check: the recipe's own model loading, then what this rank holds.

Run as `python zero_load_probe.py CONFIG OUT_DIR` with the torchrun env (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); writes OUT_DIR/rank-<RANK>.json. Only the steps up to and including
`setup_model` run: the question is what a rank holds before `deepspeed.initialize`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from kubelora_trainer.config import load_config
    from kubelora_trainer.recipe import LoRAFineTuneRecipe
    from torch import nn

    config, out = sys.argv[1], Path(sys.argv[2])
    recipe = LoRAFineTuneRecipe(load_config(config))
    recipe.setup(through_model=True)
    base = recipe.model.get_base_model()
    linears = []
    for name, module in base.named_modules():
        if type(module) is nn.Linear and "lora_" not in name:
            w = module.weight
            linears.append({"name": name, "full": int(getattr(w, "ds_numel", w.numel())),
                            "shard": int(w.ds_tensor.numel()) if hasattr(w, "ds_tensor") else None,
                            "resident": int(w.data.numel())})
    rank = recipe.world.rank
    (out / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "linears": linears}))


if __name__ == "__main__":
    main()

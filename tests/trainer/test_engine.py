"""The plain engine (one process; DDP wraps the same calls) steps, clips and accumulates like the loop it replaced."""

from __future__ import annotations

import torch
from kubelora_trainer.distributed import WorldView
from kubelora_trainer.engine import PlainEngine


def test_plain_engine_clips_steps_and_reports_the_pre_clip_norm() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    engine = PlainEngine(layer, layer, opt, max_grad_norm=0.5, world=WorldView(), device_index=None)
    assert engine.module is layer and not engine.sharded and engine.zero_stage == 0
    before = layer.weight.detach().clone()
    with engine.no_sync(last_micro_batch=False):  # a single process has nothing to defer
        engine.backward(layer(torch.ones(2, 4)).pow(2).sum() * 10)
    grads = torch.cat([p.grad.flatten() for p in layer.parameters()])  # type: ignore[union-attr]
    norm = engine.step()
    assert abs(norm - float(grads.norm())) < 1e-4 and norm > 0.5
    step = torch.cat([(before - layer.weight.detach()).flatten()])
    assert step.abs().max() > 0  # the optimizer stepped with the clipped gradient
    assert abs(float(torch.cat([p.grad.flatten() for p in layer.parameters()]).norm()) - 0.5) < 1e-4  # type: ignore[union-attr]

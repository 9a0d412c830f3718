"""The plain engine (one process; DDP wraps the same calls) steps, clips and accumulates like the loop it replaced."""

from __future__ import annotations

import torch
from kubelora_trainer.distributed import WorldView
from kubelora_trainer.engine import PlainEngine
from kubelora_trainer.recipe import fused_adamw


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
    # a tensor, read (a wait for the device) only when the step is logged
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0
    assert abs(float(norm) - float(grads.norm())) < 1e-4 and float(norm) > 0.5
    step = torch.cat([(before - layer.weight.detach()).flatten()])
    assert step.abs().max() > 0  # the optimizer stepped with the clipped gradient
    assert abs(float(torch.cat([p.grad.flatten() for p in layer.parameters()]).norm()) - 0.5) < 1e-4  # type: ignore[union-attr]


def test_fused_adamw_is_chosen_where_torch_has_the_kernel_and_updates_like_the_per_tensor_one() -> None:
    """torch >= 2.4 has a fused AdamW for CPU (and cuda, xpu): the recipe uses it for LoRA's many small
    tensors; it must update exactly like the per-tensor loop it replaces (fp32 rounding)."""
    shapes = [(8, 32), (48, 8), (8, 48)]

    def train(fused: bool | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, foreach=False if fused is None else None,
                                fused=fused)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return torch.cat([p.detach().flatten() for p in params])

    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    assert fused_adamw(params)
    assert not fused_adamw([torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)])
    assert not fused_adamw([])
    assert torch.allclose(train(True), train(None), atol=1e-6, rtol=0)

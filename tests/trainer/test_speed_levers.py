"""Speed levers (`training.lossChunk`, `training.compileLayers`, `training.deviceGraphs`) compute what the plain path computes.

They exist only for speed (docs/benchmarks.md says where they pay): loss and gradients must match the
plain path within float tolerance, alone and in a whole training run.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kubelora_trainer import compile as compile_
from kubelora_trainer import fused_lora
from kubelora_trainer.config import ConfigError, LoraSettings, parse_config
from kubelora_trainer.data import collate, pack
from kubelora_trainer.data.tokenize import TokenizedExample
from kubelora_trainer.lora import attach_lora
from kubelora_trainer.loss import CausalLMLoss, chunked_head_loss
from kubelora_trainer.recipe import LoRAFineTuneRecipe
from kubelora_trainer.rundir import COMPILE_CACHE_DIR

from .conftest import tiny_config


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_head_loss_is_cross_entropy_of_the_full_projection(autocast: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen).to(torch.bfloat16 if autocast else torch.float32)
    targets = torch.randint(0, 50, (37,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    ref.backward()
    ref_grad, hidden.grad = hidden.grad, None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = chunked_head_loss(hidden, weight, targets, chunk=8)  # 8 does not divide 37: a short last slice
    (3 * out).backward()
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=1e-6)
    assert hidden.grad is not None and ref_grad is not None
    tol = {"atol": 1e-2, "rtol": 1e-2} if autocast else {"atol": 1e-5}  # bf16: within its rounding
    assert torch.allclose(hidden.grad / 3, ref_grad, **tol)


def _batch() -> dict[str, torch.Tensor]:
    examples = [TokenizedExample(input_ids=[(7 * i + k) % 400 + 5 for k in range(n)], labels=[-100] * 3 + list(
        range(5, 5 + n - 3))) for i, n in enumerate([20, 14, 31, 9, 17])]
    return collate(pack(examples, max_len=40), pad_token_id=0)


def _model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = attach_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0), seed=3)
    with torch.no_grad():  # B starts at zero: give it values so the LoRA path shows in the gradients
        gen = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _loss_and_grads(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    loss_sum, _ = module(**batch)
    loss_sum.backward()
    return float(loss_sum.detach()), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same(a: tuple[float, dict[str, torch.Tensor]], b: tuple[float, dict[str, torch.Tensor]]) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    assert a[1].keys() == b[1].keys() and a[1]
    for name, grad in a[1].items():
        assert torch.allclose(grad, b[1][name], atol=1e-5, rtol=1e-4), name


def test_loss_chunk_and_compiled_layers_give_the_plain_loss_and_gradients(tiny_model_dir: Path) -> None:
    batch = _batch()
    model = _model(tiny_model_dir)
    plain = _loss_and_grads(CausalLMLoss(model), batch)
    chunked = CausalLMLoss(model, chunk=16)
    assert chunked.chunk == 16
    _assert_same(_loss_and_grads(chunked, batch), plain)
    # aot_eager traces and runs the layer through autograd as inductor does, without a C compiler.
    assert compile_.compile_layers(model, backend="aot_eager") == len(compile_.decoder_layers(model))
    try:
        _assert_same(_loss_and_grads(CausalLMLoss(model), batch), plain)
        compiled_head = CausalLMLoss(model, head_backend="aot_eager")
        assert compiled_head._compiled_head is not None
        _assert_same(_loss_and_grads(compiled_head, batch), plain)
    finally:
        compile_.uncompiled(model)


def test_fused_lora_is_a_plain_sum_in_compiled_layers_with_the_plain_gradients(tiny_model_dir: Path) -> None:
    # Traced, the in-place addmm_ would become a copy plus an out-of-place addmm (a full-size pass
    # each); the traced form is mm + add, which inductor folds into the next fused kernel.
    batch = _batch()
    model = _model(tiny_model_dir)
    plain = _loss_and_grads(CausalLMLoss(model), batch)  # peft's forward
    assert fused_lora.enable(model) > 0
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: object) -> object:
        graphs.append(gm)
        return gm.forward  # runs the traced forward eagerly; autograd as usual

    compile_.compile_layers(model, backend=capture)  # type: ignore[arg-type]
    try:
        _assert_same(_loss_and_grads(CausalLMLoss(model), batch), plain)
        ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
        assert graphs and any("mm" in op for op in ops)
        assert not [op for op in ops if "addmm" in op]
    finally:
        compile_.uncompiled(model)
        fused_lora.disable(model)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_folded_lora_gives_peft_loss_and_gradients(tiny_model_dir: Path, backend: str | None) -> None:
    # `foldLora`: the rank-r product computed inside the base GEMM (K = in + r), eager and traced.
    batch = _batch()
    model = _model(tiny_model_dir)
    plain = _loss_and_grads(CausalLMLoss(model), batch)  # peft's forward
    fused_lora.enable(model, fold=True)
    folded = [m for m in model.modules() if getattr(m, "_kubelora_fold", False)]
    narrow = [m for m in model.modules() if hasattr(m, "_kubelora_fold") and not m._kubelora_fold]
    assert folded and narrow  # gate/up fold; q/k/v/o/down (out < 2 in) keep the sum
    calls = 0
    real = fused_lora._FoldedLowRank.apply

    def counting(*args: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return real(*args)

    fused_lora._FoldedLowRank.apply = counting  # type: ignore[method-assign]
    if backend:
        compile_.compile_layers(model, backend=backend)
    try:
        _assert_same(_loss_and_grads(CausalLMLoss(model), batch), plain)
        assert calls >= len(folded) or backend  # traced: counted while tracing only
    finally:
        fused_lora._FoldedLowRank.apply = real  # type: ignore[method-assign]
        compile_.uncompiled(model)
        fused_lora.disable(model)
    assert not any(hasattr(m, "_kubelora_fold") for m in model.modules())


def test_folded_lora_under_bf16_autocast_keeps_fp32_adapter_grads() -> None:
    from kubelora_trainer.fused_lora import _FoldedLowRank

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 16, generator=gen, requires_grad=True)
    weight = torch.randn(32, 16, generator=gen).to(torch.bfloat16)
    a = (torch.randn(4, 16, generator=gen) * 0.3).requires_grad_()
    b = (torch.randn(32, 4, generator=gen) * 0.3).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x, weight) + F.linear(F.linear(x, a), b) * 2.0
    ref.float().square().sum().backward()
    want = [t.grad.clone() for t in (x, a, b)]  # type: ignore[union-attr]
    for t in (x, a, b):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _FoldedLowRank.apply(x, weight, None, a, b, 2.0)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for got, exp in zip((x.grad, a.grad, b.grad), want, strict=True):
        assert got is not None and got.dtype == exp.dtype
        assert torch.allclose(got, exp, rtol=3e-2, atol=3e-2 * exp.abs().max().item())


def test_device_graphs_compile_the_layers_in_reduce_overhead_mode(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="deviceGraphs records compiled regions: set training.compileLayers"):
        parse_config(tiny_config(tiny_model_dir, tmp_path / "no", training={"deviceGraphs": True}))
    modes: list[str | None] = []

    def compile_layers(model: torch.nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
        modes.append(mode)
        return compile_.compile_layers(model, backend="aot_eager", mode=None)  # cpu: no device graphs to record

    monkeypatch.setattr("kubelora_trainer.recipe.compile_layers", compile_layers)
    monkeypatch.setattr("kubelora_trainer.recipe.CausalLMLoss", lambda model, chunk=None, head_backend=None:
                        CausalLMLoss(model, chunk=chunk, head_backend=head_backend and "aot_eager"))
    cfg = tiny_config(tiny_model_dir, tmp_path / "dg", training={"maxSteps": 2, "compileLayers": True,
                                                                  "deviceGraphs": True})
    LoRAFineTuneRecipe(parse_config(cfg)).run()
    assert modes == ["reduce-overhead"]


def test_loss_chunk_steps_aside_for_a_trainable_head(tiny_model_dir: Path) -> None:
    model = _model(tiny_model_dir)
    model.get_base_model().get_output_embeddings().weight.requires_grad_(True)
    assert CausalLMLoss(model, chunk=16).chunk is None


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["kind"] == "train"]


def test_a_run_with_loss_chunk_trains_the_plain_runs_loss_curve(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = {"maxSteps": 3, "paddingFree": False}
    LoRAFineTuneRecipe(parse_config(tiny_config(tiny_model_dir, tmp_path / "plain", training=common))).run()
    fast = LoRAFineTuneRecipe(parse_config(tiny_config(
        tiny_model_dir, tmp_path / "fast", training={**common, "lossChunk": 32})))
    fast.run()
    assert isinstance(fast.loss_module, CausalLMLoss) and fast.loss_module.chunk == 32
    assert _losses(tmp_path / "fast") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-4)


def test_a_run_with_folded_lora_trains_the_unfolded_runs_loss_curve(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = {"maxSteps": 4, "paddingFree": False}
    LoRAFineTuneRecipe(parse_config(tiny_config(
        tiny_model_dir, tmp_path / "sum", training={**common, "foldLora": False}))).run()
    folded = LoRAFineTuneRecipe(parse_config(tiny_config(tiny_model_dir, tmp_path / "fold", training=common)))
    assert folded.cfg.training.fold_lora  # the default
    folded.run()
    assert any(getattr(m, "_kubelora_fold", False) for m in folded.model.modules())
    assert _losses(tmp_path / "fold") == pytest.approx(_losses(tmp_path / "sum"), rel=1e-4)


def test_evaluation_and_generation_run_the_compiled_layers_eagerly(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Held-out batches and token-by-token generation have shapes training never has: compiling them
    # costs a compile per shape (a minute each on a CPU) for a few forward passes.
    compiled_with_grad: list[bool] = []  # grad mode of every graph compiled: False = an evaluation shape

    def backend(gm: torch.fx.GraphModule, example_inputs: object) -> object:
        compiled_with_grad.append(torch.is_grad_enabled())
        return gm.forward

    monkeypatch.setattr("kubelora_trainer.recipe.compile_layers", lambda model, mode=None:
                        compile_.compile_layers(model, backend=backend, mode=mode))  # type: ignore[arg-type]
    monkeypatch.setattr("kubelora_trainer.recipe.CausalLMLoss", lambda model, chunk=None, head_backend=None:
                        CausalLMLoss(model, chunk=chunk, head_backend=head_backend and backend))
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", training={"maxSteps": 2, "compileLayers": True, "evalSteps": 1},
                      evaluation={"before": True, "exactMatch": True})
    summary = LoRAFineTuneRecipe(parse_config(cfg)).run()
    assert summary["exact_match_after"] is not None
    assert compiled_with_grad and all(compiled_with_grad)


def test_compiled_code_is_cached_in_the_run_dir_where_a_resumed_attempt_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default cache is under /tmp, a new emptyDir in every pod: each attempt compiled from scratch.
    from torch._inductor.runtime.runtime_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    cache_dir()  # inductor sets the variable to its default at first use (the ISA check does, early)
    folder = compile_.cache_in_run_dir(tmp_path / "run", rank=1)
    assert folder == (tmp_path / "run" / COMPILE_CACHE_DIR / "rank-1").resolve()
    assert not folder.exists()  # nothing is written before something compiles
    torch._dynamo.reset()
    f = torch.compile(lambda x: (x * 2).sin() + 1, backend="inductor")
    assert torch.allclose(f(torch.arange(8.0)), (torch.arange(8.0) * 2).sin() + 1)
    assert any(p.suffix == ".py" for p in folder.rglob("*")), "inductor wrote its generated code elsewhere"
    assert compile_.cache_in_run_dir(tmp_path / "next", rank=0) is not None  # a later run moves its own setting
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_.cache_in_run_dir(tmp_path / "run", rank=0) is None  # a cache dir the user set stands


def test_an_unset_compile_layers_compiles_long_bf16_runs_where_inductor_can_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Measured: 1.5-2.2x steady steps in bf16, paid back after 75-210 steps; never measured in fp32
    # or beside the sharded engines, and without a toolchain the first step would fail.
    monkeypatch.setattr(compile_, "missing_toolchain", lambda device_type: None)
    choose = functools.partial(compile_.choose_compile_layers, device_type="cpu", dtype="bf16", excluded_by=None)
    steps = compile_.AUTO_MIN_STEPS
    assert choose(None, planned_steps=steps)[0]
    assert choose(None, planned_steps=steps, device_type="xpu")[0]
    assert not choose(None, planned_steps=steps - 1)[0]
    assert not choose(None, planned_steps=10 * steps, dtype="fp32")[0]
    assert not choose(None, planned_steps=10 * steps, device_type="mps")[0]
    assert choose(None, planned_steps=10 * steps, excluded_by="distributed.fsdp") == (
        False, "not by default with distributed.fsdp")
    assert choose(True, planned_steps=1, dtype="fp32") == (True, "training.compileLayers is true")
    assert choose(False, planned_steps=10 * steps) == (False, "training.compileLayers is false")
    monkeypatch.setattr(compile_, "missing_toolchain", lambda device_type: "no C++ compiler (g++)")
    assert choose(None, planned_steps=10 * steps) == (False, "no C++ compiler (g++)")


def test_missing_toolchain_names_what_inductor_would_lack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CXX", "kubelora-no-such-c++")
    assert compile_.missing_toolchain("cpu") == "no C++ compiler (kubelora-no-such-c++) for inductor's CPU kernels"
    monkeypatch.setattr(compile_.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(compile_.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert compile_.missing_toolchain("cpu") == f"no Python headers ({tmp_path / 'Python.h'}) for inductor's CPU kernels"
    (tmp_path / "Python.h").write_text("")
    assert compile_.missing_toolchain("cpu") is None
    monkeypatch.setitem(sys.modules, "triton", None)  # import fails
    assert compile_.missing_toolchain("cuda") == "no Triton for inductor's GPU kernels"


@pytest.mark.parametrize(("max_steps", "compiled"), [(compile_.AUTO_MIN_STEPS, True), (compile_.AUTO_MIN_STEPS - 1, False)])
def test_the_recipe_compiles_by_the_run_length_when_compile_layers_is_unset(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_steps: int, compiled: bool
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(compile_, "missing_toolchain", lambda device_type: None)
    monkeypatch.setattr("kubelora_trainer.recipe.compile_layers", lambda model, mode=None: calls.append(1) or 2)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # the run leaves the process's alone
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", model={"dtype": "bf16"}, training={"maxSteps": max_steps})
    recipe = LoRAFineTuneRecipe(parse_config(cfg))
    recipe.setup()
    try:
        assert recipe.compiled_layers is compiled and bool(calls) is compiled
        assert (recipe.loss_module._compiled_head is not None) is compiled  # the head cross-entropy too
    finally:
        recipe.close()

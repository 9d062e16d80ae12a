"""The LLM-scale library inside the pipeline (issue 21): random-init decoders through
lib/sources, `lora.target_modules: all-linear`, `train.optimizer`, the chunked loss in the loop
and in scoring, gradient checkpointing (and its offloaded form) for decoders, per-layer compile,
resume after a kill with each optimizer, and tiny-llama through the real stages."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import ROOT, run_recipe, tiny_overrides
from stages.lib.checkpoint import Checkpoint
from stages.lib.distributed import Processes
from stages.lib.loop import NullLive, TrainingLoop
from stages.lib.params import OPTIMIZERS, Lora, Quant, Task, Train
from stages.lib.quantized import compile_for_training
from stages.lib.sources import resolve_model_source
from stages.lib.tasks import Objective
from stages.lib.training_model import build_model

TINY_LLAMA = ROOT / "configs/tiny-llama"
CAUSAL = Task(type="causal-lm", metric="loss", mlm_probability=0.15)
FP32_NF4 = Quant(type="nf4", double_quant=True, compute_dtype="fp32", cache_dequantized=False)
ALL_LINEAR = Lora(r=4, alpha=8, dropout=0.0, target_modules="all-linear", modules_to_save=[])
CFG = Train(seed=0, epochs=1, lr=1e-2, batch_size=4, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0,
            max_steps=6, eval_every_steps=0, log_every_steps=1, checkpoint_every_steps=0, group_by_length=False,
            gradient_checkpointing=False, checkpoint_every_n_layers=1, base_dropout=False, compile=False, processes=1, device="auto",
            gradient_accumulation_steps=1, optimizer="adamw")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_llama_base() -> Path:
    directory, origin = resolve_model_source(f"random-init:{TINY_LLAMA}", "main")
    assert origin["kind"] == "random-init"
    return directory


def decoder(base: Path, cfg: Train = CFG, lora: Lora = ALL_LINEAR) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(base, [], FP32_NF4, lora, cfg, "causal-lm", CPU, torch.float32)


def blocks(count: int, length: int = 16, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4096, (count, length), generator=generator).tolist()


DATA = {"train": (blocks(24), None), "validation": (blocks(4, seed=1), None)}


def train(base: Path, cfg: Train, checkpoint: Checkpoint | None = None, stop_after: int = 0) -> dict[str, torch.Tensor]:
    """The loop on DATA; `stop_after` > 0 raises after that many steps, as a kill would end it."""
    model = decoder(base, cfg)
    loop = TrainingLoop(model, DATA, 0, 0, cfg, Objective(CAUSAL), NullLive(), CPU, torch.float32, checkpoint,
                        Processes())
    if stop_after:
        step = loop.step

        def step_then_die(batch: list[int]) -> None:
            if loop.progress.step == stop_after:
                raise KeyboardInterrupt("killed")
            step(batch)
        loop.step = step_then_die
    loop.run()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- random-init through lib/sources ----------------------------------------------------------

def test_random_init_decoder_is_a_complete_bf16_causal_lm(tiny_llama_base: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    dtypes, names = set(), set()
    for shard in tiny_llama_base.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"} and "lm_head.weight" in names  # untied head written too
    _, info = AutoModelForCausalLM.from_pretrained(tiny_llama_base, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    again, _ = resolve_model_source(f"random-init:{TINY_LLAMA}", "main")
    assert again == tiny_llama_base  # built once, then reused


def test_random_init_of_the_8b_never_builds_an_fp32_model(monkeypatch, tmp_path: Path) -> None:
    """random-init: goes through write_random_init (meta device, bf16 per parameter, on the GPU
    when there is one; its memory bound is tested in test_llm_random_init.py), not through
    from_config, which would allocate the model in fp32 on the host."""
    import stages.lib.random_init as random_init

    calls = []
    monkeypatch.setattr(random_init, "write_random_init", lambda *a, **k: calls.append((a, k)) or tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    resolve_model_source(f"random-init:{ROOT / 'configs/llama-3.1-8b'}", "main")
    (args, kwargs), = calls
    assert kwargs["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


# --- params reaching the model and the loop -----------------------------------------------------

def test_all_linear_targets_every_linear_layer_but_the_head(tiny_llama_base: Path) -> None:
    model = decoder(tiny_llama_base)
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)


def test_chunked_loss_in_training_and_scoring_equals_the_model_loss(tiny_llama_base: Path) -> None:
    from stages.lib.tasks import language_model_scores

    model = decoder(tiny_llama_base).eval()
    objective = Objective(CAUSAL)
    tokens = objective.examples(blocks(6), None, 0, CPU)
    batch = tokens.batch(range(6))
    with torch.no_grad():
        plain = model(**batch).loss
        chunked = objective.loss_module(model)(**batch).loss
        scores = language_model_scores(model, tokens, 4, CPU, torch.float32)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert scores["loss"] == pytest.approx(plain.item(), rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))


@pytest.mark.parametrize("checkpointing, every", [(True, 1), ("offload", 1), (True, 2), ("offload", 2)])
def test_gradient_checkpointing_trains_a_decoder_to_the_same_weights(tiny_llama_base: Path, checkpointing,
                                                                     every: int) -> None:
    plain = train(tiny_llama_base, dataclasses.replace(CFG, max_steps=3))
    recomputed = train(tiny_llama_base, dataclasses.replace(CFG, max_steps=3, gradient_checkpointing=checkpointing,
                                                            checkpoint_every_n_layers=every))
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [True, "offload"])
def test_checkpoint_every_n_layers_leaves_the_others_unrecomputed(tiny_llama_base: Path, checkpointing) -> None:
    from transformers.modeling_layers import GradientCheckpointingLayer

    for every, expected in ((1, [True, True]), (2, [True, False]), (5, [True, False])):
        cfg = dataclasses.replace(CFG, gradient_checkpointing=checkpointing, checkpoint_every_n_layers=every)
        layers = [m for m in decoder(tiny_llama_base, cfg).modules() if isinstance(m, GradientCheckpointingLayer)]
        assert [layer.gradient_checkpointing for layer in layers] == expected, every
    layers = [m for m in decoder(tiny_llama_base, dataclasses.replace(CFG, checkpoint_every_n_layers=2)).modules()
              if isinstance(m, GradientCheckpointingLayer)]
    assert not any(layer.gradient_checkpointing for layer in layers)  # no checkpointing asked: n changes nothing


@pytest.mark.parametrize("task", ["causal-lm", "sft"])
def test_compile_is_per_decoder_layer_for_decoders(tiny_llama_base: Path, task: str) -> None:
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = decoder(tiny_llama_base)
    assert compile_for_training(model, task) is model  # in place: the chunked loss reaches the head
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == 2 and all(m._compiled_call_impl is not None for m in layers)
    assert isinstance(compile_for_training(torch.nn.Linear(2, 2), "classification"), torch._dynamo.eval_frame.OptimizedModule)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_after_a_kill_ends_where_an_uninterrupted_run_ends(tiny_llama_base: Path, tmp_path: Path,
                                                                   optimizer: str) -> None:
    cfg = dataclasses.replace(CFG, optimizer=optimizer, checkpoint_every_steps=2)
    whole = train(tiny_llama_base, cfg)
    checkpoint = Checkpoint(tmp_path / "checkpoint", "stamp")
    with pytest.raises(KeyboardInterrupt):
        train(tiny_llama_base, cfg, checkpoint, stop_after=3)  # checkpoint at step 2, killed in step 4
    assert json.loads((tmp_path / "checkpoint" / "progress.json").read_text())["step"] == 2
    resumed = train(tiny_llama_base, cfg, checkpoint)
    moved = train(tiny_llama_base, dataclasses.replace(cfg, max_steps=1))
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name
    assert any(not torch.equal(moved[name], whole[name]) for name in whole)  # the steps after resume count


# --- tiny-llama through the real stages ---------------------------------------------------------

def test_tiny_llama_runs_the_causal_lm_recipe_with_the_llm_settings(tmp_path: Path, corpora, decoder_configs,
                                                                   tiny_model_dir) -> None:
    overrides = [o for o in tiny_overrides("causal-lm", corpora, decoder_configs, tiny_model_dir)
                 if not o.startswith("model.name_or_path=")]
    run = run_recipe(tmp_path, [*overrides, f"model.name_or_path=random-init:{TINY_LLAMA}",
                                "lora.target_modules=all-linear", "lora.modules_to_save=[]",
                                "train.optimizer=paged_adamw_8bit", "train.gradient_checkpointing=offload"])
    train_metrics = json.loads((run.metrics / "train" / "metrics.json").read_text())
    test_metrics = json.loads((run.metrics / "evaluate" / "metrics.json").read_text())
    assert math.isfinite(test_metrics["loss"]) and test_metrics["perplexity"] > 1
    # r 8 on the seven projections of 2 layers (hidden 64, intermediate 128, 4 KV heads of 16)
    per_layer = sum(8 * (i + o) for i, o in ((64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)))
    assert train_metrics["trainable_params"] == 2 * per_layer
    config = json.loads((run.root / "models/adapter/adapter_config.json").read_text())
    assert {n.rsplit(".", 1)[-1] for n in config["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}


def test_offloaded_checkpointing_with_compiled_layers_trains_to_the_same_weights(tiny_llama_base: Path) -> None:
    """The offloaded checkpoint calls each compiled layer: once without gradients in the forward
    pass, once with them in the backward pass; the weights are those of the eager run."""
    cfg = dataclasses.replace(CFG, max_steps=2, gradient_checkpointing="offload")
    eager = train(tiny_llama_base, cfg)
    compiled = train(tiny_llama_base, dataclasses.replace(cfg, compile=True))
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5)

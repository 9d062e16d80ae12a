"""stages/lib/random_init.py: seeded bf16 shards of an architecture, without an fp32 model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stages.lib.random_init import INDEX_FILE, build_quantized_random, meta_model, write_random_init, _config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs/tiny-llama"
LLAMA_8B = ROOT / "configs/llama-3.1-8b"
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype=torch.bfloat16)


def _shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


def _cpu_layout(model: torch.nn.Module) -> torch.nn.Module:
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):  # one CPU layout for both (see model.keep_cpu_layout)
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_init(TINY, tmp_path_factory.mktemp("ri") / "tiny", seed=0, device="cpu", layers_per_shard=1)


def test_shipped_configs_are_the_real_architectures() -> None:
    for name, layers, hidden, params in (("llama-3.1-8b", 32, 4096, 8.030e9), ("llama-3.3-70b", 80, 8192, 70.55e9)):
        config = _config(ROOT / "configs" / name)
        assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (layers, hidden, 128256)
        assert config.num_key_value_heads == 8 and not config.tie_word_embeddings
        model = meta_model(config)  # shapes only: no memory, so the 70B counts in a test too
        assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-3)
    tiny = _config(TINY)
    assert (tiny.num_hidden_layers, tiny.hidden_size, tiny.vocab_size) == (2, 64, 4096)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(TINY)) == tiny.vocab_size


def test_tiny_model_loads_in_bf16_and_4bit(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    index = json.loads((tiny_dir / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == 4  # embeddings, 2 layers, norm + head
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    weights = dict(model.named_parameters())
    assert set(weights) == set(index["weight_map"])
    q = weights["model.layers.1.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.002
    assert torch.equal(weights["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    quantized = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16,
                                                     quantization_config=BitsAndBytesConfig(**NF4))
    from bitsandbytes.nn import Linear4bit

    assert isinstance(quantized.model.layers[0].mlp.down_proj, Linear4bit)
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, four = model(ids).logits.float(), _cpu_layout(quantized)(ids).logits.float()
    # NF4 rounds each weight by up to ~10%: the same function, not the same numbers
    assert torch.isfinite(four).all()
    assert torch.nn.functional.cosine_similarity(full.flatten(), four.flatten(), dim=0) > 0.95


def test_same_seed_same_bytes_any_shard_layout(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_random_init(TINY, tmp_path / "again", seed=0, device="cpu", layers_per_shard=1)
    assert _shard_bytes(again) == _shard_bytes(tiny_dir)
    from safetensors.torch import load_file

    def tensors(directory: Path) -> dict[str, torch.Tensor]:
        return {k: v for p in directory.glob("*.safetensors") for k, v in load_file(p).items()}

    two_per_shard = write_random_init(TINY, tmp_path / "two", seed=0, device="cpu", layers_per_shard=2)
    a, b = tensors(tiny_dir), tensors(two_per_shard)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = tensors(write_random_init(TINY, tmp_path / "other", seed=1, device="cpu", layers_per_shard=1))
    assert not torch.equal(other["lm_head.weight"], a["lm_head.weight"])


def test_existing_output_is_reused(tiny_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()}
    write_random_init(TINY, tiny_dir, seed=0, device="cpu", layers_per_shard=1)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()} == before


def test_8b_width_never_holds_the_model_in_memory(tmp_path: Path) -> None:
    """One decoder layer of the 8B architecture with its full 128,256-token embedding and head:
    2.37 GiB in bf16, 4.7 GiB in fp32. Writing it may hold one shard (the 0.98 GiB head) at a
    time, never the model."""
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from stages.lib.random_init import write_random_init
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        write_random_init({str(LLAMA_8B)!r}, {str(tmp_path / "m")!r}, seed=0, device="cpu",
                          layers_per_shard=1, num_layers=1)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_gib = float(done.stdout.strip().splitlines()[-1])
    written = sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors")) / 2**30
    assert written == pytest.approx(2.37, abs=0.01)
    assert peak_gib < 1.5, f"peak RSS grew by {peak_gib:.2f} GiB while writing {written:.2f} GiB"


def test_quantized_build_equals_loading_the_written_model(tiny_dir: Path) -> None:
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    built = _cpu_layout(build_quantized_random(TINY, seed=0, device="cpu"))
    loaded = _cpu_layout(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16,
                                                              quantization_config=BitsAndBytesConfig(**NF4)))
    assert isinstance(built.model.layers[1].self_attn.o_proj, Linear4bit)
    assert built.lm_head.weight.dtype == torch.bfloat16  # the head stays out of 4 bits
    assert all(p.device.type == "cpu" for p in built.parameters())
    assert all(b.device.type == "cpu" for b in built.buffers())
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(built(ids).logits, loaded(ids).logits)

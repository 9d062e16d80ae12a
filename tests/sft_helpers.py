"""Builders shared by the tests/test_sft_*.py files: tokenizers and tiny random-init decoders."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stand_in_tokenizer():
    """configs/tiny-gpt2's tokenizer (no chat template, no pad token), with the default template."""
    from transformers import AutoTokenizer

    from stages.lib.chat_template import ensure_chat_template

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "configs" / "tiny-gpt2")
    ensure_chat_template(tokenizer)
    return tokenizer


def tiny_llama(vocab_size: int, attn_implementation: str = "sdpa", seed: int = 0):
    """A random-init 2-layer Llama, hidden 64, grouped-query attention (4 heads, 2 kv heads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def stand_in_decoder(name: str, attn_implementation: str = "sdpa", seed: int = 0):
    """A random-init model of configs/<name> (tiny-gpt2, tiny-opt), as the download stage builds it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ROOT / "configs" / name)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()

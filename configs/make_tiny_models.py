"""Write the offline stand-ins for decoder models: configs/tiny-gpt2 and configs/tiny-opt.

    python configs/make_tiny_models.py

No GPT-2 or OPT weights or tokenizer files can be downloaded here, so the decoder recipes default
to `random-init:configs/<name>`: a small model of the real architecture (its config.json) whose
weights the download stage draws from a fixed seed, and a byte-level BPE tokenizer of GPT-2's
kind (no pad token, `<|endoftext|>` as bos/eos/unk) trained here on the recipes' own training
text (BANKING77 train.csv, tiny Shakespeare). The files this writes are committed; rerunning it
gives the same files.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2TokenizerFast, OPTConfig

ROOT = Path(__file__).resolve().parent.parent
EOS = "<|endoftext|>"
VOCAB = 4096
POSITIONS = 512


def training_text() -> list[str]:
    with open(ROOT / "data/banking77/train.csv", encoding="utf-8", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    return texts + (ROOT / "data/tiny_shakespeare/train.txt").read_text(encoding="utf-8").splitlines(keepends=True)


def tokenizer() -> GPT2TokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(training_text(), vocab_size=VOCAB, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                             model_max_length=POSITIONS)


def main() -> None:
    tok = tokenizer()
    eos = tok.convert_tokens_to_ids(EOS)
    configs = {
        "tiny-gpt2": GPT2Config(vocab_size=len(tok), n_positions=POSITIONS, n_embd=256, n_layer=4, n_head=4,
                                bos_token_id=eos, eos_token_id=eos),
        "tiny-opt": OPTConfig(vocab_size=len(tok), max_position_embeddings=POSITIONS, hidden_size=256,
                              ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4,
                              word_embed_proj_dim=256, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos),
    }
    for name, config in configs.items():
        out = ROOT / "configs" / name
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out)
        tok.save_pretrained(out)
        for f in out.glob("*.json"):  # stable bytes: sorted keys
            f.write_text(json.dumps(json.loads(f.read_text(encoding="utf-8")), indent=2, sort_keys=True) + "\n",
                         encoding="utf-8")
        print(f"{out}: {config.model_type}, vocab {len(tok)}")


if __name__ == "__main__":
    main()

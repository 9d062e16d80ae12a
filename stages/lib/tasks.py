"""What differs between task types: the batches a model learns from and the scores of a split.

classification  texts and class ids; scores: loss, accuracy, macro and weighted F1
masked-lm       blocks of tokens, 15% (task.mlm_probability) masked by transformers'
                DataCollatorForLanguageModeling; scores: loss and perplexity on masked tokens
causal-lm       blocks of tokens, each predicting its next token; scores: loss and perplexity

Training draws masks from the global RNG (so a resumed run redraws the same ones); scoring draws
them from a generator seeded with SCORE_SEED, so every evaluation of a split sees the same masks
and the scores are comparable between epochs and runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from sklearn.metrics import f1_score
from tqdm import tqdm

from stages.lib.data import PackedTokens
from stages.lib.model import autocast, pad_multiple, predict_logits

SCORE_SEED = 1234
LOSS_LIKE = ("loss", "perplexity")  # lower is better


class TokenBlocks:
    """A language-model split: equal-length token blocks, batched as input_ids, attention_mask
    and labels (masked-lm: masked by `mask`, labels only at masked positions)."""

    def __init__(self, blocks: Sequence[Sequence[int]], device: torch.device, mask: Any = None):
        self.ids = torch.tensor(blocks, dtype=torch.long).reshape(len(blocks), -1)
        self.lengths = [self.ids.shape[1]] * len(blocks)
        self.device, self.mask = device, mask

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        ids = self.ids[list(indices)]
        inputs, labels = self.mask.torch_mask_tokens(ids.clone()) if self.mask else (ids, ids)
        return {"input_ids": inputs.to(self.device), "attention_mask": torch.ones_like(inputs).to(self.device),
                "labels": labels.to(self.device)}


class Objective:
    """One task type's examples and scores; `metric` picks the best checkpoint."""

    def __init__(self, task: dict[str, Any], tokenizer: Any = None):
        self.type, self.metric = task["type"], task["metric"]
        self.mlm_probability = task.get("mlm_probability", 0.15)
        self.tokenizer = tokenizer

    def better(self, scores: dict[str, float], best: dict[str, float]) -> bool:
        """Whether `scores` beat `best` (empty: anything does) on the task's metric."""
        if self.metric not in best:
            return True
        if self.metric in LOSS_LIKE:
            return scores[self.metric] < best[self.metric]
        return scores[self.metric] > best[self.metric]

    def examples(self, sequences: Sequence[Sequence[int]], labels: Sequence[int] | None, pad_id: int,
                 device: torch.device, min_width: int = 0, scoring: bool = False) -> PackedTokens | TokenBlocks:
        """A split as batches on `device`: padded texts with labels, or token blocks."""
        if self.type == "classification":
            return PackedTokens(sequences, pad_id, device, min_width, pad_multiple(device),
                                None if scoring else labels)
        mask = None
        if self.type == "masked-lm":
            from transformers import DataCollatorForLanguageModeling

            mask = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.mlm_probability)
            mask.generator = torch.Generator().manual_seed(SCORE_SEED) if scoring else None
        return TokenBlocks(sequences, device, mask)

    def scores(self, model: torch.nn.Module, examples: PackedTokens | TokenBlocks, labels: Sequence[int] | None,
               batch_size: int, device: torch.device, dtype: torch.dtype, desc: str = "score") -> dict[str, float]:
        """The split's scores under `model` (in eval mode: the caller sets it)."""
        if self.type == "classification":
            logits = torch.from_numpy(predict_logits(model, examples, batch_size, device, dtype, desc=desc))
            return classification_scores(logits, labels)
        if self.type == "masked-lm" and examples.mask is not None:  # the same masks every time
            examples.mask.generator.manual_seed(SCORE_SEED)
        return language_model_scores(model, examples, batch_size, device, dtype, desc)


def classification_scores(logits: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    target = torch.tensor(labels)
    predicted = logits.argmax(-1).numpy()
    return {"loss": torch.nn.functional.cross_entropy(logits, target).item(),
            "accuracy": float((predicted == target.numpy()).mean()),
            "f1_macro": float(f1_score(labels, predicted, average="macro", zero_division=0)),
            "f1_weighted": float(f1_score(labels, predicted, average="weighted", zero_division=0))}


@torch.inference_mode()
def language_model_scores(model: torch.nn.Module, blocks: TokenBlocks, batch_size: int,
                          device: torch.device, dtype: torch.dtype, desc: str = "score") -> dict[str, float]:
    """Mean cross-entropy per predicted token, and its exp (perplexity)."""
    total, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)  # equal-length blocks: any order, no padding
    for start in tqdm(starts, desc=desc, unit="batch", disable=None, leave=False):
        inputs = blocks.batch(range(start, min(start + batch_size, len(blocks))))
        with autocast(device, dtype):
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        labels = inputs["labels"]
        if blocks.mask is None:  # causal: position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                   ignore_index=-100, reduction="sum")
        total += losses.item()
        count += int((labels != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def describe(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())


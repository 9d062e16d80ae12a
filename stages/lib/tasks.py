"""What differs between task types: the batches a model learns from and the scores of a split.

classification  texts and class ids; scores: loss, accuracy, macro and weighted F1
masked-lm       blocks of tokens, 15% (task.mlm_probability) masked by transformers'
                DataCollatorForLanguageModeling; scores: loss and perplexity on masked tokens
causal-lm       blocks of tokens, each predicting its next token; scores: loss and perplexity
sft             conversations (packed rows or one per row) with labels on the assistant's tokens;
                scores: loss and perplexity on those tokens only (response tokens)

Training draws masks from the global RNG (so a resumed run redraws the same ones); scoring draws
them from a generator seeded with SCORE_SEED, so every evaluation of a split sees the same masks
and the scores are comparable between epochs and runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stages.lib.batches import PackedTokens, TokenBlocks, pad_multiple, predict_logits
from stages.lib.losses import CHUNK_TOKENS, ChunkedCausalLM, causal_lm_loss, chunked_causal_lm_loss, output_head
from stages.lib.packing import ChatTokens, prepare_for_packing, uses_varlen
from stages.lib.params import Task
from stages.lib.tokenized import ChatTargets
from stages.lib.quantized import autocast

SCORE_SEED = 1234
LOSS_LIKE = ("loss", "perplexity")  # lower is better


class Objective:
    """One task type's examples and scores; `metric` picks the best checkpoint."""

    def __init__(self, task: Task, tokenizer: Any = None):
        self.type, self.metric, self.mlm_probability = task.type, task.metric, task.mlm_probability
        self.tokenizer = tokenizer
        self.varlen = False  # sft batches carry their examples' boundaries (prepare sets it)

    def better(self, scores: dict[str, float], best: dict[str, float]) -> bool:
        """Whether `scores` beat `best` (empty: anything does) on the task's metric."""
        if self.metric not in best:
            return True
        if self.metric in LOSS_LIKE:
            return scores[self.metric] < best[self.metric]
        return scores[self.metric] > best[self.metric]

    def loss_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the training loop calls for a loss: a decoder (causal-lm, sft) through the chunked
        cross-entropy (never the full fp32 logits), with the batch as the model would take it
        (sft's packed rows: position_ids, varlen's boundaries); other models as they are."""
        return ChunkedCausalLM(model) if self.type in ("causal-lm", "sft") else model

    def prepare(self, model: torch.nn.Module, packed: bool) -> None:
        """Set the loaded base up for this task's training batches: sft trains without a cache,
        and packed rows only where the model keeps their examples apart (else one line); a model
        with varlen attention gets its examples' boundaries with every packed batch."""
        if self.type == "sft":
            model.config.use_cache = False
            if packed:
                prepare_for_packing(model)
                self.varlen = uses_varlen(model)

    def examples(self, sequences: Sequence[Sequence[int]], labels: Sequence[int] | ChatTargets | None,
                 pad_id: int, device: torch.device, min_width: int = 0,
                 scoring: bool = False) -> PackedTokens | TokenBlocks | ChatTokens:
        """A split as batches on `device`: padded texts with labels, token blocks, or chats."""
        if self.type == "sft":
            return ChatTokens(sequences, labels.labels, labels.position_ids, pad_id, device, self.varlen)
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
               batch_size: int, device: torch.device, dtype: torch.dtype, desc: str = "score",
               on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """The split's scores under `model` (in eval mode: the caller sets it); `on_batch(rows,
        tokens)` after each batch."""
        if self.type == "classification":
            logits = torch.from_numpy(predict_logits(model, examples, batch_size, device, dtype, desc=desc,
                                                     on_batch=on_batch))
            return classification_scores(logits, labels)
        if self.type == "sft":
            return response_scores(model, examples, batch_size, device, dtype, desc)
        if self.type == "masked-lm" and examples.mask is not None:  # the same masks every time
            examples.mask.generator.manual_seed(SCORE_SEED)
        return language_model_scores(model, examples, batch_size, device, dtype, desc, on_batch)


def label_scores(labels: Sequence[int], predicted: Sequence[int],
                 classes: Sequence[int] | None = None) -> dict[str, float]:
    """Accuracy, macro- and weighted F1 of predicted class ids. F1 averages over `classes`
    (evaluate: every class, so one the test split lacks counts as 0), or, when None, over the
    classes present in labels or predictions (validation, as it always has)."""
    # imported here: sklearn's import takes seconds that every train process would pay before
    # its first step; only scoring needs it
    from sklearn.metrics import f1_score

    f1 = {"labels": None if classes is None else list(classes), "zero_division": 0}
    return {"accuracy": float((np.asarray(predicted) == np.asarray(labels)).mean()),
            "f1_macro": float(f1_score(labels, predicted, average="macro", **f1)),
            "f1_weighted": float(f1_score(labels, predicted, average="weighted", **f1))}


def classification_scores(logits: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """A validation split's loss and label_scores."""
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).item()
    return {"loss": loss, **label_scores(labels, logits.argmax(-1).numpy())}


def per_class_scores(labels: Sequence[int], predicted: Sequence[int],
                     names: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and support of each class, by name."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(len(names))), zero_division=0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])} for i, name in enumerate(names)}


@torch.inference_mode()
def language_model_scores(model: torch.nn.Module, blocks: TokenBlocks, batch_size: int,
                          device: torch.device, dtype: torch.dtype, desc: str = "score",
                          on_batch: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Mean cross-entropy per predicted token, and its exp (perplexity). A causal LM's loss is
    the chunked one (lib/losses.py): its full fp32 logits are never built."""
    total, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)  # equal-length blocks: any order, no padding
    causal = blocks.mask is None
    body, head = output_head(model) if causal else (None, None)
    for start in tqdm(starts, desc=desc, unit="batch", disable=None, leave=False):
        inputs = blocks.batch(range(start, min(start + batch_size, len(blocks))))
        labels = inputs["labels"]
        with autocast(device, dtype):
            if causal:  # position t predicts token t + 1; num_items 1: the sum
                hidden = body(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              use_cache=False).last_hidden_state
                losses = causal_lm_loss(hidden, head.weight, labels, num_items=1, chunk_tokens=CHUNK_TOKENS)
                labels = labels[:, 1:]
            else:
                logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                           ignore_index=-100, reduction="sum")
        total += losses.item()
        count += int((labels != -100).sum())
        if on_batch:
            on_batch(len(inputs["input_ids"]), inputs["input_ids"].numel())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


@torch.inference_mode()
def response_scores(model: torch.nn.Module, chats: ChatTokens, batch_size: int, device: torch.device,
                    dtype: torch.dtype, desc: str = "score") -> dict[str, float]:
    """Mean cross-entropy per labelled (response) token, and its exp; packed or not, the same
    targets, so the same numbers. The loss is the chunked one (lib/losses.py), as in training:
    the full fp32 logits are never built."""
    total, count = 0.0, 0
    for start in tqdm(range(0, len(chats), batch_size), desc=desc, unit="batch", disable=None, leave=False):
        inputs = chats.batch(range(start, min(start + batch_size, len(chats))))
        with autocast(device, dtype):  # position t predicts token t + 1; num_items 1: the sum
            total += chunked_causal_lm_loss(model, **inputs, num_items=1, chunk_tokens=CHUNK_TOKENS).item()
        count += int((inputs["labels"][:, 1:] != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def format_scores(scores: dict[str, float]) -> str:
    """Scores for a log line: `loss 0.4120, accuracy 0.8790`."""
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())


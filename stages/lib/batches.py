"""Token batches: the stores that hold a split's token ids (PackedTokens on the device,
StreamedTokens on the host, TokenBlocks for language models), the order training draws them in
(length_grouped_batches), the inference plan that runs them longest first (predict_logits), and
the ids of texts to run (encode_truncated).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stages.lib.losses import IGNORE_INDEX
from stages.lib.quantized import autocast


def pad_multiple(device: torch.device) -> int:
    """Pad batches to a multiple of this on GPUs: tensor-core friendly shapes, little waste."""
    return 8 if device.type == "cuda" else 1


def length_grouped_batches(lengths: Sequence[int], batch_size: int,
                           generator: torch.Generator, group_by_length: bool) -> list[list[int]]:
    """Shuffled batches; with group_by_length, examples of similar length share a batch.

    Shuffle, cut into mega-batches of 64 batches, sort each by length and cut it into batches,
    then shuffle the batch order: little padding, yet every epoch sees a new order.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        mega = batch_size * 64
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda j: -lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def pad_rows(sequences: Sequence[Sequence[int]], lengths: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Write `sequences` left-aligned into `out` (already filled with the pad id): one vectorised
    scatter, not a loop per row. Returns the mask of the positions written."""
    filled = np.arange(out.shape[1]) < lengths[:, None]
    out[filled] = np.fromiter(itertools.chain.from_iterable(sequences), dtype=out.dtype,
                              count=int(lengths.sum()))
    return filled


class TokenBatches:
    """What the two token stores below share: sequence lengths, the padded width of a batch, and
    the inference plan."""

    lengths: list[int]
    min_width: int
    multiple_of: int

    def __len__(self) -> int:
        return len(self.lengths)

    def width(self, longest: int | np.ndarray) -> int | np.ndarray:
        """The padded width for a longest sequence: at least min_width, a multiple of multiple_of
        (element by element for an array of lengths)."""
        padded = -(-np.maximum(self.min_width, longest) // self.multiple_of) * self.multiple_of
        return padded if isinstance(padded, np.ndarray) else int(padded)

    def inference_batches(self, batch_size: int, min_rows: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The order to run examples in for inference (longest first, stable) and its batches,
        as (start, end) over that order; none holds more than `batch_size` examples.

        Examples are grouped by padded width (`width`): a group of at least `min_rows` makes its
        own batches (cut into equal parts), so no example is padded past its own width, and
        where the width is the length itself (multiple_of 1, the CPU) nothing is padded at all.
        Smaller groups, adjacent in the order, share batches padded to their longest example.
        """
        lengths = np.asarray(self.lengths, dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")
        widths = self.width(lengths[order])
        bounds = np.flatnonzero(np.diff(widths)) + 1
        batches: list[tuple[int, int]] = []
        shared_from = None  # start of the current run of small groups

        def cut_shared(end: int) -> None:
            if shared_from is not None:
                batches.extend((s, min(s + batch_size, end)) for s in range(shared_from, end, batch_size))

        for start, end in zip(np.r_[0, bounds].tolist(), np.r_[bounds, len(widths)].tolist()):
            if end - start < min_rows:
                shared_from = start if shared_from is None else shared_from
                continue
            cut_shared(start)
            shared_from = None
            parts = -(-(end - start) // batch_size)  # equal parts, not full batches and a small rest
            cuts = np.linspace(start, end, parts + 1).round().astype(int).tolist()
            batches.extend(zip(cuts[:-1], cuts[1:]))
        cut_shared(len(widths))
        return order, batches


class PackedTokens(TokenBatches):
    """A split's token ids as one padded tensor on the device: a batch is one gather, not a
    Python loop and a host-to-device copy per step. For data used again and again (training,
    validation)."""

    def __init__(self, sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device,
                 min_width: int = 0, multiple_of: int = 1, labels: Sequence[int] | None = None):
        self.lengths = [len(s) for s in sequences]
        self.min_width, self.multiple_of = min_width, multiple_of
        ids = np.full((len(sequences), self.width(max(self.lengths, default=0))), pad_id, dtype=np.int64)
        pad_rows(sequences, np.array(self.lengths, dtype=np.int64), ids)
        self.ids = torch.from_numpy(ids).to(device)
        self.device_lengths = torch.tensor(self.lengths, device=device)
        self.labels = None if labels is None else torch.tensor(labels, device=device)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (and labels, if given) for `indices`, padded to the batch's
        longest sequence (at least min_width), rounded up to multiple_of."""
        width = self.width(max(self.lengths[i] for i in indices))
        index = torch.tensor(indices, device="cpu").to(self.ids.device, non_blocking=True)
        input_ids = self.ids[index, :width]
        positions = torch.arange(width, device=self.ids.device)
        attention_mask = (positions < self.device_lengths[index, None]).long()
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.labels is not None:
            batch["labels"] = self.labels[index]
        return batch

    def reordered(self, order: np.ndarray) -> PackedTokens:
        """The same examples in `order`: one gather on the device."""
        new = copy.copy(self)
        index = torch.from_numpy(np.ascontiguousarray(order)).to(self.ids.device)
        new.lengths = [self.lengths[i] for i in order.tolist()]
        new.ids, new.device_lengths = self.ids[index], self.device_lengths[index]
        new.labels = None if self.labels is None else self.labels[index]
        return new

    def rows(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask of rows start:end, which must be sorted longest first
        (`reordered`): slices, so nothing is copied from the host. Rows that all fill the
        batch's width get no mask: it would hide nothing, and without one SDPA can take its
        flash kernel."""
        width = self.width(self.lengths[start])
        batch = {"input_ids": self.ids[start:end, :width]}
        if self.lengths[end - 1] < width:
            positions = torch.arange(width, device=self.ids.device)
            batch["attention_mask"] = (positions < self.device_lengths[start:end, None]).long()
        return batch


class StreamedTokens(TokenBatches):
    """Token ids kept as lists on the host, each batch packed only when it is asked for (`rows`):
    for data run once (evaluate, predict, serve). On a GPU a batch is packed into pinned memory
    and copied without waiting, so the host packs the next batch while the GPU runs this one,
    and the first batch starts without waiting for the whole input to be packed."""

    def __init__(self, sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device,
                 min_width: int = 0, multiple_of: int = 1):
        self.sequences, self.lengths = sequences, [len(s) for s in sequences]
        self.pad_id, self.device = pad_id, device
        self.min_width, self.multiple_of = min_width, multiple_of

    def reordered(self, order: np.ndarray) -> StreamedTokens:
        """The same examples in `order` (a reordered list; nothing is copied)."""
        new = copy.copy(self)
        new.sequences = [self.sequences[i] for i in order.tolist()]
        new.lengths = [self.lengths[i] for i in order.tolist()]
        return new

    def rows(self, start: int, end: int) -> dict[str, torch.Tensor]:
        """As PackedTokens.rows: rows start:end, sorted longest first, masked only if padded."""
        lengths = np.array(self.lengths[start:end], dtype=np.int64)
        width = self.width(int(lengths[0]))
        pinned = self.device.type == "cuda"
        ids = torch.full((end - start, width), self.pad_id, dtype=torch.int64, pin_memory=pinned)
        filled = pad_rows(self.sequences[start:end], lengths, ids.numpy())
        batch = {"input_ids": ids}
        if lengths[-1] < width:
            batch["attention_mask"] = torch.empty(filled.shape, dtype=torch.int64, pin_memory=pinned)
            batch["attention_mask"].numpy()[:] = filled
        # from pinned memory, non_blocking returns at once; the caching host allocator keeps
        # the buffer until the copy has run
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


class TokenBlocks:
    """A language-model split: equal-length token blocks, batched as input_ids, attention_mask
    and labels (masked-lm: masked by `mask`, labels only at masked positions)."""

    def __init__(self, blocks: Sequence[Sequence[int]], device: torch.device, mask: Any = None):
        self.ids = torch.tensor(blocks, dtype=torch.long).reshape(len(blocks), -1)
        self.lengths = [self.ids.shape[1]] * len(blocks)
        self.device, self.mask = device, mask

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, indices: Sequence[int], rows: int = 0) -> dict[str, torch.Tensor]:
        """The blocks `indices`; with `rows` > len(indices), filled up to `rows` with copies of
        the first block that carry no labels: the loss and gradients are those of `indices`
        alone, and a compiled model sees the shape of every other batch (a short last batch
        would otherwise recompile each compiled layer)."""
        ids = self.ids[list(indices)]
        inputs, labels = self.mask.torch_mask_tokens(ids.clone()) if self.mask else (ids, ids)
        if rows > len(indices):
            fill = rows - len(indices)
            inputs = torch.cat([inputs, inputs[:1].expand(fill, -1)])
            labels = torch.cat([labels, torch.full((fill, labels.shape[1]), IGNORE_INDEX, dtype=labels.dtype)])
        return {"input_ids": inputs.to(self.device), "attention_mask": torch.ones_like(inputs).to(self.device),
                "labels": labels.to(self.device)}



# A padded width shared by fewer texts than this would make batches too small to keep a GPU busy:
# such texts share batches with their neighbours in length instead.
MIN_GROUP_ROWS = 64


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, tokens: PackedTokens | StreamedTokens, batch_size: int,
                   device: torch.device, dtype: torch.dtype, desc: str = "predict",
                   min_group_rows: int = MIN_GROUP_ROWS,
                   on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Logits in input order.

    Texts run longest first, in batches of at most `batch_size` texts of one padded width
    (PackedTokens.inference_batches: on a GPU, lengths rounded up to a multiple of 8; on the
    CPU, one length and no padding). Each batch is a slice of tokens sorted once on the device
    (PackedTokens) or packed on the host as it is needed (StreamedTokens); either way the host
    queues batch after batch without waiting for the GPU. The logits come back in one copy, and
    are put back in input order on the host. `on_batch(rows, tokens)` is called after each
    batch is queued (lib.throughput counts them).
    """
    order, batches = tokens.inference_batches(batch_size, min_group_rows)
    ordered = tokens.reordered(order)
    # A merged model holds every weight in the compute dtype, and autocast would only make the
    # LayerNorm outputs, and so the residual stream, fp32: twice the bytes through every
    # element-wise kernel. Models with fp32 weights (LoRA, the head) need it.
    mixed = any(p.dtype != dtype for p in model.parameters())
    out = torch.empty((len(tokens), model.config.num_labels), dtype=torch.float32, device=device)
    for start, end in tqdm(batches, desc=desc, unit="batch", disable=None, leave=False):
        with autocast(device, dtype) if mixed else nullcontext():
            logits = model(**ordered.rows(start, end)).logits
        out[start:end] = logits.float()
        if on_batch:
            on_batch(end - start, sum(ordered.lengths[start:end]))
    result = np.empty(out.shape, dtype=np.float32)
    result[order] = out.cpu().numpy()  # one copy back, one sync, at the end
    return result


# Texts are tokenized from prefixes of this many characters per token of max_length, doubled until
# the ids settle; PREFIX_CAP_CHARS_PER_TOKEN bounds the prefix of a text that never settles.
PREFIX_CHARS_PER_TOKEN = 8
PREFIX_CAP_CHARS_PER_TOKEN = 1024


def encode_truncated(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """`tokenizer(texts, truncation=True, max_length=max_length)`'s ids, read from prefixes.

    A tokenizer reads a whole text (and keeps every token's offsets) before truncating it, so one
    50 MB text cost gigabytes. Here each text is cut to a prefix that can hold max_length tokens;
    a prefix that yields max_length tokens is doubled until two successive prefixes give the same
    ids: the cut then lies past every token that truncation keeps (only the word the cut splits
    can change). A text with no such point within PREFIX_CAP_CHARS_PER_TOKEN characters per
    token is tokenized from that many characters.
    """
    def encode(batch: list[str]) -> list[list[int]]:
        # only the ids: masks are rebuilt per batch from the lengths (PackedTokens)
        return tokenizer(batch, truncation=True, max_length=max_length, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"]

    cut, cap = PREFIX_CHARS_PER_TOKEN * max_length, PREFIX_CAP_CHARS_PER_TOKEN * max_length
    ids = encode([t[:cut] for t in texts])
    pending = [i for i, t in enumerate(texts) if len(t) > cut]
    while pending:
        cut *= 2
        longer = encode([texts[i][:cut] for i in pending])
        unsettled = []
        for i, new in zip(pending, longer):
            settled = len(new) == max_length and new == ids[i]
            ids[i] = new
            if not settled and len(texts[i]) > cut and cut < cap:
                unsettled.append(i)
        pending = unsettled
    return ids

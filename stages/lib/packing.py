"""Packing: several tokenized examples per row of at most max_length tokens, kept apart.

Examples go into rows by best-fit decreasing (longest first, each into the fullest row it still
fits, ties to the oldest row; deterministic: the same lengths give the same rows). A packed row
carries its examples' input_ids and labels end to end, position_ids restarting at 0 for each
example, and cu_seqlens, the examples' boundaries (0, end of the first, ..., row length).

Attention stays inside each example in one of two ways:
- SDPA, eager, flex attention (the CPU, and GPUs without varlen): transformers (5.x) reads the
  restarting position_ids. Given position_ids and no attention_mask (and no cache: config.use_cache
  defaults to True, and then the packed mask is skipped; `prepare_for_packing` turns it off), its
  mask builder (masking_utils.find_packed_sequence_indices) turns them into a block-diagonal causal
  mask. For SDPA and eager that mask is dense, (rows, 1, width, width): fine at CPU sizes, the
  quadratic cost packing must avoid on GPUs. Llama and GPT-2 pass position_ids to that mask
  builder; OPT does not (its examples would see each other; with varlen they do not).
- varlen (VARLEN, lib/varlen_attention.py; what train picks for packed rows on a CUDA GPU): no
  mask at all; each attention layer runs PyTorch's flash-attention kernel over the examples'
  boundaries, `varlen_kwargs(rows)`, which ChatTokens(varlen=True) passes with every batch.
Either way `prepare_for_packing` runs a probe on the loaded model itself, with the inputs its
batches will have, and refuses packing where examples would leak into each other.
(transformers' own flash-attention path, "flash_attention_2" with the flash-attn package, reads
packing from position_ids only for a batch of ONE row; with several it needs `varlen_kwargs` too.)

Each example's first token gets no label: the model's shift would otherwise train it as the
prediction of the previous example's last token. Unpacked, that token is never predicted either,
so a packed batch has exactly the same targets, hence the same loss, as the examples padded.

GPU speed: packed rows with SDPA's dense block mask were measured on an H200 (docs/sft.md);
varlen's tokens/s are not measured yet (benchmarks/sft_packing.py --attn varlen sdpa).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stages.lib.chat_template import IGNORE_INDEX
from stages.lib.params import UserError

# The attention implementation that lib/varlen_attention.py registers with transformers: packed
# rows attend within their examples through cu_seq_lens, with no mask.
VARLEN = "varlen"


@dataclass(frozen=True)
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    cu_seqlens: list[int]  # example boundaries: 0, ..., len(input_ids)


def pack_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Example indices per row: best-fit decreasing, no row longer than max_length."""
    too_long = [i for i, n in enumerate(lengths) if n > max_length or n < 1]
    if too_long:  # truncation happens before packing; reaching here is a bug
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens (expected 1 to {max_length})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            room, row = max_length - lengths[i], len(bins) - 1
        else:
            room, row = free.pop(slot)
            bins[row].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return bins


def pack_examples(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                  max_length: int) -> list[PackedRow]:
    """The examples packed into rows (see the module docstring)."""
    rows = []
    for members in pack_bins([len(ids) for ids in input_ids], max_length):
        ids, targets, positions, bounds = [], [], [], [0]
        for i in members:
            ids.extend(input_ids[i])
            targets.append(IGNORE_INDEX)  # the first token is not predicted from the previous example
            targets.extend(labels[i][1:])
            positions.extend(range(len(input_ids[i])))
            bounds.append(len(ids))
        rows.append(PackedRow(ids, targets, positions, bounds))
    return rows


def chat_columns(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], packing: bool,
                 max_length: int) -> dict[str, list[list[int]]]:
    """A split's dataset columns: packed rows (input_ids, labels, position_ids) or one example
    per row (input_ids, labels)."""
    if not packing:
        return {"input_ids": [list(x) for x in input_ids], "labels": [list(x) for x in labels]}
    rows = pack_examples(input_ids, labels, max_length)
    return {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows],
            "position_ids": [r.position_ids for r in rows]}


def row_from_columns(input_ids: Sequence[int], labels: Sequence[int], position_ids: Sequence[int]) -> PackedRow:
    """A stored packed row; its example boundaries are where position_ids restart at 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0]
    return PackedRow(list(input_ids), list(labels), list(position_ids), starts + [len(input_ids)])


class ChatTokens:
    """An sft split as batches (the loop's token store): packed rows (collate_packed) or one
    example per row (collate_padded), with their labels, moved to `device`. With `varlen`, packed
    batches also carry their examples' boundaries (varlen_kwargs), for varlen attention."""

    def __init__(self, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                 position_ids: Sequence[Sequence[int]] | None, pad_id: int, device: torch.device,
                 varlen: bool = False):
        self.input_ids, self.labels, self.pad_id, self.device = input_ids, labels, pad_id, device
        self.varlen = varlen and position_ids is not None
        self.rows = (None if position_ids is None else
                     [row_from_columns(*row) for row in zip(input_ids, labels, position_ids)])
        self.lengths = [len(ids) for ids in input_ids]

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def packed(self) -> bool:
        return self.rows is not None

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor | int]:
        if self.rows is not None:
            rows = [self.rows[i] for i in indices]
            batch = {**collate_packed(rows, self.pad_id), **(varlen_kwargs(rows) if self.varlen else {})}
        else:
            batch = collate_padded([self.input_ids[i] for i in indices], [self.labels[i] for i in indices],
                                   self.pad_id)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def collate_packed(rows: Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs for packed rows: input_ids, labels, position_ids, and no attention_mask (that
    would switch the packed mask off). A shorter row is padded as one more example of its own
    (positions from 0, no labels), so it never sees the row's real examples, nor they it."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        n = len(row.input_ids)
        ids[k, :n] = torch.tensor(row.input_ids)
        labels[k, :n] = torch.tensor(row.labels)
        positions[k, :n] = torch.tensor(row.position_ids)
        positions[k, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def varlen_kwargs(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor | int]:
    """cu_seq_lens_q/k and max_length_q/k, over the batch flattened as collate_packed lays it out
    (padding as its own example): what varlen attention (VARLEN) needs with every batch, and
    what spares transformers' flash-attention path deriving them from position_ids."""
    width = max(len(r.input_ids) for r in rows)
    bounds, offset = [0], 0
    for row in rows:
        ends = row.cu_seqlens[1:] + ([width] if len(row.input_ids) < width else [])
        bounds.extend(offset + end for end in ends)
        offset += width
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def collate_padded(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                   pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs with one example per row, right-padded: input_ids, attention_mask, labels."""
    width = max(len(ids) for ids in input_ids)
    batch_ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    batch_labels = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for k, (ids, targets) in enumerate(zip(input_ids, labels)):
        batch_ids[k, :len(ids)] = torch.tensor(ids)
        batch_labels[k, :len(ids)] = torch.tensor(targets)
        mask[k, :len(ids)] = 1
    return {"input_ids": batch_ids, "attention_mask": mask, "labels": batch_labels}


def uses_varlen(model: torch.nn.Module) -> bool:
    """Whether `model` was loaded with varlen attention: its batches need varlen_kwargs."""
    return getattr(model.config, "_attn_implementation", None) == VARLEN


def segment_kwargs(model: torch.nn.Module, segments: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """The inputs that tell `model` which tokens belong together, for rows whose examples start
    where `segments` (positions, one row each) is 0: varlen_kwargs for varlen attention; nothing
    for the others, which read the position_ids themselves."""
    if not uses_varlen(model):
        return {}
    rows = [row_from_columns(r, r, r) for r in segments.tolist()]
    return {k: v.to(segments.device) if isinstance(v, torch.Tensor) else v for k, v in varlen_kwargs(rows).items()}


@torch.no_grad()
def attends_across_examples(model: torch.nn.Module, example_length: int = 8) -> bool:
    """Whether `model`, as loaded and called as the pipeline calls it (attention implementation,
    cache setting, this transformers version; varlen attention with its varlen_kwargs), lets a
    packed example see the one before it. Probe: the second of two random examples, scored
    alone, packed (restarting position_ids, no attention_mask) and packed with a full causal
    mask (what a leak looks like; for varlen, one segment per row). It leaks when packing moves
    its logits by more than a tenth of what the full mask does; rounding in bf16 moves them far
    less. Two packed rows, not one: transformers' flash-attention path reads packing from
    position_ids only for a batch of one row."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (2, 2 * example_length), generator=generator).to(device)
    positions = torch.arange(example_length, device=device).repeat(2)[None].expand(2, -1)
    whole_rows = torch.arange(2 * example_length, device=device)[None].expand(2, -1)
    full_mask = {"attention_mask": torch.ones_like(ids)} if not uses_varlen(model) else {}
    training = model.training
    model.eval()
    try:
        alone = model(input_ids=ids[:, example_length:], position_ids=positions[:, :example_length],
                      **segment_kwargs(model, positions[:, :example_length])).logits.float()
        packed = model(input_ids=ids, position_ids=positions,
                       **segment_kwargs(model, positions)).logits[:, example_length:].float()
        full = model(input_ids=ids, position_ids=positions, **full_mask,
                     **segment_kwargs(model, whole_rows)).logits[:, example_length:].float()
    finally:
        model.train(training)
    leak = (full - alone).abs().max()
    return bool((packed - alone).abs().max() > 0.1 * leak)


def prepare_for_packing(model: torch.nn.Module) -> None:
    """Set `model` up for packed batches, or refuse packing in one line where its examples would
    attend to each other (or, with varlen attention, where the model cannot take its inputs).
    It turns the model's default cache off (config.use_cache): with a cache, transformers skips
    the packed mask, and training needs none; generate() asks for its own cache."""
    model.config.use_cache = False
    if attends_across_examples(model):
        import transformers

        config = model.config
        why = ("does not run its attention layers through the registered varlen function" if uses_varlen(model)
               else "does not build its mask from position_ids")
        raise UserError(f"sft.packing: {config.model_type} with {config._attn_implementation} attention lets packed "
                        f"examples attend to each other (transformers {transformers.__version__} {why}); "
                        "set sft.packing: false")

"""Reading and validating labelled text tables and text corpora, and batching tokenized examples."""

from __future__ import annotations

import copy
import csv
import gzip
import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from stages.lib.params import UserError

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
CORPUS_SUFFIXES = (".txt", ".txt.gz")
# A text corpus directory: train.txt, and optionally validation (either name) and test.
CORPUS_NAMES = {"train": ("train",), "validation": ("validation", "valid"), "test": ("test",)}


def find_table(directory: Path, stem: str) -> Path:
    """The one file `<stem>.csv|.jsonl|.parquet` in a directory."""
    found = [directory / f"{stem}{s}" for s in TABLE_SUFFIXES if (directory / f"{stem}{s}").is_file()]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise UserError(f"{directory}: {what} {stem} file (expected exactly one of "
                        f"{', '.join(stem + s for s in TABLE_SUFFIXES)})")
    return found[0]


def find_corpus(directory: Path) -> dict[str, Path]:
    """The corpus files of a directory by split: train is required, validation and test not."""
    found: dict[str, Path] = {}
    for split, stems in CORPUS_NAMES.items():
        paths = [directory / f"{stem}{suffix}" for stem in stems for suffix in CORPUS_SUFFIXES
                 if (directory / f"{stem}{suffix}").is_file()]
        if len(paths) > 1:
            raise UserError(f"{directory}: more than one {split} file ({', '.join(p.name for p in paths)})")
        if paths:
            found[split] = paths[0]
    if "train" not in found:
        raise UserError(f"{directory}: no train.txt or train.txt.gz (a text corpus needs a train file; "
                        "valid.txt and test.txt are optional)")
    return found


def read_lines(path: Path) -> list[str]:
    """A UTF-8 text file's lines, newlines kept; `.gz` files are decompressed."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path}: not a readable gzip file ({e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    lines = text.splitlines(keepends=True)
    if not any(line.strip() for line in lines):
        raise UserError(f"{path}: no text (expected lines of text)")
    return lines


def split_corpus(parts: dict[str, list[str]], val_fraction: float) -> dict[str, list[str]]:
    """train/validation/test lines. A missing test split is the last val_fraction of train's
    lines, a missing validation split the same share before it: contiguous cuts, because
    neighbouring lines of a corpus are not independent (a shuffled cut would leak)."""
    train = parts["train"]
    missing = [s for s in ("validation", "test") if s not in parts]
    share = round(len(train) * val_fraction)
    if missing and (share < 1 or len(train) - share * len(missing) < 1):
        raise UserError(f"split.val_fraction: {val_fraction} of {len(train)} train lines leaves no "
                        f"lines for {' or '.join(missing)} or train")
    out = dict(parts)
    for split in reversed(("validation", "test")):
        if split not in parts:
            train, out[split] = train[:-share], train[-share:]
    out["train"] = train
    return out


def token_blocks(tokenizer, lines: Sequence[str], block: int, add_special_tokens: bool) -> list[list[int]]:
    """Tokenize the non-blank lines, concatenate them and cut the stream into blocks of `block`
    tokens (the rest, shorter than a block, is dropped), as transformers' run_mlm/run_clm do."""
    from transformers.utils import logging as hf_logging

    texts = [line for line in lines if line.strip()]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "longer than the maximum sequence length": blocks are cut below
    if not add_special_tokens:  # a causal LM learns the line breaks too, where its tokenizer has them
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer([t.strip() for t in texts], add_special_tokens=True)["input_ids"]
    hf_logging.set_verbosity(verbosity)
    stream = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
    n = len(stream) // block
    return stream[:n * block].reshape(n, block).tolist()


def column_list(columns: Iterable[object]) -> str:
    """Column names for a one-line message: a name with a newline or NUL in it is quoted."""
    names = [name if name.isprintable() else repr(name) for name in map(str, columns)]
    return ", ".join(names) or "none"


def reject_surplus_fields(df: pd.DataFrame, path: Path) -> None:
    """Fail when data rows have more fields than the header.

    pandas reads such a CSV without complaint: it makes the surplus leading fields the index,
    so every column silently shifts one place (the first column's text would be dropped).
    """
    if not isinstance(df.index, pd.RangeIndex):
        width = len(df.columns)
        raise UserError(f"{path}: data rows have {width + df.index.nlevels} fields but the header "
                        f"has {width} (expected one field per header column)")


def as_text(df: pd.DataFrame) -> pd.DataFrame:
    """Every cell as str, nulls as ''. Via object, so a categorical column takes '' too; read
    with nullable dtypes, an int column with a null keeps `1`, not `1.0`."""
    return df.astype(object).fillna("").astype(str)


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV, JSON Lines or Parquet file with every column as text, empty cells as ''."""
    try:
        if path.suffix == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            reject_surplus_fields(df, path)
        elif path.suffix == ".jsonl":
            df = as_text(pd.read_json(path, lines=True, dtype=False, dtype_backend="numpy_nullable"))
        elif path.suffix == ".parquet":
            df = as_text(pd.read_parquet(path, dtype_backend="numpy_nullable"))
        else:
            raise UserError(f"{path}: unsupported file type (expected {', '.join(TABLE_SUFFIXES)})")
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: empty file (expected a header row and data rows)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (KeyError, TypeError):
        # pandas' errors for a JSON line that is not an object (`1` after `{...}`), or for a
        # Parquet file whose embedded pandas metadata is corrupt; from a CSV, they are bugs
        if path.suffix == ".csv":
            raise
        expected = "one JSON object per line" if path.suffix == ".jsonl" else "valid pandas metadata"
        raise UserError(f"{path}: malformed {path.suffix[1:]} (expected {expected})") from None
    except (pd.errors.ParserError, ValueError, OSError, csv.Error, pa.ArrowException) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: malformed {path.suffix[1:]} ({reason})") from None
    return df


def parse_labels(values: Sequence[str], label_names: Sequence[str], path: Path) -> list[int]:
    """Map label cells to class ids: a class name, or its integer id, is accepted."""
    by_name = {name: i for i, name in enumerate(label_names)}
    by_id = {str(i): i for i in range(len(label_names))}
    ids: list[int] = []
    for row, value in enumerate(values, start=1):
        value = value.strip()
        digits = value.lstrip("0") or "0"  # "02" is id 2; no int(): it raises past 4300 digits
        if value in by_name:
            ids.append(by_name[value])
        elif value.isascii() and value.isdigit() and digits in by_id:
            ids.append(by_id[digits])
        else:
            shown = value if len(value) <= 80 else value[:80] + "..."  # a 5 MB cell stays readable
            raise UserError(f"{path} row {row}: unknown label {shown!r} (expected one of "
                            f"{', '.join(label_names)} or an id 0-{len(label_names) - 1})")
    return ids


def load_labelled(path: Path, text_column: str, label_column: str,
                  label_names: Sequence[str]) -> pd.DataFrame:
    """Read a table and return it as validated `text` (non-empty str) and `label` (int) columns."""
    df = read_table(path)
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} "
                        f"(found {column_list(df.columns)})")
    if df.empty:
        raise UserError(f"{path}: no data rows")
    texts = df[text_column].astype(str)
    empty = texts.str.strip() == ""
    if empty.any():
        row = int(empty.to_numpy().nonzero()[0][0]) + 1
        raise UserError(f"{path} row {row}: empty text in column {text_column!r}")
    labels = parse_labels(df[label_column].astype(str).tolist(), label_names, path)
    return pd.DataFrame({"text": texts.tolist(), "label": labels})


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


def load_tokenized(directory: Path) -> tuple[dict[str, tuple[list[list[int]], list[int] | None]], dict]:
    """The tokenize stage's output: {split: (token id lists, label ids or None)} and its pipeline.json."""
    import datasets

    from stages.lib.io import read_json, require_dir

    directory = require_dir(directory, "tokenized dataset")
    meta = read_json(directory / "pipeline.json")
    dataset = datasets.load_from_disk(str(directory / "dataset"))
    # language-model blocks have no labels: (blocks, None)
    return {name: (part["input_ids"], part["label"] if "label" in part.column_names else None)
            for name, part in dataset.items()}, meta

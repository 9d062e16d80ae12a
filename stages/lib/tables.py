"""Reading and validating labelled text tables (CSV, JSON Lines, Parquet) and text corpora.

Every cell is read as text; a malformed file, a missing column, an empty text or an unknown
label is one UserError line naming the file and row.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

from stages.lib.params import UserError

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
CORPUS_SUFFIXES = (".txt", ".txt.gz")
# A text corpus directory: train.txt, and optionally validation (either name) and test.
CORPUS_NAMES = {"train": ("train",), "validation": ("validation", "valid"), "test": ("test",)}


def find_table(directory: Path, stem: str, suffixes: tuple[str, ...] = TABLE_SUFFIXES,
               layout: str = "") -> Path:
    """The one file `<stem><suffix>` in a directory, for one of `suffixes`; `layout` says what
    its rows must hold, for the error line."""
    found = [directory / f"{stem}{s}" for s in suffixes if (directory / f"{stem}{s}").is_file()]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise UserError(f"{directory}: {what} {stem} file (expected exactly one of "
                        f"{', '.join(stem + s for s in suffixes)}{layout})")
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

"""predict: label new text with an exported (or trained) adapter.

    qlora-predict --model models/export --input in.csv --output out.csv
    qlora-predict --model models/export "Stocks rally as oil prices fall" ...
    qlora-predict --model models/export --merged --compile --batch-size 2048 --input ...  # GPU

(or python -m stages.cli.predict).

The input CSV needs a `text` column; its other columns are kept, and `label_id`, `label` (the
class name) and `score` (the class probability) are added (an input column of one of those names
is kept as `<name>_input`). Large files are read and written in chunks; the output (CRLF line
ends, as RFC 4180 has them) appears only when complete. Texts given on the command line print
one `label<TAB>score<TAB>text` line each.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from stages.lib.adapter import Classifier, load_adapter
from stages.lib.io import atomic_file, run_main
from stages.lib.params import UserError
from stages.lib.quantized import memory_hint
from stages.lib.tables import column_list, reject_surplus_fields

CHUNK_ROWS = 20_000


def predict_texts(classifier: Classifier, texts: Sequence[str], batch_size: int) -> pd.DataFrame:
    """label_id, label and score columns for `texts`, in order."""
    label_id, score = classifier.top_labels(classifier.logits(classifier.encode(texts), batch_size))
    return pd.DataFrame({"label_id": label_id, "label": [classifier.labels[i] for i in label_id.tolist()],
                         "score": score.round(6)})


OUTPUT_COLUMNS = ("label_id", "label", "score")


def renamed(columns: Sequence[str], announce: bool) -> dict[str, str]:
    """Input columns that clash with the added ones keep their data under `<name>_input`
    (`<name>_input_input` if the input has that too: output columns must stay unique)."""
    taken = set(columns)
    clashes = {}
    for c in columns:
        if c in OUTPUT_COLUMNS:
            new = f"{c}_input"
            while new in taken:
                new += "_input"
            clashes[c] = new
            taken.add(new)
    if clashes and announce:
        print(f"input columns renamed in the output: {clashes}", file=sys.stderr)
    return clashes


def predict_csv(classifier: Classifier, src: Path, dst: Path, batch_size: int) -> int:
    """Label every row of a CSV file in chunks; returns the number of rows written."""
    if not src.is_file():
        raise UserError(f"{src}: input file not found")
    rows = 0
    try:
        chunks = pd.read_csv(src, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS,
                             encoding="utf-8-sig")
        with atomic_file(dst, encoding="utf-8", newline="") as out, \
                tqdm(desc="rows", unit="row", disable=None) as bar:
            for chunk in chunks:
                if "text" not in chunk.columns:
                    raise UserError(f"{src}: no `text` column (found {column_list(chunk.columns)})")
                reject_surplus_fields(chunk, src)
                if chunk.empty:
                    continue
                result = predict_texts(classifier, chunk["text"].tolist(), batch_size)
                kept = chunk.reset_index(drop=True).rename(columns=renamed(chunk.columns, rows == 0))
                labelled = pd.concat([kept, result], axis=1)
                # CRLF rows: Python's csv writer quotes a field holding a line terminator char, so
                # under the default "\n" a text with a bare "\r" went out unquoted and split its row
                labelled.to_csv(out, index=False, header=rows == 0, lineterminator="\r\n")
                rows += len(chunk)
                bar.update(len(chunk))
            if rows == 0:  # inside the block, so no output file is left behind
                raise UserError(f"{src}: no data rows")
    except pd.errors.EmptyDataError:
        raise UserError(f"{src}: empty file (expected a header row with a `text` column)") from None
    except pd.errors.ParserError as e:
        raise UserError(f"{src}: malformed CSV ({str(e).strip().splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{src}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    return rows


def check_output(output: Path, src: Path) -> None:
    """Refuse an --output that cannot be written or would destroy the input, before any work."""
    if output.is_dir():
        raise UserError(f"--output {output}: is a directory (expected a CSV file to write)")
    if output.resolve() == src.resolve() or (output.exists() and output.samefile(src)):
        raise UserError(f"--output {output}: the same file as --input (refusing to overwrite the input)")
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--output {output}: {parent} is not a directory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported bundle or adapter directory")
    parser.add_argument("--input", type=Path, help="CSV with a text column")
    parser.add_argument("--output", type=Path, help="CSV to write (required with --input)")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    parser.add_argument("--merged", action="store_true",
                        help="merge LoRA into the base dequantized once (as evaluate.merged): much faster on a GPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (as evaluate.compile; GPUs)")
    parser.add_argument("texts", nargs="*", help="texts to label, printed one per line")
    args = parser.parse_args(argv)

    def work() -> None:
        if bool(args.input) != bool(args.output):
            raise UserError("--input and --output go together")
        if not args.input and not args.texts:
            raise UserError("nothing to label: give --input/--output or texts")
        if args.batch_size < 1:
            raise UserError(f"--batch-size: expected int >= 1, got {args.batch_size}")
        if args.input and not args.input.is_file():  # before the slow model load
            raise UserError(f"{args.input}: input file not found")
        if args.output:
            check_output(args.output, args.input)
        classifier = load_adapter(args.model, merged=args.merged, compile=args.compile)
        with memory_hint("--batch-size", args.batch_size):
            if args.texts:
                result = predict_texts(classifier, args.texts, args.batch_size)
                for text, row in zip(args.texts, result.itertuples()):
                    print(f"{row.label}\t{row.score:.4f}\t{text}")
            if args.input:
                rows = predict_csv(classifier, args.input, args.output, args.batch_size)
                print(f"labelled {rows} rows -> {args.output}", file=sys.stderr)

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())

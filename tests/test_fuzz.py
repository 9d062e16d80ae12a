"""Fuzz tests: hostile tables into the data loaders and the predict CLI, and a million rows streamed.

The contract for every input: it loads (valid `text` and `label` columns; predict: one output
row per input row) or fails with a `UserError` whose one-line message names the file. Any other
exception, a hang, a partial output or a leftover temporary is a bug. Hypothesis runs
derandomized, so every run sees the same cases; the counts keep the file near 90 seconds on a
2-core CPU (`pytest --hypothesis-show-statistics` prints how the cases ended).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from helpers import LABELS, ROOT, Pipeline, error_message, leftovers
from stages.lib.io import run_main
from stages.lib.adapter import Classifier, load_adapter
from stages.lib.params import UserError
from stages.cli.predict import OUTPUT_COLUMNS, predict_csv
from stages.lib.tables import load_labelled, read_table


def fuzz(examples: int) -> settings:
    """The same cases every run (derandomize), no example database, no per-case deadline."""
    return settings(derandomize=True, max_examples=examples, deadline=None, database=None)


# --- strategies -----------------------------------------------------------------------------

ENCODINGS = ("utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16", "utf-16-le", "utf-16-be")
# What breaks naive CSV and JSON handling: delimiters, quotes, line ends, NUL, BOM, non-ASCII.
NASTY = ',"\'\n\r\x00\t\ufeff\\{}[]: é€😀'
cells = st.text(st.one_of(st.sampled_from(NASTY), st.characters(codec="utf-8")), max_size=20)
texts = cells.filter(str.strip)  # what load_labelled must accept: not blank
labels = st.sampled_from([*LABELS, "0", "3", " 2 ", "03"])
bad_labels = st.one_of(cells, st.sampled_from(["4", "-1", "1.0", "sports", "9" * 5000]))
column_names = st.one_of(st.sampled_from(["text", "label", "id", "Text", "", "text\n", "label_id",
                                          "score", "label_input"]), cells)
line_ends = st.sampled_from(["\n", "\r\n", "\r"])


def write_csv(rows: list[list[str]], line_end: str) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator=line_end).writerows(rows)
    return out.getvalue()


def column_cells(name: str) -> st.SearchStrategy[str]:
    """What a clean row holds under a header name."""
    return {"text": texts, "label": labels}.get(name, cells)


@st.composite
def csv_texts(draw: st.DrawFn) -> str:
    """A header with text and label, or with any names; clean rows, or ragged ones with blank
    texts and unknown labels among them; quoted as the csv module does, or joined raw."""
    header = draw(st.sampled_from([["text", "label"], ["id", "label", "text"], None]))
    if header is None:  # one case in three: any names, most often without text or label
        header = draw(st.lists(column_names, max_size=4))
    good = st.tuples(*map(column_cells, header)).map(list)
    bad = st.lists(cells | labels | bad_labels, max_size=len(header) + 2)
    rows = [header, *draw(st.lists(good if draw(st.booleans()) else good | bad, max_size=6))]
    if draw(st.booleans()):
        return write_csv(rows, draw(line_ends))
    return draw(line_ends).join(",".join(r) for r in rows)  # stray quotes, commas, newlines


@st.composite
def encoded(draw: st.DrawFn, text: st.SearchStrategy[str]) -> bytes:
    """Text in any of ENCODINGS, maybe behind a UTF-8 BOM, maybe cut short (a torn download)."""
    encoding = draw(st.just("utf-8") | st.sampled_from(ENCODINGS))  # half the files decode
    data = draw(text).encode(encoding, errors="replace")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if draw(st.integers(0, 3)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | cells,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(cells, inner, max_size=3), max_leaves=8)
json_keys = st.sampled_from(["text", "label", "id"]) | cells


def dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)  # raw non-ASCII, so the encoding matters


@st.composite
def jsonl_texts(draw: st.DrawFn) -> str:
    """Clean lines, or among them objects with other keys and values, other JSON values
    (arrays, scalars, NaN) and lines that are not JSON at all."""
    good = st.fixed_dictionaries({"text": texts, "label": labels | st.integers(0, 3)},
                                 optional={"id": json_values}).map(dumps)
    bad = st.one_of(st.dictionaries(json_keys, json_values | labels, max_size=4).map(dumps),
                    json_values.map(dumps), cells)
    lines = draw(st.lists(good if draw(st.booleans()) else good | bad, min_size=1, max_size=6))
    return draw(line_ends).join(lines)


def arrow_arrays(n: int) -> st.SearchStrategy[pa.Array]:
    """n values of one Arrow type, nulls included; dictionary arrays come back as categoricals."""
    def of(values: st.SearchStrategy, type_: pa.DataType | None = None) -> st.SearchStrategy[pa.Array]:
        return st.lists(st.none() | values, min_size=n, max_size=n).map(lambda v: pa.array(v, type_))

    return st.one_of(of(texts), of(labels | bad_labels, pa.string()),
                     of(labels | cells, pa.string()).map(lambda a: a.dictionary_encode()),
                     of(st.integers(-2**63, 2**63 - 1), pa.int64()), of(st.floats(), pa.float64()),
                     of(st.booleans(), pa.bool_()), of(st.binary(max_size=8), pa.binary()),
                     of(st.lists(cells, max_size=2), pa.list_(pa.string())))


@st.composite
def parquet_bytes(draw: st.DrawFn) -> bytes:
    """A clean table as pandas writes it (with its metadata in the footer, maybe categorical),
    or Arrow columns of any type and name; then maybe cut short or with bytes flipped."""
    n = draw(st.integers(0, 5))
    out = io.BytesIO()
    if draw(st.booleans()):
        df = pd.DataFrame({"text": draw(st.lists(texts, min_size=n, max_size=n)),
                           "label": draw(st.lists(labels, min_size=n, max_size=n)
                                         | st.lists(st.integers(0, 3), min_size=n, max_size=n))})
        (df.astype("category") if draw(st.booleans()) else df).to_parquet(out)
    else:
        names = draw(st.lists(column_names, max_size=3) | st.just(["text", "label"]))
        pq.write_table(pa.Table.from_arrays([draw(arrow_arrays(n)) for _ in names], names=names), out)
    data = bytearray(out.getvalue())
    how = draw(st.sampled_from(["whole", "cut", "flip"]))
    if how == "cut":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif how == "flip":  # hits the data pages, or the pandas metadata JSON in the footer
        for i in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=3)):
            data[i] ^= draw(st.integers(1, 255))
    return bytes(data)


hostile_csv = st.one_of(st.binary(max_size=200), encoded(csv_texts()))
hostile_jsonl = st.one_of(st.binary(max_size=200), encoded(jsonl_texts()))
hostile_parquet = st.one_of(st.binary(max_size=200), parquet_bytes())


# --- contracts ------------------------------------------------------------------------------

@contextlib.contextmanager
def scratch(name: str, data: bytes) -> Iterator[Path]:
    """`data` as a file in a fresh directory (a function-scoped tmp_path would be shared by
    every Hypothesis example)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        yield path


def error_kind(message: str, path: Path) -> str:
    """A one-line message that names the file, reduced to its kind for the statistics
    (`row N: unknown label`)."""
    assert message.startswith(str(path)), message
    assert "\n" not in message and "\r" not in message, repr(message)
    return re.split(r"[(']", re.sub(r"(?<![\w-])\d+", "N", message[len(str(path)):]))[0].strip(" :")


def check_loaders(path: Path) -> str:
    """read_table and load_labelled on one file: a valid table, or a UserError naming the file."""
    try:
        table = read_table(path)
    except UserError as e:
        return "read_table: " + error_kind(str(e), path)
    assert all(isinstance(v, str) for column in table.columns for v in table[column])
    try:
        df = load_labelled(path, "text", "label", LABELS)
    except UserError as e:
        return "load_labelled: " + error_kind(str(e), path)
    assert list(df.columns) == ["text", "label"] and len(df) == len(table) > 0
    assert all(isinstance(t, str) and t.strip() for t in df["text"])
    assert df["label"].dtype.kind == "i" and df["label"].between(0, len(LABELS) - 1).all()
    return "loaded"


# --- the loaders: hostile files -------------------------------------------------------------

@fuzz(400)
@given(data=hostile_csv)
def test_load_csv_loads_or_names_the_file(data: bytes) -> None:
    with scratch("train.csv", data) as path:
        event(check_loaders(path))


@fuzz(300)
@given(data=hostile_jsonl)
def test_load_jsonl_loads_or_names_the_file(data: bytes) -> None:
    with scratch("train.jsonl", data) as path:
        event(check_loaders(path))


@fuzz(300)
@given(data=hostile_parquet)
def test_load_parquet_loads_or_names_the_file(data: bytes) -> None:
    with scratch("train.parquet", data) as path:
        event(check_loaders(path))


# --- the loaders: valid files round-trip exactly --------------------------------------------

valid_rows = st.lists(st.tuples(texts, labels), min_size=1, max_size=8)


def label_ids(rows: list[tuple[str, str]]) -> list[int]:
    return [LABELS.index(v) if v in LABELS else int(v) for _, v in rows]


@fuzz(80)
@given(rows=valid_rows, line_end=line_ends, bom=st.booleans(), extra=st.booleans())
def test_load_csv_keeps_every_text_exactly(rows: list[tuple[str, str]], line_end: str, bom: bool,
                                           extra: bool) -> None:
    """Quotes, commas, CR/LF, NUL and BOMs inside cells survive; a BOM before the header is not
    part of the first column's name; unrelated columns are ignored."""
    table = [["id", "label", "text"] if extra else ["text", "label"]]
    table += [[str(i), label, text] if extra else [text, label] for i, (text, label) in enumerate(rows)]
    data = write_csv(table, line_end).encode("utf-8-sig" if bom else "utf-8")
    with scratch("train.csv", data) as path:
        df = load_labelled(path, "text", "label", LABELS)
    assert df["text"].tolist() == [text for text, _ in rows]
    assert df["label"].tolist() == label_ids(rows)


@fuzz(50)
@given(rows=valid_rows, suffix=st.sampled_from([".jsonl", ".parquet"]))
def test_load_jsonl_and_parquet_keep_every_text_exactly(rows: list[tuple[str, str]],
                                                        suffix: str) -> None:
    df = pd.DataFrame(rows, columns=["text", "label"])
    out = io.BytesIO()
    if suffix == ".jsonl":
        df.to_json(out, orient="records", lines=True)
    else:
        df.to_parquet(out)
    with scratch(f"train{suffix}", out.getvalue()) as path:
        loaded = load_labelled(path, "text", "label", LABELS)
    assert loaded["text"].tolist() == df["text"].tolist()
    assert loaded["label"].tolist() == label_ids(rows)


# --- the loaders: regressions, big cells and a million rows ---------------------------------

CHOICES = "(expected one of World, Sports, Business, Sci/Tech or an id 0-3)"


@pytest.mark.parametrize(("name", "data", "expected"), [
    ("shifted.csv", b"text,label\nnote,Stocks rally,1\n",
     "{path}: data rows have 3 fields but the header has 2 (expected one field per header column)"),
    ("mixed.jsonl", b'{"text": "a", "label": 1}\n1\n',
     "{path}: malformed jsonl (expected one JSON object per line)"),
    ("null-label.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": null}\n',
     "{path} row 2: unknown label '' " + CHOICES),
    ("header-newline.csv", b'"te\nxt",label\na,1\n',
     "{path}: missing column(s) text (found 'te\\nxt', label)"),
    ("long-id.csv", b"text,label\na," + b"9" * 5000 + b"\n",
     "{path} row 1: unknown label '" + "9" * 80 + "...' " + CHOICES),
], ids=["surplus-field", "jsonl-non-object", "jsonl-null-in-int-column", "header-newline",
        "label-of-5000-digits"])
def test_load_regressions(tmp_path: Path, name: str, data: bytes, expected: str) -> None:
    """Bugs these fuzz tests found in stages/lib/data.py (as committed): pandas made a surplus
    leading field the index and every column shifted silently; a non-object JSON line raised
    TypeError; a null in an int column made row 1's label `1.0`, reported as unknown; a newline
    in a column name split the one-line message; int() of a 5000-digit label raised ValueError."""
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UserError) as info:
        load_labelled(path, "text", "label", LABELS)
    assert str(info.value) == expected.format(path=path)


def test_load_parquet_categorical_with_nulls(tmp_path: Path) -> None:
    """Regression: fillna('') on a categorical column raised TypeError (pandas keeps Parquet
    dictionary columns as categoricals)."""
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": pa.array(["a", None]).dictionary_encode(), "label": [0, 1]}), path)
    with pytest.raises(UserError, match=r"train\.parquet row 2: empty text in column 'text'$"):
        load_labelled(path, "text", "label", LABELS)


BIG_CELL = "word " * 1_000_000  # 5 MB
LOAD_IN_CHILD = """\
import json, sys
from pathlib import Path
from stages.lib.tables import load_labelled
from stages.lib.params import UserError
for path in sys.argv[1:]:
    try:
        df = load_labelled(Path(path), "text", "label", {labels!r})
        print(json.dumps(["loaded", len(df), df["text"].str.len().tolist(), df["label"].tolist()]))
    except UserError as e:
        print(json.dumps(["error", str(e)]))
"""


def test_load_5mb_cells_in_every_format(tmp_path: Path) -> None:
    """A 5 MB text loads whole; a 5 MB label is a short one-line error. In a child process with
    a timeout, so a hang fails the test instead of stalling the suite."""
    frames = {"text": pd.DataFrame({"text": [BIG_CELL, "short"], "label": ["1", "World"]}),
              "label": pd.DataFrame({"text": ["short"], "label": [BIG_CELL]})}
    for big, df in frames.items():
        df.to_csv(tmp_path / f"big-{big}.csv", index=False)
        df.to_json(tmp_path / f"big-{big}.jsonl", orient="records", lines=True)
        df.to_parquet(tmp_path / f"big-{big}.parquet")
    paths = sorted(tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "-c", LOAD_IN_CHILD.format(labels=LABELS), *map(str, paths)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = dict(zip(paths, map(json.loads, proc.stdout.splitlines())))
    for path, result in results.items():
        if path.stem == "big-text":
            assert result == ["loaded", 2, [len(BIG_CELL), 5], [1, 0]], path
        else:
            assert result[0] == "error"
            assert result[1].startswith(f"{path} row 1: unknown label 'word word")
            assert len(result[1]) < 500, "the 5 MB cell was copied into the message"
    assert len(results) == 6


def test_load_a_million_row_csv(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    n = 1_000_000
    with path.open("w", encoding="utf-8") as f:
        f.write("text,label\n")
        f.writelines(f"row {i} of the news,{LABELS[i % 4] if i % 2 else i % 4}\n" for i in range(n))
    df = load_labelled(path, "text", "label", LABELS)
    assert len(df) == n
    assert df["text"].iloc[-1] == f"row {n - 1} of the news"
    assert (df["label"].to_numpy() == pd.RangeIndex(n).to_numpy() % 4).all()


# --- predict: hostile CSVs, in-process ------------------------------------------------------

@pytest.fixture(scope="module")
def classifier(pipeline: Pipeline) -> Iterator[Classifier]:
    """The exported bundle, loaded once for every example. One intra-op thread while this module
    runs: a few rows per forward pass gain nothing from two, and lose 10x when the two cores are
    busy (see run_cli)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_adapter(pipeline.export)
    torch.set_num_threads(threads)


def check_predict(classifier: Classifier, src: Path) -> str:
    """predict_csv under the CLI's own wrapper: exit 0 and one output row per input row, or exit
    1 with one `error:` line naming the file, no output and no temporaries."""
    dst = src.with_name("out.csv")
    stderr = io.StringIO()
    def work() -> None:  # run_main takes a stage body: it returns an exit status or None
        predict_csv(classifier, src, dst, batch_size=64)

    with contextlib.redirect_stderr(stderr):
        status = run_main(work)
    if status == 1:
        assert not dst.exists() and leftovers(dst.parent) == []
        return "error: " + error_kind(error_message(stderr.getvalue()), src)
    assert status == 0 and leftovers(dst.parent) == []
    # what pandas reads from the whole file in one go: chunking must not lose or shift a row
    expected = pd.read_csv(src, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    with dst.open(encoding="utf-8", newline="") as f:
        header = next(csv.reader(f))  # as written: pandas would rename a duplicate on reading
    assert header[-3:] == list(OUTPUT_COLUMNS)
    assert len(header) == len(set(header)) == len(expected.columns) + 3
    out = pd.read_csv(dst, dtype=str, keep_default_na=False)
    assert out.iloc[:, :-3].to_numpy().tolist() == expected.to_numpy().tolist()
    assert out["label"].tolist() == [LABELS[int(i)] for i in out["label_id"]]
    assert out["score"].astype(float).between(1 / len(LABELS) - 1e-6, 1).all()
    return "labelled"


text_column_csv = csv_texts().map(lambda t: "text," + t)  # most cases get past the header check


@fuzz(200)
@given(data=st.one_of(hostile_csv, encoded(text_column_csv)))
def test_predict_csv_labels_every_row_or_names_the_file(classifier: Classifier, data: bytes) -> None:
    with scratch("in.csv", data) as src:
        event(check_predict(classifier, src))


@fuzz(40)
@given(header=st.lists(column_names, max_size=2), line_end=line_ends, bom=st.booleans(),
       rows=st.lists(st.tuples(cells, cells, cells), min_size=1, max_size=6))
def test_predict_csv_keeps_well_formed_rows(classifier: Classifier, header: list[str], line_end: str,
                                            bom: bool, rows: list[tuple[str, str, str]]) -> None:
    """Any well-formed CSV with a text column is labelled row for row, its columns kept, empty
    texts included."""
    table = [["text", *header], *(list(row[:len(header) + 1]) for row in rows)]
    data = write_csv(table, line_end).encode("utf-8-sig" if bom else "utf-8")
    with scratch("in.csv", data) as src:
        assert check_predict(classifier, src) == "labelled"


@pytest.mark.parametrize("data", [b'id,text\n1,"\r"\n2,"a\rb"\n', b"text,label,label_input\nhi,1,x\n"],
                         ids=["bare-cr", "label-and-label_input"])
def test_predict_csv_regressions(classifier: Classifier, tmp_path: Path, data: bytes) -> None:
    """Bugs these fuzz tests found in stages/predict.py (as committed): written with "\n" line
    ends, a text holding a bare "\r" went out unquoted and its row split in two when read back;
    an input with both `label` and `label_input` got two `label_input` columns."""
    src = tmp_path / "in.csv"
    src.write_bytes(data)
    assert check_predict(classifier, src) == "labelled"


def test_predict_csv_5mb_cell(classifier: Classifier, tmp_path: Path) -> None:
    """A 5 MB text is truncated to max_length like any other."""
    src = tmp_path / "in.csv"
    pd.DataFrame({"id": ["a", "b"], "text": [BIG_CELL, "short"]}).to_csv(src, index=False)
    assert check_predict(classifier, src) == "labelled"


# --- predict: the real CLI in a child process -----------------------------------------------

class CliRun(NamedTuple):
    status: int
    stderr: str
    peak_mib: int  # the child's own peak RSS


class HostileRun(NamedTuple):
    src: Path
    dst: Path
    run: CliRun


# Runs a command and reports its peak RSS: a process forked straight from pytest would report
# pytest's own peak, which Linux carries into ru_maxrss across fork and exec.
MEASURE_RSS = ("import resource, subprocess, sys; status = subprocess.call(sys.argv[1:]); "
               "print('peak_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
               "file=sys.stderr); sys.exit(status)")


def run_cli(args: list[str], timeout: float) -> CliRun:
    """`python -m stages.cli.predict ARGS` under MEASURE_RSS, killed after `timeout` seconds."""
    # One intra-op thread: on a 2-core box shared with other processes, OpenMP threads spin
    # against each other and the million-row run took 222 s instead of 54 s.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", MEASURE_RSS, sys.executable, "-m", "stages.cli.predict", *args]
    with subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI as well as the launcher
            raise
    stderr, _, peak_kib = stderr.rpartition("peak_kib ")
    return CliRun(proc.returncode, stderr, int(peak_kib) // 1024)


@pytest.fixture(scope="module")
def hostile_cli_run(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> HostileRun:
    """The CLI on a file whose rows have one field more than the header: it loads the model,
    then fails on the file. Its peak RSS is the baseline the million-row run is held to."""
    work = tmp_path_factory.mktemp("hostile-cli")
    src, dst = work / "in.csv", work / "out.csv"
    src.write_bytes(b'\xef\xbb\xbftext\r\nnote,"Stocks\x00 ""rally"",\r\n and more"\r\n')
    return HostileRun(src, dst, run_cli(["--model", str(pipeline.export), "--input", str(src),
                                         "--output", str(dst)], timeout=120))


def test_predict_cli_hostile_file_is_one_error_line(hostile_cli_run: HostileRun) -> None:
    """Regression (stages/predict.py as committed): pandas made the surplus first field the
    index, so the CLI labelled the second field and dropped the first column, exit 0."""
    src, dst, run = hostile_cli_run
    assert run.status == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert error_message(run.stderr) == (
        f"{src}: data rows have 2 fields but the header has 1 (expected one field per header column)")
    assert not dst.exists() and leftovers(dst.parent) == []


def test_predict_cli_streams_a_million_rows(pipeline: Pipeline, tmp_path: Path,
                                            hostile_cli_run: HostileRun) -> None:
    """1,000,000 short rows (53 s on this 2-core CPU, at --batch-size 1024) in chunks of 20,000:
    peak RSS stays within 300 MiB of a run that only loads the model (measured: 614 MiB against
    527). Reading the whole file at once (CHUNK_ROWS above a million) peaked at 2613 MiB."""
    n = 1_000_000
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    words = "stocks rally oil team wins cup chip maker profit election rain".split()
    with src.open("w", encoding="utf-8") as f:
        f.write("id,text\n")
        f.writelines(f"{i},{words[i % 11]} {words[i * 7 % 11]}\n" for i in range(n))
    start = time.monotonic()
    run = run_cli(["--model", str(pipeline.export), "--input", str(src), "--output", str(dst),
                   "--batch-size", "1024"], timeout=300)
    print(f"predict CLI: {n} rows in {time.monotonic() - start:.1f} s, peak RSS {run.peak_mib} MiB "
          f"(model alone {hostile_cli_run.run.peak_mib} MiB)")  # shown by pytest -rP
    assert run.status == 0, run.stderr
    assert f"labelled {n} rows -> {dst}" in run.stderr
    out = pd.read_csv(dst, usecols=["id", "label"], dtype={"id": int, "label": str})
    assert (out["id"].to_numpy() == pd.RangeIndex(n).to_numpy()).all()
    assert set(out["label"]) <= set(LABELS)
    baseline = hostile_cli_run.run.peak_mib
    assert run.peak_mib < baseline + 300, f"peak RSS {run.peak_mib} MiB, model alone {baseline} MiB"

"""Build data/instructions/{train,test}.jsonl: instruction rows with short, checkable answers,
made from the real data shipped in data/banking77 and data/ag_news (see README.md here).

    python data/instructions/build.py

Deterministic: a fixed seed, the sources read in their file order, rows written with sorted
keys; rerunning it gives the same bytes. Train rows come only from the sources' train files,
test rows only from their test files.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent
SEED = 20261202
TRAIN_PER_SOURCE = 1000
TEST_PER_SOURCE = 100
AG_NEWS_TOPICS = ("World", "Sports", "Business", "Sci/Tech")  # label ids 0-3, data/ag_news/README.md
BANKING77_INSTRUCTION = ("Which banking intent does this customer message express? "
                         "Answer with the intent name only.")
AG_NEWS_INSTRUCTION = ("What is the topic of this news item? "
                       "Answer with one of: World, Sports, Business, Sci/Tech.")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def banking77_rows(split: str) -> list[dict[str, str]]:
    """A customer query -> its intent name (one of 77, e.g. card_arrival)."""
    return [{"instruction": BANKING77_INSTRUCTION, "input": r["text"].strip(), "output": r["label"],
             "source": "banking77"} for r in read_csv(DATA / "banking77" / f"{split}.csv")]


def ag_news_rows(split: str) -> list[dict[str, str]]:
    """A news item (title and description) -> its topic name."""
    return [{"instruction": AG_NEWS_INSTRUCTION, "input": r["text"].strip(),
             "output": AG_NEWS_TOPICS[int(r["label"])], "source": "ag_news"}
            for r in read_csv(DATA / "ag_news" / f"{split}.csv")]


def balanced_sample(rows: list[dict[str, str]], count: int, rng: random.Random) -> list[dict[str, str]]:
    """`count` rows, as even over the answers as the counts allow (the first answers in sorted
    order get one more), each answer's rows drawn at random."""
    by_answer: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_answer.setdefault(row["output"], []).append(row)
    answers = sorted(by_answer)
    share, extra = divmod(count, len(answers))
    picked = []
    for k, answer in enumerate(answers):
        picked += rng.sample(by_answer[answer], share + (k < extra))
    return picked


def build(split: str, per_source: int, rng: random.Random) -> list[dict[str, str]]:
    rows = balanced_sample(banking77_rows(split), per_source, rng) + balanced_sample(ag_news_rows(split), per_source, rng)
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng = random.Random(SEED)
    for split, per_source in (("train", TRAIN_PER_SOURCE), ("test", TEST_PER_SOURCE)):
        rows = build(split, per_source, rng)
        path = HERE / f"{split}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()

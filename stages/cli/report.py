"""report: compare experiments after a sweep, as a Markdown table and two scatter plots.

    qlora-report --out reports/             # runs `dvc exp show --json -A`
    qlora-report --input exps.json --out reports/   # or python -m stages.cli.report

Writes <out>/experiments.md (one row per experiment: the params that differ between them, the
task type, test accuracy and macro-F1 or perplexity, trainable parameters, training time and
speed, peak memory), and <out>/accuracy_vs_trainable.png and <out>/accuracy_vs_train_time.png
(the classifiers). Not a DVC stage: it reads
DVC's record of experiments, not pipeline outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from stages.lib.io import atomic_dir, run_main
from stages.lib.params import UserError

METRICS = {  # column -> (metrics file, key)
    "task": ("metrics/train/metrics.json", "task"),
    "accuracy": ("metrics/evaluate/metrics.json", "accuracy"),
    "f1_macro": ("metrics/evaluate/metrics.json", "f1_macro"),
    "perplexity": ("metrics/evaluate/metrics.json", "perplexity"),
    "trainable_percent": ("metrics/train/metrics.json", "trainable_percent"),
    "trainable_params": ("metrics/train/metrics.json", "trainable_params"),
    "train_time_s": ("metrics/train/timing.json", "train_time_s"),
    "samples_per_s": ("metrics/train/timing.json", "samples_per_s"),
    "peak_memory_mb": ("metrics/train/timing.json", "peak_memory_mb"),
    "device": ("metrics/train/metrics.json", "device"),
}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


def collect(exp_show: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per experiment that has metrics, from `dvc exp show --json` output."""
    rows = []
    for baseline in exp_show:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                metrics = data.get("metrics") or {}
                if "metrics/evaluate/metrics.json" not in metrics:
                    continue  # failed or still queued
                row = {"experiment": rev.get("name") or rev["rev"][:7]}
                row.update(_flatten(data.get("params", {}).get("params.yaml", {}).get("data", {})))
                for column, (path, key) in METRICS.items():
                    row[column] = (metrics.get(path, {}).get("data") or {}).get(key)
                rows.append(row)
    if not rows:
        raise UserError("no experiments with metrics to compare (run some with dvc exp run)")
    df = pd.DataFrame(rows)
    params = [c for c in df.columns if "." in c]
    varying = [c for c in params if df[c].astype(str).nunique() > 1]
    df = df[["experiment", *varying, *METRICS]].sort_values(["accuracy", "perplexity"], ascending=[False, True])
    return df.dropna(axis=1, how="all")  # e.g. perplexity in a sweep of classifiers


def to_markdown(df: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def scatter(df: pd.DataFrame, x: str, xlabel: str, path: Path) -> None:
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # no font-cache chatter
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "accuracy" not in df:
        return
    df = df.dropna(subset=["accuracy"])  # language models have no accuracy
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter(df[x], df["accuracy"], color="#6c3fc9")
    for row in df.itertuples(index=False):
        ax.annotate(row.experiment, (getattr(row, x), row.accuracy), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel=xlabel, ylabel="test accuracy", title=f"Test accuracy vs {xlabel}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, help="saved `dvc exp show --json` output")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    args = parser.parse_args(argv)

    def work() -> None:
        if args.input:
            try:
                text = args.input.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise UserError(f"{args.input}: not found") from None
        else:
            proc = subprocess.run(["dvc", "exp", "show", "--json", "-A"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise UserError(f"dvc exp show failed: {proc.stderr.strip().splitlines()[-1:]}")
            text = proc.stdout
        try:
            exp_show = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{args.input or 'dvc exp show'}: not valid JSON ({e})") from None
        df = collect(exp_show)
        with atomic_dir(args.out) as tmp:
            (tmp / "experiments.md").write_text(to_markdown(df), encoding="utf-8")
            scatter(df, "trainable_percent", "trainable parameters (% of the model)",
                    tmp / "accuracy_vs_trainable.png")
            scatter(df, "train_time_s", "training time (s)", tmp / "accuracy_vs_train_time.png")
        print(f"{len(df)} experiments -> {args.out}", file=sys.stderr)

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())

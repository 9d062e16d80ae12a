"""stages.cli.report: the sweep comparison built from `dvc exp show --json` output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import error_message, leftovers
from stages.cli import report


def _exp(name: str, r: int, accuracy: float | None) -> dict:
    params = {"lora": {"r": r, "alpha": 32}, "train": {"lr": 0.001}}
    metrics = {} if accuracy is None else {
        "metrics/evaluate/metrics.json": {"data": {"accuracy": accuracy, "f1_macro": accuracy - 0.01}},
        "metrics/train/metrics.json": {"data": {"trainable_percent": 0.04 * r, "trainable_params": 9300 * r,
                                                "device": "cpu"}},
        "metrics/train/timing.json": {"data": {"train_time_s": 60.0 + r, "samples_per_s": 50.0,
                                               "peak_memory_mb": 3000.0}}}
    return {"revs": [{"rev": f"{r:040d}", "name": name,
                      "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics}}]}


EXP_SHOW = [{"rev": "workspace", "experiments": None},
            {"rev": "a" * 40, "experiments": [_exp("rank-4", 4, 0.81), _exp("rank-16", 16, 0.85),
                                              _exp("failed", 0, None)]}]


def test_collect_keeps_finished_runs_and_the_params_that_vary() -> None:
    df = report.collect(EXP_SHOW)
    assert df["experiment"].tolist() == ["rank-16", "rank-4"]  # best accuracy first, failed left out
    assert [c for c in df.columns if "." in c] == ["lora.r"]  # alpha and lr are the same in both
    assert df["trainable_params"].tolist() == [148800, 37200]


def test_main_writes_the_table_and_both_plots(tmp_path: Path, capsys) -> None:
    src = tmp_path / "exps.json"
    src.write_text(json.dumps(EXP_SHOW))
    assert report.main(["--input", str(src), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "experiments.md").read_text().splitlines()
    assert table[0].startswith("| experiment | lora.r | accuracy | f1_macro |")
    assert table[2].startswith("| rank-16 | 16 | 0.85 | 0.84 |")
    for png in ("accuracy_vs_trainable.png", "accuracy_vs_train_time.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 experiments ->" in capsys.readouterr().err


def test_language_model_runs_sit_beside_the_classifiers(tmp_path: Path) -> None:
    """A recipe switch in the same sweep: the perplexity column appears, the LM row sorts after
    the classifiers, and the accuracy plots still show the classifiers."""
    lm = _exp("clm", 8, 0.5)
    lm["revs"][0]["data"]["metrics"]["metrics/evaluate/metrics.json"]["data"] = {"loss": 7.7, "perplexity": 2180.3}
    lm["revs"][0]["data"]["metrics"]["metrics/train/metrics.json"]["data"]["task"] = "causal-lm"
    exps = [{"rev": "a" * 40, "experiments": [_exp("rank-16", 16, 0.85), lm]}]
    src = tmp_path / "exps.json"
    src.write_text(json.dumps(exps))
    assert report.main(["--input", str(src), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "experiments.md").read_text().splitlines()
    assert table[0].startswith("| experiment | lora.r | task | accuracy | f1_macro | perplexity |")
    assert table[2].startswith("| rank-16 |") and table[3].startswith("| clm | 8 | causal-lm |")
    assert "2180" in table[3]
    assert (tmp_path / "report" / "accuracy_vs_trainable.png").is_file()


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    (json.dumps([{"rev": "workspace", "experiments": None}]), "no experiments with metrics to compare"),
])
def test_bad_input_is_one_error_line_and_no_report(tmp_path: Path, capsys, content: str, expected: str) -> None:
    src = tmp_path / "exps.json"
    src.write_text(content)
    assert report.main(["--input", str(src), "--out", str(tmp_path / "report")]) == 1
    assert expected in error_message(capsys.readouterr().err)
    assert not (tmp_path / "report").exists() and leftovers(tmp_path) == []

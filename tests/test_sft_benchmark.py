"""benchmarks/sft_packing.py: --smoke runs packed rows under varlen (a CPU stand-in for the
kernel) and SDPA, and padded rows, end to end on the CPU, and records everything in --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/sft_packing.py"), *flags], capture_output=True,
                          text=True, timeout=900, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_smoke_measures_varlen_sdpa_and_padded_rows(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    done = _run("--smoke", "--attn", "varlen", "sdpa", "--json", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["varlen_kernel"].startswith("cpu stand-in") and report["machine"]["torch"] == torch.__version__
    runs = {(r["attn"], r["layout"]) for r in report["results"]}
    assert runs == {("varlen", "packed"), ("sdpa", "packed"), ("sdpa", "grouped"), ("sdpa", "shuffled")}
    assert {(s["attn"], s["layout"]) for s in report["skipped"]} == {("varlen", "grouped"), ("varlen", "shuffled")}
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 2 for r in report["results"])
    by_run = {(r["attn"], r["layout"]): r for r in report["results"]}
    # the same batches from the same weights: the same losses, whichever attention keeps them apart
    assert abs(by_run["varlen", "packed"]["loss"] - by_run["sdpa", "packed"]["loss"]) < 1e-3
    agreement = report["agreement"]
    for attn in ("varlen", "sdpa"):
        assert abs(agreement[f"packed_{attn}"]["loss_diff"]) < 1e-5
        assert agreement[f"packed_{attn}"]["grad_cosine"] > 1 - 1e-5


def test_varlen_without_a_gpu_is_one_line() -> None:
    done = _run("--attn", "varlen")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "error: varlen attention needs a CUDA GPU; this run is on the cpu"

"""benchmarks/llm.py --smoke: every section of the LLM benchmark runs end to end on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/llm.py"), "--smoke", "--work", str(tmp_path / "work"),
                           "--out", str(out), *flags], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(out.read_text())


def test_smoke_runs_every_section(tmp_path: Path) -> None:
    done, results = _run(tmp_path)
    sections = results["sections"]
    assert set(sections) == {"weights", "standard", "standard-kbit", "ours[2x2+ckpt]", "ours[4x1+offload+fused]", "context[standard]",
                             "context[ours]", "llama70b"}
    assert not [name for name, s in sections.items() if "error" in s]
    assert results["machine"]["transformers"] and results["model"]["parameters"] == 598336
    for name, kbit_prep in (("standard", False), ("standard-kbit", True)):
        standard = sections[name]
        assert len(standard["losses"]) == 2 and standard["tokens_per_s"] > 0
        assert standard["settings"]["kbit_prep"] is kbit_prep
        assert standard["trainer_num_items"][0] in (4 * 63, 4 * 64)  # shifted or not, by transformers version
    for name in ("ours[2x2+ckpt]", "ours[4x1+offload+fused]"):
        ours = sections[name]
        assert ours["tokens_per_s"] > 0 and ours["settings"]["cache_dequantized"] is False
        # fp32 on a CPU: the same maths in another order, equal to float rounding
        # (prepare_model_for_kbit_training's fp32 upcast changes nothing in an fp32 CPU run)
        for versus in ("loss_vs_standard", "loss_vs_standard_kbit"):
            assert ours[versus]["steps"] == 2 and ours[versus]["max_rel_diff"] < 1e-4, (name, versus)
    for recipe in ("standard", "ours"):
        (probe,) = sections[f"context[{recipe}]"]["probes"]
        assert probe["tokens"] == 128 and probe["trained"], probe
    assert len(sections["llama70b"]["losses"]) == 2 and sections["llama70b"]["tokens_per_s"] > 0
    assert "standard step 2/2" in done.stdout and "done in" in done.stdout


def test_a_failing_section_is_recorded_and_the_rest_runs(tmp_path: Path) -> None:
    _, results = _run(tmp_path, "--sections", "ours,llama70b", "--ours-variants", "4x1", "--ce-chunk", "0")
    assert "chunk_tokens must be >= 1" in results["sections"]["ours[4x1]"]["error"]
    assert "chunk_tokens must be >= 1" in results["sections"]["llama70b"]["error"]
    assert "wall_s" in results


def test_memory_at_peak_replays_the_allocator_trace() -> None:
    """--memory: what is live at the step's peak, by the innermost frames outside torch. The
    trace: A (1 GiB, two blocks from one site) and B (3 GiB) live together at the peak; C (3.5 GiB)
    comes after A and B are freed, so the peak is before + 4 GiB with A and B, not with C."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from llm import memory_at_peak
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    gib = 2**30

    def frames(*sites: str) -> list[dict]:
        torch_frame = {"filename": "/x/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"}
        return [torch_frame] + [{"filename": f"/repo/{s}.py", "line": 7, "name": s} for s in sites]

    trace = [{"action": "alloc", "addr": 1, "size": gib // 2, "frames": frames("a", "loop")},
             {"action": "alloc", "addr": 2, "size": gib // 2, "frames": frames("a", "loop")},
             {"action": "alloc", "addr": 3, "size": 3 * gib, "frames": frames("b")},
             {"action": "free_requested", "addr": 1}, {"action": "free_completed", "addr": 1},
             {"action": "free_requested", "addr": 2}, {"action": "free_requested", "addr": 3},
             {"action": "alloc", "addr": 4, "size": 7 * gib // 2, "frames": frames("c")}]
    out = memory_at_peak(trace, before=2 * gib)
    assert (out["before_step_gib"], out["peak_gib"], out["step_peak_over_before_gib"]) == (2.0, 6.0, 4.0)
    assert [line.split(maxsplit=3)[2:] for line in out["at_peak_by_site"]] == [
        ["x1", "b.py:7 b"], ["x2", "a.py:7 a < loop.py:7 loop"]]

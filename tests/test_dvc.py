"""End to end under DVC: `dvc repro` in a temporary git+DVC copy of the project, then invalidation.

The slowest module (every stage is a `python -m stages.<name>` subprocess that imports torch):
one module-scoped repository, reproduced once, then edited one params key at a time. Each edit
continues from the state the previous one left, and asserts exactly which stages `dvc repro` ran.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import ROOT, STAGES, read_yaml, set_key, tiny_overrides, write_yaml

VENV_BIN = Path(sys.executable).parent
DVC = shutil.which("dvc", path=str(VENV_BIN)) or shutil.which("dvc")
RAN = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # stages run with this python
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(tmp / "home"),  # no user git/dvc config leaks in
    })
    env.pop("PYTHONPATH", None)
    return env


def _declared_outs() -> list[str]:
    stages = read_yaml(ROOT / "dvc.yaml")["stages"]
    outs = []
    for stage in stages.values():
        for out in stage.get("outs", []):
            outs.append(next(iter(out)) if isinstance(out, dict) else out)
    return outs


def _project_files() -> list[str]:
    """Files a fresh clone would have: tracked or untracked-not-ignored, minus outs and dvc.lock."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], check=True, capture_output=True).stdout
    outs = _declared_outs()
    files = []
    for name in sorted(set(listed.decode().split("\0")) - {""}):
        if name == "dvc.lock" or name.startswith("tests/") or not (ROOT / name).is_file():
            continue
        if any(name == out or name.startswith(out.rstrip("/") + "/") for out in outs):
            continue
        files.append(name)
    return files


class Repo:
    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env

    def run(self, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited with {proc.returncode}\n"
                        f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
        return proc

    def repro(self) -> tuple[set[str], set[str]]:
        """Run `dvc repro`; return (stages that ran, stages that were skipped)."""
        proc = self.run(DVC, "repro")
        out = proc.stdout + proc.stderr
        ran, skipped = set(RAN.findall(out)), set(SKIPPED.findall(out))
        assert ran | skipped == set(STAGES), f"unexpected dvc repro output:\n{out}"
        return ran, skipped

    def status(self) -> Any:
        return json.loads(self.run(DVC, "status", "--json").stdout)

    def edit(self, key: str, value: Any) -> Any:
        """Set one params key in place; return its old value."""
        params = read_yaml(self.root / "params.yaml")
        section, name = key.split(".", 1)
        old = params[section][name]
        set_key(params, key, value)
        write_yaml(self.root / "params.yaml", params)
        return old


def make_repo(tmp: Path, tiny_params: dict[str, Any], tiny_data_dir: Path) -> Repo:
    """A committed git+DVC copy of the project with tiny data and params, nothing run yet."""
    assert DVC, "dvc not found next to the test interpreter"
    root = tmp / "repo"
    for name in _project_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, root / name)
    data_source = read_yaml(ROOT / "params.yaml")["data"]["source"]  # a dep of download
    for name in ("train.csv", "test.csv"):
        shutil.copyfile(tiny_data_dir / name, root / data_source / name)
    params = json.loads(json.dumps(tiny_params))
    params["data"]["source"] = data_source
    write_yaml(root / "params.yaml", params)
    # `dvc exp run` composes params.yaml from conf/ (Hydra): the tiny values go there too
    conf = read_yaml(root / "conf" / "config.yaml")
    write_yaml(root / "conf" / "config.yaml", {"defaults": conf["defaults"], **params})
    (tmp / "home").mkdir()
    # experiments are git commits: DVC's git backends read the author from the user config
    (tmp / "home" / ".gitconfig").write_text("[user]\n\tname = test\n\temail = test@example.com\n")
    repo = Repo(root, _env(tmp))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
           "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false"]
    repo.run(*git, "init", "-q")
    repo.run(*git, "add", "-A")
    repo.run(*git, "commit", "-q", "-m", "tiny copy")
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_params: dict[str, Any],
         tiny_data_dir: Path) -> Repo:
    """A git+DVC copy of the project with tiny data and params, after one `dvc repro`."""
    repo = make_repo(tmp_path_factory.mktemp("dvc"), tiny_params, tiny_data_dir)
    ran, _ = repo.repro()
    assert ran == set(STAGES)
    return repo


def test_queued_experiments_run_from_a_clean_copy(tmp_path: Path, tiny_params: dict[str, Any],
                                                  tiny_data_dir: Path) -> None:
    """`dvc exp run --queue` runs in a copy holding only tracked files: a good run's metrics
    reach `dvc exp show`, and a failing run's one-line error reaches `dvc queue logs`."""
    repo = make_repo(tmp_path, tiny_params, tiny_data_dir)
    repo.run(DVC, "exp", "run", "--queue", "-n", "rank-4", "-S", "lora.r=4")
    repo.run(DVC, "exp", "run", "--queue", "-n", "rank-0", "-S", "lora.r=0")
    repo.run(DVC, "queue", "start", "-j", "1")
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = repo.run(DVC, "queue", "status").stdout
        if "rank-4" in status and "rank-0" in status and not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    else:
        pytest.fail(f"queue did not finish:\n{status}")
    assert re.search(r"rank-4\s.*Success", status) and re.search(r"rank-0\s.*Failed", status), status

    shown = json.loads(repo.run(DVC, "exp", "show", "--json").stdout)
    runs = [exp for baseline in shown for exp in (baseline.get("experiments") or [])]
    (rank4,) = [r for r in runs if r.get("name") == "rank-4"]
    data = rank4["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["lora"]["r"] == 4
    evaluate = data["metrics"]["metrics/evaluate/metrics.json"]["data"]
    assert 0.0 <= evaluate["accuracy"] <= 1.0
    assert data["metrics"]["metrics/train/metrics.json"]["data"]["lora_r"] == 4

    logs = repo.run(DVC, "queue", "logs", "rank-0", check=False)
    assert "error: params.yaml: lora.r: expected int >= 1, got 0" in logs.stdout + logs.stderr


def test_repro_runs_every_stage_and_leaves_nothing_to_do(repo: Repo) -> None:
    assert repo.status() == {}
    for path in ("data/raw/SOURCE.json", "data/split/train.csv", "data/tokenized/tokenized.json",
                 "models/base/model.safetensors", "models/adapter/adapter_model.safetensors",
                 "models/export/README.md", "metrics/train/metrics.json",
                 "metrics/evaluate/metrics.json", "dvc.lock"):
        assert (repo.root / path).is_file(), path
    # the stages ran this copy's code, with tiny params
    lock = yaml.safe_load((repo.root / "dvc.lock").read_text())
    assert lock["stages"]["tokenize"]["params"]["params.yaml"]["tokenize.max_length"] == 16


def test_metrics_show_reports_test_accuracy(repo: Repo) -> None:
    shown = json.loads(repo.run(DVC, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    evaluate = files["metrics/evaluate/metrics.json"]["data"]
    assert 0.0 <= evaluate["accuracy"] <= 1.0
    assert 0.0 <= evaluate["f1_macro"] <= 1.0
    assert "best_val_accuracy" in files["metrics/train/metrics.json"]["data"]


def test_repro_force_reproduces_every_output_bit_for_bit(repo: Repo) -> None:
    """`dvc repro --force` reruns every stage; on the CPU each output comes out byte-identical,
    metrics included. Only the speed figures in timing.json (and so the hash of the metrics
    directories that hold them) may differ."""
    def outputs() -> tuple[dict[str, str], dict[str, bytes]]:
        lock = yaml.safe_load((repo.root / "dvc.lock").read_text())["stages"]
        hashes = {o["path"]: o["md5"] for stage in lock.values() for o in stage.get("outs", [])
                  if not o["path"].startswith("metrics/")}
        metrics = {str(p.relative_to(repo.root)): p.read_bytes()
                   for p in sorted((repo.root / "metrics").rglob("*"))
                   if p.is_file() and p.name != "timing.json"}
        return hashes, metrics

    before = outputs()
    proc = repo.run(DVC, "repro", "--force")
    assert set(RAN.findall(proc.stdout + proc.stderr)) == set(STAGES)
    after = outputs()
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys() and len(after[1]) >= 8  # summaries, curves, plots
    for name in before[1]:
        assert after[1][name] == before[1][name], name
    assert repo.status() == {}


def test_plots_show_renders_every_declared_plot(repo: Repo) -> None:
    """`dvc plots show` writes one HTML page holding each plot declared in dvc.yaml, with data."""
    plots = yaml.safe_load((repo.root / "dvc.yaml").read_text())["plots"]
    titles = [spec.get("title", name) for p in plots for name, spec in p.items()]
    repo.run(DVC, "plots", "show", "-o", "plots_html")
    html = (repo.root / "plots_html" / "index.html").read_text()
    assert html.count("vegaEmbed(") == len(plots)
    for title in titles:
        assert f'"text": "{title}"' in html or f'"title": "{title}"' in html, title
    for value in ("Sci/Tech", "step"):  # class names in the confusion matrix, the curves' x axis
        assert value in html


def test_recipe_switch_runs_each_task_and_exp_show_compares_them(
        tmp_path: Path, tiny_params: dict[str, Any], tiny_data_dir: Path, corpora: dict[str, Path],
        decoder_configs: dict[str, Path], tiny_model_dir: Path) -> None:
    """`dvc exp run -S task=<recipe>` runs that recipe end to end; `dvc exp show` lists each
    run's own metrics side by side (accuracy for the classifier, perplexity for the LMs)."""
    repo = make_repo(tmp_path, tiny_params, tiny_data_dir)
    repo.run(DVC, "exp", "run", "-n", "cls", timeout=600)
    for recipe in ("masked-lm", "causal-lm"):
        overrides = [o for o in tiny_overrides(recipe, corpora, decoder_configs, tiny_model_dir)
                     if not o.startswith("task=")]
        args = [a for o in [f"task={recipe}", *overrides] for a in ("-S", o)]
        repo.run(DVC, "exp", "run", "-n", recipe, *args, timeout=600)
    shown = json.loads(repo.run(DVC, "exp", "show", "--json").stdout)
    runs = {r["name"]: r["revs"][0]["data"] for baseline in shown
            for r in (baseline.get("experiments") or []) if r.get("name")}
    assert set(runs) >= {"cls", "masked-lm", "causal-lm"}
    for name, metric in (("cls", "accuracy"), ("masked-lm", "perplexity"), ("causal-lm", "perplexity")):
        data = runs[name]
        evaluate = data["metrics"]["metrics/evaluate/metrics.json"]["data"]
        assert evaluate[metric] > 0, name
        task = data["params"]["params.yaml"]["data"]["task"]["type"]
        assert task == ("classification" if name == "cls" else name)
        assert data["metrics"]["metrics/train/metrics.json"]["data"]["task"] == task
    assert "perplexity" not in runs["cls"]["metrics"]["metrics/evaluate/metrics.json"]["data"]


DOWNSTREAM_OF_TRAIN = {"train", "evaluate", "export"}

# (key, new value, stages that must run). Each case starts from the state the last one left.
CASES = [
    ("lora.r", 8, DOWNSTREAM_OF_TRAIN),
    ("quant.type", "fp4", DOWNSTREAM_OF_TRAIN),
    ("tokenize.max_length", 20, {"tokenize"} | DOWNSTREAM_OF_TRAIN),
    # read by tokenize only; a classifier's token ids do not depend on it, so train is skipped
    # (an sft run's rows do: there it reruns tokenize onward)
    ("sft.packing", False, {"tokenize"}),
    ("split.seed", 7, {"split", "tokenize"} | DOWNSTREAM_OF_TRAIN),
]


@pytest.mark.parametrize(("key", "value", "expected"), CASES, ids=[c[0] for c in CASES])
def test_params_edit_reruns_exactly_the_stages_that_read_it(repo: Repo, key: str, value: Any,
                                                            expected: set[str]) -> None:
    old = repo.edit(key, value)
    assert old != value
    ran, skipped = repo.repro()
    assert ran == expected, f"{key}: ran {sorted(ran)}, expected {sorted(expected)}"
    assert skipped == set(STAGES) - expected
    assert repo.status() == {}


def test_evaluate_only_key_reruns_evaluate_alone(repo: Repo) -> None:
    """evaluate.batch_size is read by evaluate only; export reruns only if its inputs changed."""
    metrics = repo.root / "metrics" / "evaluate" / "metrics.json"
    before = metrics.read_bytes()
    old = repo.edit("evaluate.batch_size", 5)
    assert old != 5
    ran, _ = repo.repro()
    # the metrics are the same (timings live in timing.json), so export, which reads them, is skipped
    assert ran == {"evaluate"}
    assert metrics.read_bytes() == before, "evaluate.batch_size changed the test metrics"
    assert repo.status() == {}


def test_push_to_a_local_remote_and_pull_back(repo: Repo, tmp_path: Path) -> None:
    """Sharing: `dvc push` to a directory remote; with the local cache and outputs gone,
    `dvc pull` brings the exact adapter back and nothing needs rerunning."""
    remote = tmp_path / "remote"
    repo.run(DVC, "remote", "add", "-d", "shared", str(remote))
    repo.run(DVC, "push")
    adapter = repo.root / "models" / "adapter" / "adapter_model.safetensors"
    before = adapter.read_bytes()
    shutil.rmtree(repo.root / ".dvc" / "cache")
    shutil.rmtree(repo.root / "models" / "adapter")
    shutil.rmtree(repo.root / "models" / "export")
    repo.run(DVC, "pull")
    assert adapter.read_bytes() == before
    assert (repo.root / "models" / "export" / "adapter_model.safetensors").is_file()
    assert repo.status() == {}

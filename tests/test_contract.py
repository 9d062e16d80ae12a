"""dvc.yaml, params.yaml and the stage modules agree: params, code deps, paths.

DVC reruns a stage only when something it lists changes, so a key a stage reads but does not
list, or a lib module it imports but does not list, silently leaves a stale output behind.
"""

from __future__ import annotations

import ast
import importlib
import shlex
from pathlib import Path
from typing import Any

import pytest

from helpers import ROOT, STAGES, read_yaml
from stages.lib.params import ALL_KEYS

LIB = ROOT / "stages" / "lib"
DVC_STAGES: dict[str, Any] = read_yaml(ROOT / "dvc.yaml")["stages"]


def _path(entry: Any) -> str:
    """A deps/outs entry: `path` or `{path: {options}}`."""
    return next(iter(entry)) if isinstance(entry, dict) else entry


def lib_imports(path: Path) -> set[str]:
    """Names of the stages.lib modules a file imports, at any level (function bodies too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside stages/lib
                base = "stages.lib" + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["stages", "lib"] and len(parts) >= 3 and (LIB / f"{parts[2]}.py").is_file():
                found.add(parts[2])
    return found


def lib_closure(path: Path) -> set[str]:
    """lib_imports, followed through lib modules that import other lib modules."""
    seen: set[str] = set()
    todo = lib_imports(path)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo |= lib_imports(LIB / f"{name}.py")
    return seen


def stage_file(name: str) -> Path:
    return ROOT / "stages" / f"{name}.py"


def lib_deps(name: str) -> set[str]:
    deps = [_path(d) for d in DVC_STAGES[name].get("deps", [])]
    return {Path(d).stem for d in deps if d.startswith("stages/lib/")}


def test_dvc_yaml_has_one_stage_per_module() -> None:
    assert list(DVC_STAGES) == list(STAGES)
    for name in STAGES:
        assert stage_file(name).is_file()
        assert shlex.split(DVC_STAGES[name]["cmd"])[:3] == ["python", "-m", f"stages.{name}"]


def test_stages_holds_the_stages_only() -> None:
    """CLIs that are not stages (predict, serve, generate, report) live in stages/cli/."""
    modules = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")
    assert modules == sorted(STAGES)


def test_lib_import_parser_sees_nested_and_transitive_imports() -> None:
    """Guards the helpers above: tokenized.py imports io at the top, adapter.py imports
    fast_bert, which evaluate then loads through adapter.py."""
    assert "io" in lib_imports(LIB / "tokenized.py")
    assert {"fast_bert", "quantized", "sources"} <= lib_imports(LIB / "adapter.py")
    assert lib_closure(stage_file("evaluate")) >= {"adapter", "fast_bert", "io", "params", "sources"}


@pytest.mark.parametrize("module, unaffected", [
    ("fast_bert", ["download", "split", "tokenize"]),  # an inference kernel: evaluate and on
    ("tables", ["tokenize", "train", "evaluate", "export"]),  # reading raw tables: download, split
    ("loop", ["download", "split", "tokenize", "evaluate", "export"]),  # train alone
])
def test_an_edit_to_a_concern_reruns_only_the_stages_that_load_it(module: str, unaffected: list[str]) -> None:
    for name in unaffected:
        assert f"stages/lib/{module}.py" not in [_path(d) for d in DVC_STAGES[name]["deps"]], name


def test_benchmarks_import_the_library_not_stages() -> None:
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        modules |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        stages = {m for m in modules if m.startswith("stages.") and not m.startswith(("stages.lib", "stages.cli"))}
        assert stages == set(), f"{path.name} imports {stages}"


@pytest.mark.parametrize("name", STAGES)
def test_stage_params_match_dvc_yaml(name: str) -> None:
    declared = importlib.import_module(f"stages.{name}").PARAMS
    listed = DVC_STAGES[name].get("params", [])
    assert len(set(declared)) == len(declared), f"{name}.PARAMS has duplicates"
    assert sorted(declared) == sorted(listed), (
        f"stages/{name}.py PARAMS and dvc.yaml stages.{name}.params differ: "
        f"only in PARAMS {sorted(set(declared) - set(listed))}, "
        f"only in dvc.yaml {sorted(set(listed) - set(declared))}")


def test_every_params_key_is_read_by_some_stage(shipped_params: dict[str, Any]) -> None:
    in_file = {f"{s}.{k}" for s, values in shipped_params.items() for k in values}
    read = {key for name in STAGES for key in importlib.import_module(f"stages.{name}").PARAMS}
    assert in_file == set(ALL_KEYS)
    assert sorted(in_file - read) == [], "params.yaml keys no stage reads"
    assert sorted(read - in_file) == [], "keys stages read that params.yaml lacks"


@pytest.mark.parametrize("name", STAGES)
def test_stage_lists_its_own_module(name: str) -> None:
    assert f"stages/{name}.py" in [_path(d) for d in DVC_STAGES[name]["deps"]]


@pytest.mark.parametrize("name", STAGES)
def test_stage_lists_the_lib_modules_it_imports(name: str) -> None:
    direct = lib_imports(stage_file(name))
    assert sorted(direct - lib_deps(name)) == [], f"{name}: imported but not in deps"


@pytest.mark.parametrize("name", STAGES)
def test_stage_deps_are_exactly_the_lib_modules_it_loads(name: str) -> None:
    """Direct imports plus what those lib modules import: an edit to any of them must rerun it.

    Regression (dvc.yaml): tokenize and export imported stages/lib/model.py, which
    imported stages/lib/data.py, but neither listed stages/lib/data.py in its deps.
    """
    # stages/__init__.py runs before every stage module (its CPU settings change the numbers)
    needed = lib_closure(stage_file(name)) | lib_closure(ROOT / "stages" / "__init__.py")
    listed = lib_deps(name)
    assert sorted(needed - listed) == [], (
        f"dvc.yaml stages.{name}.deps lacks "
        f"{', '.join(f'stages/lib/{m}.py' for m in sorted(needed - listed))} "
        f"(loaded through its imports of stages.lib)")
    assert sorted(listed - needed) == [], f"{name}: lib modules in deps it never imports"


@pytest.mark.parametrize("name", STAGES)
def test_no_stage_imports_another_stage(name: str) -> None:
    tree = ast.parse(stage_file(name).read_text(encoding="utf-8"))
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    modules |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    others = {m for m in modules if m.startswith("stages.") and not m.startswith("stages.lib")}
    assert others == set()


@pytest.mark.parametrize("name", STAGES)
def test_cmd_paths_match_deps_and_outs(name: str) -> None:
    """Every input path in the cmd is a dep (or holds deps); the output paths are the outs. The
    one exception is train's checkpoint directory: a cache DVC must not track (a resumed run
    reads it, a finished one removes it), and git-ignored."""
    stage = DVC_STAGES[name]
    args = shlex.split(stage["cmd"])[3:]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags.pop("--params") == "params.yaml"
    if name == "train":
        checkpoints = flags.pop("--checkpoint-dir")
        assert f"/{checkpoints.split('/')[0]}/" in (ROOT / ".gitignore").read_text().split()
    deps = [_path(d) for d in stage["deps"]]
    outs = sorted(_path(o) for o in stage["outs"])
    assert sorted(v for f, v in flags.items() if f.endswith("out")) == outs
    for flag, path in flags.items():
        if not flag.endswith("out"):
            assert any(d == path or d.startswith(path.rstrip("/") + "/") for d in deps), \
                f"{name}: {flag} {path} is not a dep"


def test_download_depends_on_the_local_data_source(shipped_params: dict[str, Any]) -> None:
    source = shipped_params["data"]["source"]
    if (ROOT / source).is_dir():
        assert source in [_path(d) for d in DVC_STAGES["download"]["deps"]]


def _plot_files(plot: str | dict) -> list[str]:
    """The files a top-level plot reads: its id, or the keys of `y` for a named plot."""
    if isinstance(plot, dict):
        (name, spec), = plot.items()
        if isinstance(spec.get("y"), dict):
            return list(spec["y"])
        return [name]
    return [plot]


def test_metrics_and_plots_are_stage_outputs() -> None:
    dvc = read_yaml(ROOT / "dvc.yaml")
    outs = [_path(o) for stage in DVC_STAGES.values() for o in stage["outs"]]
    paths = list(dvc.get("metrics", [])) + [f for p in dvc.get("plots", []) for f in _plot_files(p)]
    assert paths
    for path in paths:
        assert any(path == o or path.startswith(o + "/") for o in outs), path
    uncached = {_path(o) for s in DVC_STAGES.values() for o in s["outs"]
                if isinstance(o, dict) and next(iter(o.values())).get("cache") is False}
    for metrics in dvc.get("metrics", []):
        assert any(metrics.startswith(o + "/") for o in uncached), f"{metrics} should be in git"

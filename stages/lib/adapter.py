"""The adapter: its metadata (pipeline.json, AdapterMeta, validated whole on load) and
rebuilding trained models from adapter directories, one (load_adapter, load_language_model) or
several sharing one base (load_adapters, for serving).

An adapter directory (models/adapter, models/export) holds PEFT's safetensors output, the
tokenizer and pipeline.json: what the adapter was trained with and on, and every file's sha256,
so that evaluate, export, predict and serve rebuild exactly the model train trained.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.lib.batches import StreamedTokens, encode_truncated, pad_multiple, predict_logits
from stages.lib.compiling import use_compile_cache
from stages.lib.fast_bert import first_token_last_layer, fuse_gelu_epilogue
from stages.lib.io import check_sha256_record, read_json, sha256_file, verify_sha256, write_json
from stages.lib.params import PADDINGS, Lora, Quant, Task, UserError, parse_section
from stages.lib.quantized import autocast, compute_setup, load_base
from stages.lib.sources import BaseOrigin, load_tokenizer, resolve_adapter_base
from stages.lib.tokenized import min_width

log = logging.getLogger("qlora")

ADAPTER_META_FILE = "pipeline.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Files of an adapter directory its sha256 record leaves out: the record itself and the model card.
UNHASHED_FILES = (ADAPTER_META_FILE, "README.md")
JSON_SCALARS = (str, int, float, bool, type(None))


# --- the metadata -----------------------------------------------------------------------------

def _fail(path: Path, key: str, message: str) -> UserError:
    return UserError(f"{path}: {key}: {message}")


@dataclass(frozen=True)
class AdapterMeta:
    """An adapter directory's pipeline.json."""

    task: Task
    labels: list[str]
    max_length: int
    padding: str
    quant: Quant
    lora: Lora
    train: dict[str, Any]  # the train section it was trained with (model card, provenance)
    modules_to_save: list[str]
    base: BaseOrigin
    sha256: dict[str, str]  # every file a load reads, by plain name

    @classmethod
    def from_json(cls, path: Path, raw: Any) -> AdapterMeta:
        path = Path(path)
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            if key not in names:
                raise UserError(f"{path}: {key}: unknown key (expected one of {', '.join(names)})")
        for key in names:
            if key not in raw:
                raise _fail(path, key, "missing" + (" (no sha256 record: refusing an adapter whose "
                                                    "files cannot be checked)" if key == "sha256" else ""))
        task = parse_section(path, "task", raw["task"], Task)
        labels = raw["labels"]
        if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
            raise _fail(path, "labels", f"expected a list of non-empty strings, got {labels!r}"[:300])
        if task.type == "classification" and not labels:
            raise _fail(path, "labels", "expected at least one label for a classification adapter")
        max_length = raw["max_length"]
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise _fail(path, "max_length", f"expected int >= 1, got {max_length!r}")
        if raw["padding"] not in PADDINGS:
            raise _fail(path, "padding", f"expected one of {', '.join(PADDINGS)}, got {raw['padding']!r}")
        train = raw["train"]
        if not isinstance(train, dict) or not all(isinstance(v, JSON_SCALARS) for v in train.values()):
            raise _fail(path, "train", "expected a mapping of keys to plain values")
        modules = raw["modules_to_save"]
        if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
            raise _fail(path, "modules_to_save", f"expected a list of non-empty strings, got {modules!r}"[:300])
        sha256 = check_sha256_record(path, "sha256", raw["sha256"])
        if ADAPTER_WEIGHTS not in sha256:
            raise _fail(path, "sha256", f"no entry for {ADAPTER_WEIGHTS}")
        return cls(task, list(labels), max_length, raw["padding"], parse_section(path, "quant", raw["quant"], Quant),
                   parse_section(path, "lora", raw["lora"], Lora), dict(train), list(modules),
                   BaseOrigin.from_json(path, raw["base"]), sha256)

    @classmethod
    def load(cls, path: str | Path) -> AdapterMeta:
        """Read and validate pipeline.json (the file itself, not its directory)."""
        return cls.from_json(Path(path), read_json(path))

    def to_json(self) -> dict[str, Any]:
        return {"task": dataclasses.asdict(self.task), "labels": self.labels, "max_length": self.max_length,
                "padding": self.padding, "quant": dataclasses.asdict(self.quant),
                "lora": dataclasses.asdict(self.lora), "train": self.train,
                "modules_to_save": self.modules_to_save, "base": self.base.to_json(), "sha256": self.sha256}

    def save(self, path: str | Path) -> None:
        """Write pipeline.json atomically; what is written is validated as a load would."""
        data = self.to_json()
        AdapterMeta.from_json(Path(path), data)
        write_json(path, data)

    @property
    def task_type(self) -> str:
        return self.task.type

    @property
    def min_width(self) -> int:
        return min_width(self.max_length, self.padding)

    def with_hashes(self, sha256: Mapping[str, str]) -> AdapterMeta:
        return dataclasses.replace(self, sha256=dict(sha256))


def read_adapter_meta(adapter_dir: Path, where: str | None = None) -> AdapterMeta:
    """An adapter directory's pipeline.json, once its weights are known to be safetensors and
    to match the sha256 recorded there. Errors start with `where` (default: the directory)."""
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


def hash_adapter_files(adapter_dir: Path) -> dict[str, str]:
    """sha256 of every file a load of this adapter directory reads (weights, adapter_config.json,
    tokenizer files), by name: all its top-level files but pipeline.json and the model card."""
    return {f.name: sha256_file(f) for f in sorted(Path(adapter_dir).iterdir())
            if f.is_file() and f.name not in UNHASHED_FILES}


def write_adapter_config(adapter_dir: Path, **overrides: Any) -> None:
    """Rewrite adapter_config.json byte-stably: PEFT stores target_modules as a set, whose order
    changes with Python's hash seed, and an output DVC hashes must not change between runs."""
    path = adapter_dir / ADAPTER_CONFIG
    config = read_json(path)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config.update(overrides)
    write_json(path, config)


def save_adapter(model: torch.nn.Module, tokenizer: Any, meta: AdapterMeta, directory: Path) -> None:
    """Write an adapter directory into `directory` (the caller's temporary one): PEFT's weights
    (safetensors) and config, the tokenizer, and pipeline.json with every file's sha256."""
    model.save_pretrained(directory, safe_serialization=True)
    write_adapter_config(directory)
    tokenizer.save_pretrained(directory)
    meta.with_hashes(hash_adapter_files(directory)).save(directory / ADAPTER_META_FILE)


# --- trained models ---------------------------------------------------------------------------

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

    def logits(self, sequences: Sequence[Sequence[int]], batch_size: int, desc: str = "predict",
               on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Logits of token id lists, padded as the training data was; `on_batch(rows, tokens)`
        after each batch."""
        if len(sequences) == 0:
            raise UserError("nothing to predict: no input texts")
        tokens = StreamedTokens(sequences, self.tokenizer.pad_token_id, self.device, self.meta.min_width,
                                pad_multiple(self.device))
        return predict_logits(self.model, tokens, batch_size, self.device, self.dtype, desc,
                              on_batch=on_batch)

    @staticmethod
    def top_labels(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The most likely class id of each row and its probability (float32)."""
        score, label_id = torch.from_numpy(logits).softmax(-1).max(-1)
        return label_id.numpy(), score.numpy()


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
        if self.task not in ("causal-lm", "sft"):
            raise UserError(f"a {self.task} adapter cannot generate text (causal-lm and sft adapters only)")
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


# --- loading ----------------------------------------------------------------------------------

def differences(meta: AdapterMeta, ref: AdapterMeta) -> list[str]:
    """What keeps two adapters from sharing one loaded base model."""
    found = []
    # the base weights' hashes where recorded: one name (a hub id, a directory) can hold other
    # weights at another time
    if (meta.base.sha256 or meta.base.name_or_path) != (ref.base.sha256 or ref.base.name_or_path):
        mine, theirs = meta.base.name_or_path, ref.base.name_or_path
        found.append(f"base model {mine} vs {theirs}" if mine != theirs
                     else f"base model {mine} with other weights (sha256)")
    for key in ("type", "double_quant", "compute_dtype"):
        if getattr(meta.quant, key) != getattr(ref.quant, key):
            found.append(f"quant.{key} {getattr(meta.quant, key)} vs {getattr(ref.quant, key)}")
    if len(meta.labels) != len(ref.labels):
        found.append(f"{len(meta.labels)} labels vs {len(ref.labels)}")
    if sorted(meta.modules_to_save) != sorted(ref.modules_to_save):  # decides what stays unquantized
        found.append(f"modules_to_save {meta.modules_to_save} vs {ref.modules_to_save}")
    return found


def _read_metas(adapters: Mapping[str, Path], where: Mapping[str, str],
                classifier: bool) -> dict[str, AdapterMeta]:
    """Every adapter's metadata, checked for the task the caller runs and, for several, that
    they can share one base model: all before the slow model load."""
    metas = {name: read_adapter_meta(d, where[name]) for name, d in adapters.items()}
    for name, meta in metas.items():
        if classifier and meta.task_type != "classification":
            raise UserError(f"{where[name]}: a {meta.task_type} adapter, not a classifier"
                            + (" (write text with it: qlora-generate)" if meta.task_type == "causal-lm" else ""))
        if not classifier and meta.task_type == "classification":
            raise UserError(f"{where[name]}: a classification adapter, not a language model "
                            "(label text with it: qlora-predict)")
    first = next(iter(metas))
    for name, meta in metas.items():
        found = differences(meta, metas[first])
        if found:
            raise UserError(f"{where[name]}: differs from adapter {first}: {'; '.join(found)} (adapters "
                            "served together share one base model, quantization, modules_to_save and "
                            "number of labels)")
    return metas


def _attach(model: torch.nn.Module, directory: Path, name: str, where: str) -> torch.nn.Module:
    """`model` with the adapter in `directory` attached under `name` (a PeftModel)."""
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(directory, adapter_name=name, is_trainable=False)
            return model
        return PeftModel.from_pretrained(model, directory, adapter_name=name, is_trainable=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise UserError(f"{where}: {ADAPTER_WEIGHTS} is corrupt or does not match the base model "
                        f"({str(e).splitlines()[0][:200]})") from None


def _load(adapters: Mapping[str, Path], where: Mapping[str, str], classifier: bool,
          base_dir: str | Path | None, merged: bool, compile: bool):
    """The one loader: the base once, quantized as the adapters were trained, every adapter
    attached to it; with `merged` (one adapter) LoRA merged into the dequantized base."""
    metas = _read_metas(adapters, where, classifier)
    meta = next(iter(metas.values()))
    if base_dir is None:
        base_dir = resolve_adapter_base(meta.base, next(iter(adapters.values())) / ADAPTER_META_FILE)
    device, dtype = compute_setup(meta.quant.compute_dtype)
    model = load_base(Path(base_dir), meta.labels, meta.quant, meta.modules_to_save, device, dtype,
                      task=meta.task_type)
    if merged and meta.quant.type != "none":
        model = model.dequantize()  # exactly the 4-bit weights' values, now plain Linear layers
    for name, directory in adapters.items():
        model = _attach(model, directory, name, where[name])
        log.info("adapter %s <- %s (r=%s%s)", name, directory, metas[name].lora.r,
                 f", labels {', '.join(metas[name].labels)}" if classifier else "")
    if merged:
        model = model.merge_and_unload().to(device=device, dtype=dtype)
        if device.type == "cuda":
            fuse_gelu_epilogue(model)
    model.eval()
    if compile:  # per region: the layers share one graph, compiled in seconds
        from accelerate.utils import compile_regions

        use_compile_cache()  # before the first compile: graphs from earlier runs are reused
        model = compile_regions(model)
    if merged:  # after compile_regions, which compiles only layers that are all of one class
        first_token_last_layer(model)
    cls = Classifier if classifier else LanguageModel
    return {name: cls(model, load_tokenizer(d), metas[name], device, dtype) for name, d in adapters.items()}


def load_adapters(adapters: Mapping[str, Path], base_dir: str | Path | None = None) -> dict[str, Classifier]:
    """Load the base once and attach every classifier adapter to it, each under its name; one
    Classifier per adapter, all sharing one PeftModel (switch with `model.set_adapter(name)`
    before a forward pass). Errors name the adapter as `--adapter NAME=DIR`."""
    where = {name: f"--adapter {name}={d}" for name, d in adapters.items()}
    return _load(adapters, where, True, base_dir, merged=False, compile=False)


def load_adapter(adapter_dir: str | Path, base_dir: str | Path | None = None,
                 merged: bool = False, compile: bool = False) -> Classifier:
    """Rebuild the trained classifier from an adapter directory.

    The base comes from `base_dir` when given (the pipeline's models/base), else from where
    pipeline.json says it came from (resolve_adapter_base: nothing is imported or run). `merged` dequantizes
    the 4-bit base once and merges LoRA into it: the same weights as the quantized model, but
    plain matmuls in the compute dtype, much faster for inference. The merged classifier then
    computes its last layer for [CLS] only (FirstTokenLayer), and on a GPU each FFN's GELU runs
    inside its matmul (LinearGELU). `compile` adds torch.compile, layer by layer.
    """
    adapter_dir = Path(adapter_dir)
    return _load({"default": adapter_dir}, {"default": str(adapter_dir)}, True, base_dir, merged, compile)["default"]


def load_language_model(adapter_dir: str | Path, base_dir: str | Path | None = None,
                        merged: bool = False, compile: bool = False) -> LanguageModel:
    """Rebuild a trained masked-lm or causal-lm adapter (see load_adapter)."""
    adapter_dir = Path(adapter_dir)
    return _load({"default": adapter_dir}, {"default": str(adapter_dir)}, False, base_dir, merged, compile)["default"]

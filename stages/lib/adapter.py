"""Trained models rebuilt from adapter directories (their metadata: lib.adapter_meta), one
(load_adapter, load_language_model) or several sharing one base (load_adapters, for serving).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.lib.adapter_meta import ADAPTER_META_FILE, ADAPTER_WEIGHTS, AdapterMeta, read_adapter_meta
from stages.lib.answers import ids_without_text
from stages.lib.batches import StreamedTokens, encode_truncated, pad_multiple, predict_logits
from stages.lib.compiling import use_compile_cache
from stages.lib.fast_bert import first_token_last_layer, fuse_gelu_epilogue
from stages.lib.params import UserError
from stages.lib.quantized import autocast, compute_setup, load_base
from stages.lib.sources import load_tokenizer, resolve_adapter_base

log = logging.getLogger("qlora")

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
        stop at eos), sampled with a fixed seed (or greedy), one prompt at a time; never ids
        the tokenizer has no text for (answers.ids_without_text)."""
        if self.task not in ("causal-lm", "sft"):
            raise UserError(f"a {self.task} adapter cannot generate text (causal-lm and sft adapters only)")
        outputs = []
        textless = ids_without_text(self.model, self.tokenizer) or None
        for prompt in prompts:
            ids = self.tokenizer(prompt, return_tensors="pt").to(self.device)
            torch.manual_seed(seed)
            with autocast(self.device, self.dtype):
                out = self.model.generate(**ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                          do_sample=do_sample, temperature=temperature if do_sample else None,
                                          top_k=top_k if do_sample else None, top_p=None,
                                          pad_token_id=self.tokenizer.pad_token_id, suppress_tokens=textless)
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

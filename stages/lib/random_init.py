"""Seeded random weights for a model architecture, without ever holding the model in fp32.

A billion-parameter config (configs/llama-3.1-8b: 8.03B parameters, 32 GB in fp32) cannot go
through `AutoModel.from_config(...)` on the host: that allocates and initialises every weight in
fp32 first. Here the model is built on the meta device (shapes only, no memory), and each
parameter is drawn directly in bf16 on the target device (the GPU when there is one), a few
decoder layers at a time, written as one safetensors shard and freed. The result loads with
`from_pretrained` (a `model.safetensors.index.json` names each tensor's shard), in 16 or 4 bits.

`build_quantized_random` goes one step further for models whose bf16 weights do not fit the disk
(the 70B-class config: 141 GB): it draws each decoder layer's weights on the GPU and quantizes
them to NF4 in place, so neither the host nor the disk ever sees the 16-bit model.

Initialisation: every parameter gets its own generator, seeded from (seed, parameter name), so a
tensor's bytes do not depend on the order, the shard layout or how many layers are written (on
one device type: CPU and CUDA generators draw different numbers). Matrices and embeddings are
drawn from N(0, initializer_range) as transformers' decoders initialise them, norm weights are
ones, biases zeros.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("qlora")

INDEX_FILE = "model.safetensors.index.json"
# What was written and from what: a directory with a matching record is reused as it is.
RECORD_FILE = "random-init.json"
TOKENIZER_SUFFIXES = (".json", ".txt", ".model")
DTYPE = torch.bfloat16
_LAYER = re.compile(r"\.layers\.(\d+)\.")
# Encoders that transformers can also run as a causal LM (BertLMHeadModel): written bare.
_ENCODERS = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "distilbert")


def _config(config_dir: Path, num_layers: int | None = None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_dir)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    config.dtype = DTYPE  # transformers writes it as `dtype`/`torch_dtype` in config.json
    return config


def _model_class(config):
    """The class named in config.architectures (LlamaForCausalLM: the checkpoint then holds its
    head too); without one, the causal LM of a decoder's model type (GPT-2, OPT), else the bare
    model (an encoder: each task adds its own head when it loads the base)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not config.is_encoder_decoder \
            and config.model_type not in _ENCODERS:
        return transformers.AutoModelForCausalLM._model_mapping[type(config)]
    return transformers.AutoModel._model_mapping[type(config)]


def meta_model(config) -> torch.nn.Module:
    """The architecture with every weight on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        # .to on the meta device costs nothing; no `dtype=` keyword, whose name changed across versions
        return _model_class(config)._from_config(config).to(DTYPE)


def parameter_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator for one named parameter: its draw is independent of every other tensor's."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


def draw_parameter(name: str, shape: torch.Size, seed: int, std: float, device: torch.device) -> torch.Tensor:
    """One parameter's initial value in bf16 on `device` (never materialised in fp32)."""
    tensor = torch.empty(shape, dtype=DTYPE, device=device)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return tensor.zero_()
    if tensor.dim() == 1:  # RMSNorm / LayerNorm weight
        return tensor.fill_(1.0)
    return tensor.normal_(0.0, std, generator=parameter_generator(seed, name, device))


def shard_plan(model: torch.nn.Module, layers_per_shard: int) -> list[list[tuple[str, torch.Size]]]:
    """Parameter (name, shape) groups, one per shard: what comes before the decoder layers
    (embeddings), then `layers_per_shard` layers each, then what follows (final norm, head).
    Tied weights appear once, under their first name, as save_pretrained writes them."""
    persistent_buffers = set(model.state_dict()) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if persistent_buffers:
        raise ValueError(f"random init writes parameters only; this architecture has persistent "
                         f"buffers: {sorted(persistent_buffers)[:5]}")
    before: list[tuple[str, torch.Size]] = []
    after: list[tuple[str, torch.Size]] = []
    layers: dict[int, list[tuple[str, torch.Size]]] = {}
    for name, param in model.named_parameters():
        match = _LAYER.search(f".{name}")
        if match:
            layers.setdefault(int(match.group(1)) // layers_per_shard, []).append((name, param.shape))
        elif layers:
            after.append((name, param.shape))
        else:
            before.append((name, param.shape))
    groups = [layers[k] for k in sorted(layers)]
    if before:
        groups = [before, *groups]
    if after:
        groups.append(after)
    return [g for g in groups if g]


def _record(config_dir: Path, seed: int, num_layers: int | None, layers_per_shard: int,
            device: torch.device) -> dict[str, Any]:
    files = sorted(f for f in Path(config_dir).iterdir() if f.is_file() and f.suffix in TOKENIZER_SUFFIXES)
    key = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()
    return {"config_sha256": key, "seed": seed, "num_layers": num_layers,
            "layers_per_shard": layers_per_shard, "device_type": device.type,
            "dtype": "bfloat16", "note": "seeded random weights of this architecture, not a pretrained model"}


def _tokenizer_files(config_dir: Path) -> Iterator[Path]:
    for f in sorted(Path(config_dir).iterdir()):
        if f.is_file() and f.suffix in TOKENIZER_SUFFIXES and f.name != "config.json":
            yield f


def write_random_init(config_dir: str | Path, out_dir: str | Path, seed: int,
                      device: str | torch.device | None = None, layers_per_shard: int = 4,
                      num_layers: int | None = None) -> Path:
    """Write a seeded random model of `config_dir` to `out_dir` as bf16 safetensors shards.

    `device`: where weights are drawn (default: cuda if available, else cpu); only one shard
    lives there at a time, and on the host only its CPU copy while it is written. `num_layers`
    overrides the config's depth (a shallower model of the same width). An `out_dir` written
    earlier from the same inputs is reused; the directory appears complete or not at all.
    """
    from safetensors.torch import save_file

    from stages.lib.io import atomic_dir, read_json, write_json

    config_dir, out_dir = Path(config_dir), Path(out_dir)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    record = _record(config_dir, seed, num_layers, layers_per_shard, device)
    if (out_dir / INDEX_FILE).is_file() and (out_dir / RECORD_FILE).is_file() \
            and read_json(out_dir / RECORD_FILE) == record:
        log.info("random init: reusing %s", out_dir)
        return out_dir
    config = _config(config_dir, num_layers)
    model = meta_model(config)
    plan = shard_plan(model, layers_per_shard)
    total_params = sum(shape.numel() for group in plan for _, shape in group)
    std = float(getattr(config, "initializer_range", 0.02))
    del model
    weight_map: dict[str, str] = {}
    with atomic_dir(out_dir) as tmp:
        for i, group in enumerate(plan):
            shard = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            tensors = {}
            for name, shape in group:
                tensors[name] = draw_parameter(name, shape, seed, std, device).cpu()
                weight_map[name] = shard
            save_file(tensors, tmp / shard, metadata={"format": "pt"})
            del tensors
            log.info("random init: wrote %s (%d/%d)", shard, i + 1, len(plan))
        with open(tmp / INDEX_FILE, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total_params * 2, "total_parameters": total_params},
                       "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        config.save_pretrained(tmp)
        for f in _tokenizer_files(config_dir):
            shutil.copyfile(f, tmp / f.name)
        write_json(tmp / RECORD_FILE, record)
    log.info("random init: %s, %.2fB parameters in %d shards", out_dir, total_params / 1e9, len(plan))
    return out_dir


# --- a 4-bit model built on the GPU, no disk ------------------------------------------------

def _set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def build_quantized_random(config_dir: str | Path, seed: int, device: str | torch.device,
                           quant_type: str = "nf4", double_quant: bool = True,
                           compute_dtype: torch.dtype = DTYPE, num_layers: int | None = None,
                           skip_modules: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """The architecture of `config_dir` with seeded random weights, its decoder-layer Linear
    layers as bitsandbytes Linear4bit, built one layer at a time on `device`.

    Each Linear's bf16 weight is drawn on the device and quantized at once, so at most one
    16-bit matrix exists at a time. Embeddings, norms and `skip_modules` (the output head) stay
    bf16, as a BitsAndBytesConfig load keeps them. The weights are those `write_random_init`
    draws on the same device type before quantization. The model is marked as loaded in 4 bits
    so peft wraps its layers with its 4-bit LoRA layers.
    """
    import bitsandbytes as bnb

    device = torch.device(device)
    config = _config(Path(config_dir), num_layers)
    model = meta_model(config)
    std = float(getattr(config, "initializer_range", 0.02))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and _LAYER.search(f".{name}") \
                    and name.rsplit(".", 1)[-1] not in skip_modules:
                weight = draw_parameter(f"{name}.weight", module.weight.shape, seed, std, device)
                quantized = bnb.nn.Linear4bit(module.in_features, module.out_features,
                                              bias=module.bias is not None, compute_dtype=compute_dtype,
                                              compress_statistics=double_quant, quant_type=quant_type,
                                              device="meta")
                quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                                     quant_type=quant_type)
                if module.bias is not None:
                    quantized.bias = torch.nn.Parameter(
                        draw_parameter(f"{name}.bias", module.bias.shape, seed, std, device), requires_grad=False)
                quantized = quantized.to(device)  # quantizes the weight; frees the bf16 copy
                del weight
                _set_module(model, name, quantized)
        for name, param in params.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            if getattr(owner, leaf).device.type == "meta":
                setattr(owner, leaf, torch.nn.Parameter(
                    draw_parameter(name, param.shape, seed, std, device), requires_grad=False))
    _rebuild_meta_buffers(model, config, device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.is_loaded_in_4bit = True  # peft reads this to pick its bitsandbytes LoRA layers
    model.eval()
    return model


def _rebuild_meta_buffers(model: torch.nn.Module, config, device: torch.device) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are computed at construction: build
    the modules holding them again, on the device."""
    for name, module in list(model.named_modules()):
        if any(b.device.type == "meta" for b in module.buffers(recurse=False)):
            if "RotaryEmbedding" not in type(module).__name__:
                raise ValueError(f"cannot rebuild buffers of {name} ({type(module).__name__}) off the meta device")
            with torch.device(device):  # the constructor's tensors land on the device
                _set_module(model, name, type(module)(config=config))

"""Quantized loading and LoRA: the compute device and dtype, the bitsandbytes config, loading
the base with its task's head, preparing it for training and wrapping it with LoRA; the mixed
precision and out-of-memory helpers the loops around such a model use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from stages.lib.io import read_json, verify_sha256
from stages.lib.params import ALL_LINEAR, Lora, Quant, UserError
from stages.lib.sources import SOURCE_FILE

log = logging.getLogger("qlora")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


DECODER_TASKS = ("causal-lm", "sft")  # tasks that train a decoder (AutoModelForCausalLM)

# Output layers a language model keeps unquantized (tied to the input embeddings, like QLoRA's
# lm_head): naming any skip module replaces transformers' own default list, so they are named here.
OUTPUT_LAYERS = {"classification": (), "masked-lm": ("decoder", "lm_head"), "causal-lm": ("lm_head",),
                 "sft": ("lm_head",)}


def quantization_config(quant: Quant, compute_dtype: torch.dtype,
                        skip_modules: Sequence[str], task: str = "classification"):
    """A BitsAndBytesConfig for quant.type, or None for `none`; heads are never quantized."""
    from transformers import BitsAndBytesConfig

    # A name matches a module and everything inside it: transformers 5.24 matches a skip name
    # only as a prefix or suffix of a layer's path, so a container in modules_to_save (BERT's MLM
    # `transform`) also goes in as a pattern for any path through it; older versions match
    # substrings, which the plain name covers.
    skip_modules = [*skip_modules, *(rf"(?:.*\.)?{re.escape(n)}" for n in skip_modules), *OUTPUT_LAYERS[task]]

    if quant.type == "none":
        return None
    if quant.type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.type,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=list(skip_modules))


def auto_model_class(task: str):
    """The transformers Auto class of a task type."""
    import transformers

    return {"classification": transformers.AutoModelForSequenceClassification,
            "masked-lm": transformers.AutoModelForMaskedLM,
            "causal-lm": transformers.AutoModelForCausalLM, "sft": transformers.AutoModelForCausalLM}[task]


def load_base(base_dir: Path, labels: Sequence[str], quant: Quant,
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


def attach_lora(model: torch.nn.Module, lora: Lora, task: str = "classification"):
    """Wrap the model with LoRA adapters; modules_to_save (a head) are trained in full.
    target_modules `all-linear` is peft's: every linear layer except the output layer."""
    from peft import LoraConfig, TaskType, get_peft_model

    linear = linear_module_names(model)
    targets = lora.target_modules if lora.target_modules == ALL_LINEAR else list(lora.target_modules)
    unknown = [] if targets == ALL_LINEAR else [t for t in targets if t not in linear]
    if unknown:
        raise UserError(f"lora.target_modules: {', '.join(unknown)} not in this model "
                        f"(its linear layers: {', '.join(linear)})")
    modules = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [m for m in lora.modules_to_save if m not in modules]
    if unknown:
        raise UserError(f"lora.modules_to_save: {', '.join(unknown)} not in this model")
    # peft has no masked-LM task type: None wraps the model as it is
    task_type = {"classification": TaskType.SEQ_CLS, "causal-lm": TaskType.CAUSAL_LM,
                 "sft": TaskType.CAUSAL_LM}.get(task)
    config = LoraConfig(task_type=task_type, r=lora.r, lora_alpha=lora.alpha,
                        lora_dropout=lora.dropout, target_modules=targets,
                        modules_to_save=list(lora.modules_to_save) or None)
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


def prepare_for_training(model: torch.nn.Module, gradient_checkpointing: bool | str,
                         cache_dequantized: bool = False, base_dropout: bool = True) -> torch.nn.Module:
    """Freeze the base, set up gradient checkpointing (any true value; train switches `offload`
    on afterwards), and switch the base's dropout off unless `base_dropout`.

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


def checkpoint_every(model: torch.nn.Module, every: int) -> int:
    """Keep gradient checkpointing (plain or offloaded) on every `every`-th decoder layer only;
    the others keep their activations. Peak memory then holds the full activations of
    (layers - layers/every) layers, and the backward pass recomputes only layers/every of them:
    a setting between all-checkpointed (least memory) and none (fastest). Returns how many
    layers stay checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    kept = 0
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = layer.gradient_checkpointing and index % every == 0
        kept += layer.gradient_checkpointing
    return kept


def compile_for_training(model: torch.nn.Module, task: str) -> torch.nn.Module:
    """torch.compile for train.compile. A decoder (causal-lm, sft) compiles each decoder layer
    in place: one small graph reused by every layer, compiled in seconds however deep the model,
    and its output layer stays outside (for the chunked loss). Other models compile as
    one graph, which runs faster than regions for small encoders (docs/performance.md)."""
    if task not in DECODER_TASKS:
        return torch.compile(model)
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        return torch.compile(model)
    for layer in layers:
        layer.compile()
    return model


def upcast_trainable(model: torch.nn.Module) -> None:
    """Keep trainable weights (LoRA, the head) in fp32 so small updates are not rounded away;
    autocast still runs their matmuls in the compute dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()



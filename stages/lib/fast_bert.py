"""BERT-only inference surgery on a merged classifier: the FFN's GELU inside its matmul
(LinearGELU) and the last layer computed for [CLS] alone (FirstTokenLayer). Both compute the
same function as the layers they replace, up to float rounding; docs/performance.md has what
each is worth.
"""

from __future__ import annotations

from typing import Any

import torch


class LinearGELU(torch.nn.Module):
    """A Linear layer and erf GELU as one matmul, with GELU applied in the matmul's epilogue.

    On a GPU the separate GELU kernel reads and writes the 4×-wide FFN activation once more, a
    visible share of a merged bert-base's inference time (docs/performance.md). cuBLASLt's
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

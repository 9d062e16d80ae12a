"""stages/lib/fused_lora.py: the fused 4-bit LoRA layer computes what peft's does."""

from __future__ import annotations

import pytest
import torch

from stages.lib.fused_lora import fuse_lora_4bit


def _layer(compute_dtype: torch.dtype, bias: bool) -> torch.nn.Module:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential()
    linear = bnb.nn.Linear4bit(128, 96, bias=bias, compute_dtype=compute_dtype, quant_type="nf4",
                               compress_statistics=True, device="meta")
    # quantized from the compute dtype: bitsandbytes' backward dequantizes into the dtype the
    # weight came from, its forward into the input's
    linear.weight = bnb.nn.Params4bit((0.05 * torch.randn(96, 128)).to(compute_dtype), requires_grad=False,
                                      quant_type="nf4", compress_statistics=True)
    if bias:
        linear.bias = torch.nn.Parameter(torch.randn(96).to(compute_dtype), requires_grad=False)
    base.add_module("proj", linear.to("cpu"))
    base.proj.support_avx512bf16_for_cpu = False
    base.is_loaded_in_4bit = True
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["proj"],
                                            init_lora_weights=False))
    model.train()
    return model


def _run(model: torch.nn.Module, autocast: bool, dtype: torch.dtype):
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
    y.backward(g)
    lora = [p for p in model.parameters() if p.requires_grad]
    return y.detach(), x.grad, [p.grad.clone() for p in lora]


@pytest.mark.parametrize("bias", [False, True])
# bf16: the same products summed and rounded in another order, outputs of magnitude ~4 (bias)
@pytest.mark.parametrize("compute_dtype,autocast,rtol,atol", [(torch.float32, False, 1e-5, 1e-6),
                                                              (torch.bfloat16, True, 2e-2, 2e-2)])
def test_forward_and_backward_equal_peft(compute_dtype: torch.dtype, autocast: bool, rtol: float, atol: float,
                                         bias: bool) -> None:
    reference = _run(_layer(compute_dtype, bias), autocast, torch.float32)
    model = _layer(compute_dtype, bias)
    assert fuse_lora_4bit(model) == 1
    fused = _run(model, autocast, torch.float32)
    assert fused[0].dtype == reference[0].dtype and fused[1].dtype == reference[1].dtype
    torch.testing.assert_close(fused[0], reference[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(fused[1], reference[1], rtol=rtol, atol=atol)
    assert len(fused[2]) == len(reference[2]) == 2
    for a, b in zip(fused[2], reference[2], strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_saves_no_dequantized_weight() -> None:
    model = _layer(torch.float32, False)
    fuse_lora_4bit(model)
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        model(x).sum().backward()
    assert (96, 128) not in saved and (128, 96) not in saved, saved


def test_dropout_falls_back_to_peft() -> None:
    outputs = []
    for fuse in (False, True):
        model = _layer(torch.float32, False)
        model.base_model.model.proj.lora_dropout["default"] = torch.nn.Dropout(0.5)
        if fuse:
            fuse_lora_4bit(model)
        torch.manual_seed(3)
        outputs.append(model(torch.ones(4, 128)))
    assert torch.equal(outputs[0], outputs[1])  # the same dropout mask: peft's own forward ran

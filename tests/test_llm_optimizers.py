"""stages/lib/optimizers.py: every choice builds and steps on the CPU, and resumes exactly."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
import torch

from stages.lib.optimizers import OPTIMIZERS, build_optimizer
from stages.lib.params import UserError


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 64 x 128 = 8,192 weights: above bitsandbytes' 4,096 floor for 8-bit states
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(16, 128, generator=g), torch.randn(16, 1, generator=g)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def test_unknown_name_is_one_line_naming_the_key() -> None:
    with pytest.raises(UserError, match=r"^train.optimizer: expected one of adamw, adamw_8bit, "
                                        r"paged_adamw_8bit, paged_adamw_32bit, got 'adam8'$"):
        build_optimizer("adam8", _model().parameters(), lr=1e-3, weight_decay=0.0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_from_state_dict_equals_uninterrupted(name: str, caplog: pytest.LogCaptureFixture) -> None:
    uninterrupted = _model()
    opt = build_optimizer(name, uninterrupted.parameters(), lr=1e-2, weight_decay=0.01)
    for i in range(6):
        _step(uninterrupted, opt, i)

    first = _model()
    with caplog.at_level(logging.INFO, logger="qlora"), warnings.catch_warnings():
        warnings.simplefilter("error")  # bitsandbytes' CPU paging warning is replaced by a log line
        opt = build_optimizer(name, first.parameters(), lr=1e-2, weight_decay=0.01)
        for i in range(3):
            _step(first, opt, i)
    if name.startswith("paged_"):
        assert "runs it unpaged" in caplog.text
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt = build_optimizer(name, resumed.parameters(), lr=1e-2, weight_decay=0.01)
    opt.load_state_dict(saved["optimizer"])
    for i in range(3, 6):
        _step(resumed, opt, i)
    moved = False
    for a, b, start in zip(resumed.parameters(), uninterrupted.parameters(), _model().parameters(), strict=True):
        assert torch.equal(a, b)
        moved |= not torch.equal(a, start)
    assert moved


def test_8bit_states_are_8bit() -> None:
    model = _model()
    opt = build_optimizer("adamw_8bit", model.parameters(), lr=1e-3, weight_decay=0.0)
    _step(model, opt, 0)
    state = opt.state[model[0].weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_only_trainable_parameters() -> None:
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = build_optimizer("adamw", model.parameters(), lr=1e-3, weight_decay=0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == 3

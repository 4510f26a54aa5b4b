"""``PrecisionCore`` driven by hand, the way a shell drives it, with no Lightning anywhere: a plain PyTorch loop."""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mp.options import GRADSCALER_RULE, PluginOptions
from lightning_mp.step.core import PrecisionCore


def _data(steps: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 4, generator=gen) for _ in range(steps)]
    return [(x, x.sum(dim=1, keepdim=True)) for x in xs]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _drive(core: PrecisionCore, model: nn.Module, data, bad=()) -> torch.optim.Optimizer:
    """The shell's part: a micro-batch under the core's context, the scaled loss's backward, the step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    core.setup(model)
    for i, (x, y) in enumerate(data):
        with core.micro_batch():
            loss = F.mse_loss(model(x).float(), y)
        if i in bad:
            loss = loss * float("nan")
        core.scale_loss(loss).backward()
        core.optimizer_step(optimizer, automatic=False)
        optimizer.zero_grad()
    core.teardown()
    return optimizer


def test_a_core_in_a_plain_loop_skips_a_bad_step_as_if_its_batch_never_came():
    told = []
    core = PrecisionCore(PluginOptions("bf16-mixed", device="cpu"), warn=told.append)
    ours = _model()
    _drive(core, ours, _data(), bad={2})
    reference = _model()  # the same loop in bf16 autocast, without the bad batch
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    for i, (x, y) in enumerate(_data()):
        if i == 2:
            continue
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.mse_loss(reference(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), reference.parameters()))
    assert (core.ledger.optimizer_steps, core.ledger.skipped_steps) == (6, 1)
    assert [(e.step, e.phase) for e in core.ledger.events] == [(3, "forward")]


def test_an_fp16_core_in_a_plain_loop_follows_gradscaler_step_for_step():
    options = PluginOptions("16-mixed", device="cpu", scaler={"init_scale": 2.0**18, **GRADSCALER_RULE})
    core = PrecisionCore(options, warn=lambda message: None)
    ours = _model()
    _drive(core, ours, _data(8))
    reference, scaler = _model(), torch.amp.GradScaler("cpu", init_scale=2.0**18)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    for x, y in _data(8):
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            loss = F.mse_loss(reference(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), reference.parameters()))
    assert core.scaler.get_scale() == scaler.get_scale() and core.ledger.skipped_steps > 0


def test_the_core_imports_no_lightning():
    code = "import sys, lightning_mp.step.core; print([m for m in sys.modules if m.split('.')[0] == 'lightning'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

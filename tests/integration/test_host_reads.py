"""Host reads per clean step of values computed in that same step: what stalls a GPU (every ``.item()`` waits for
the device to catch up). A dispatch mode remembers every tensor an operation produced or wrote during the step and
counts ``aten._local_scalar_dense`` on them; ``Tensor.tolist`` / ``numpy`` bypass dispatch on a CPU tensor and are
patched to count too. Reading an earlier step's value later (the device verdict of a fused step) is not counted:
by then the device has finished it.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from lightning_mp import AdaptiveLossScaler, AdaptiveMP
from lightning_mp._compat import written_tensors
from tests.helpers import TinyRegressor, fit, loader

STEPS = 8


class HostReads(L.Callback):
    """Counts, per optimizer step, host reads of values computed in that step (from one batch start to the next)."""

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self._fresh = WeakIdKeyDictionary()  # by identity: every tensor made or written in this step
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.ops.aten._local_scalar_dense.default and args[0] in counter._fresh:
                    counter.per_step[-1] += 1
                out = func(*args, **kwargs)
                for tensor in (*written_tensors(func, args, kwargs), *(out if isinstance(out, tuple) else (out,))):
                    if isinstance(tensor, torch.Tensor):
                        counter._fresh[tensor] = True
                return out

        self._mode = Mode()

    def _counting(self, original):
        counter = self

        def read(tensor, *args, **kwargs):
            if counter.per_step and tensor in counter._fresh:
                counter.per_step[-1] += 1
            return original(tensor, *args, **kwargs)

        return read

    def on_train_start(self, trainer, pl_module):
        self._originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counting(original))
        self._mode.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._fresh = WeakIdKeyDictionary()
        self.per_step.append(0)

    def on_train_end(self, trainer, pl_module):
        self._mode.__exit__(None, None, None)
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)


class Fused(TinyRegressor):
    """SGD with momentum (``fused=True`` or not: SGD reads nothing on the host itself, unlike unfused Adam's
    per-parameter step count), an LR schedule stepped every step, and a NaN loss on ``bad_steps``."""

    def __init__(self, fused: bool = True, bad_steps=()) -> None:
        super().__init__(lr=1e-2, poison_steps=bad_steps, scheduler="step")
        self.fused, self.lrs = fused, []

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, fused=self.fused)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _reads(plugin, fused: bool) -> list[int]:
    counter = HostReads()
    fit(plugin, model_cls=lambda: Fused(fused), data=loader(samples=4 * STEPS), max_steps=STEPS, callbacks=[counter])
    return counter.per_step[1:]  # the first step records the execution order and resolves the device


def _fp16(rescue: bool) -> AdaptiveMP:
    scaler = AdaptiveLossScaler("cpu", init_scale=256.0)  # no overflow on this model: every step is clean
    return AdaptiveMP("16-mixed", scaler=scaler, rescue=rescue, stats="off", attach_callbacks=False)


def test_the_counter_sees_lightnings_own_reads():
    """The reference: Lightning's MixedPrecision reads nothing in bf16 and GradScaler's one flag in fp16."""
    assert max(_reads(MixedPrecision("bf16-mixed", "cpu"), fused=False)) == 0
    assert max(_reads(MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", 256.0)), False)) == 1
    assert max(_reads(MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", 256.0)), True)) == 0


@pytest.mark.parametrize(
    ("make_plugin", "fused", "most"),
    [
        (lambda: AdaptiveMP("bf16-mixed", stats="off", attach_callbacks=False), True, 0),
        (lambda: AdaptiveMP("32-true", stats="off", attach_callbacks=False), True, 0),
        (lambda: _fp16(rescue=False), True, 0),
        (lambda: AdaptiveMP("bf16-mixed", stats="off", attach_callbacks=False), False, 1),
        (lambda: _fp16(rescue=False), False, 1),
        (lambda: _fp16(rescue=True), True, 1),
    ],
    ids=["bf16-fused", "fp32-fused", "fp16-fused-no-rescue", "bf16", "fp16", "fp16-fused-rescue"],
)
def test_a_clean_step_reads_at_most_the_skip_verdict_and_nothing_where_the_optimizer_skips_on_the_device(
    make_plugin, fused, most
):
    reads = _reads(make_plugin(), fused)
    assert len(reads) == STEPS - 1 and max(reads) == most, reads


def test_a_step_skipped_on_the_device_is_counted_and_the_schedule_waits_as_when_it_is_read_at_once():
    runs = {}
    for fused in (True, False):
        plugin = AdaptiveMP("bf16-mixed", attach_callbacks=False)
        model = Fused(fused, bad_steps={2, 5})
        fit(plugin, model=model, max_steps=STEPS, data=loader(samples=4 * STEPS))
        runs[fused] = (plugin.skipped_steps, [e.step for e in plugin.overflow_events], model.lrs)
    assert runs[True] == runs[False]
    skipped, steps, lrs = runs[True]
    assert skipped == 2 and steps == [3, 6]
    assert lrs == [1e-2 * 0.5**k for k in (0, 1, 2, 2, 3, 4, 4, 5)], "the learning rate of every update"

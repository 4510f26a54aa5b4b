"""An EMA of the weights averages real steps only: Lightning's EMAWeightAveraging, and a timm-style EMA updated in
``on_train_batch_end`` that asks ``plugin.step_was_skipped()``. Each run with a skipped bad batch is compared with
the same run without that batch."""

from __future__ import annotations

import copy

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_mp import AdaptiveMP
from tests.helpers import TinyRegressor, fit, loader, loader_with

BAD = 2  # the index of the bad batch


def _data(with_bad: bool):
    x, y = loader(samples=24).dataset.tensors
    x, y = x.clone(), y.clone()
    if not with_bad:  # the same batches without the bad one
        keep = [i for i in range(len(x)) if i // 4 != BAD]
        return loader_with(x[keep], y[keep])
    return loader_with(x, y)


class PoisonedBatch(TinyRegressor):
    """The batch at ``BAD`` gets a NaN loss (if it is there)."""

    def __init__(self, with_bad: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.with_bad = with_bad

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.with_bad and batch_idx == BAD else loss


def test_lightnings_ema_callback_does_not_average_a_skipped_step():
    ema = EMAWeightAveraging(decay=0.5)
    plugin = AdaptiveMP("bf16-mixed", attach_callbacks=False)
    model, _ = fit(plugin, model_cls=PoisonedBatch, data=_data(True), max_steps=6, callbacks=[ema])
    assert plugin.skipped_steps == 1
    reference = EMAWeightAveraging(decay=0.5)
    clean = AdaptiveMP("bf16-mixed", attach_callbacks=False)
    fit(clean, model_cls=lambda: PoisonedBatch(with_bad=False), data=_data(False), max_steps=5, callbacks=[reference])
    ours, theirs = ema._average_model.module, reference._average_model.module
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    assert ema._average_model.n_averaged == reference._average_model.n_averaged == 5
    assert "should_update" not in ema.__dict__, "the callback is left as it was after the fit"


class TimmStyleEMA(PoisonedBatch):
    """timm's ModelEma pattern: a deep copy updated after every batch, which asks the plugin first."""

    def on_fit_start(self):
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.updates = 0

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.precision_plugin.step_was_skipped(self.optimizers()):
            return
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.net.parameters()):
                e.mul_(0.5).add_(p, alpha=0.5)
        self.updates += 1


def test_a_timm_style_ema_asks_the_plugin_and_skips_a_skipped_step():
    model, _ = fit(AdaptiveMP("bf16-mixed"), model_cls=TimmStyleEMA, data=_data(True), max_steps=6)
    reference, _ = fit(
        AdaptiveMP("bf16-mixed"), model_cls=lambda: TimmStyleEMA(with_bad=False), data=_data(False), max_steps=5
    )
    assert model.updates == reference.updates == 5
    assert all(torch.equal(a, b) for a, b in zip(model.ema.parameters(), reference.ema.parameters()))

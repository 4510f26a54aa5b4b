"""A skipped step leaves no trace: parameters, optimizer state and buffers (BatchNorm statistics) are exactly
what they would be had the bad batch never been in the data."""

import pytest
import torch
from torch import nn

from lightning_mp import AdaptiveLossScaler, AdaptiveMP
from tests.helpers import TinyRegressor, fit, loader_with

BAD_BATCH = 2


class NormRegressor(TinyRegressor):
    """Linear -> BatchNorm1d -> ReLU -> Linear: BatchNorm updates its running statistics in every forward."""

    def __init__(self, **kwargs):
        super().__init__(optimizer="adam", lr=0.01, **kwargs)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def data(drop: tuple[int, ...] = (), batches: int = 6, batch_size: int = 4):
    """Six batches; batch 2 has one NaN in one row. ``drop``: batches left out (the run that never saw them)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batches, batch_size, 4, generator=gen)
    x[BAD_BATCH, 1, 2] = float("nan")
    keep = [b for b in range(batches) if b not in drop]
    x = x[keep].reshape(-1, 4)
    return loader_with(x, x.nan_to_num().sum(dim=1, keepdim=True), batch_size)


PLUGINS = {
    "fp16": lambda: AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=256.0)),
    "bf16": lambda: AdaptiveMP("bf16-mixed"),
    "fp32": lambda: AdaptiveMP("32-true"),
}


@pytest.mark.parametrize("precision", list(PLUGINS))
@pytest.mark.parametrize(
    ("accumulate", "step_batches"),
    [(1, (BAD_BATCH,)), (2, (BAD_BATCH, BAD_BATCH + 1))],
    ids=["every-batch", "accumulate-2"],
)
def test_batchnorm_statistics_after_a_skipped_batch_equal_a_run_without_it(precision, accumulate, step_batches):
    """With accumulation the whole accumulated step is skipped, so the reference leaves out all its batches."""
    plugin = PLUGINS[precision]()
    run = dict(model_cls=NormRegressor, max_epochs=1, max_steps=-1, accumulate_grad_batches=accumulate)
    skipped, _ = fit(plugin, data=data(), **run)
    reference, _ = fit(PLUGINS[precision](), data=data(drop=step_batches), **run)
    assert plugin.skipped_steps == 1 and plugin.overflow_events[0].phase == "input"
    ours, theirs = skipped.state_dict(), reference.state_dict()
    assert torch.isfinite(ours["net.1.running_mean"]).all()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name

"""``CoreView``: what every shell of the core shows its users, read-only.

``AdaptiveMP`` (the Trainer plugin, ``plugin.py``) and ``lightning_mp.fabric.AdaptiveMP`` (the Fabric plugin)
each hold one :class:`~.core.PrecisionCore` as ``self.core`` and drive it from their framework's hooks; the
callbacks, the report and the CLI read a run through these properties, whichever shell ran it.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_mp.diagnosis.statistics import ModuleStatistics
from lightning_mp.fallback.promotion import Promotion
from lightning_mp.lowbit.layers import LowBitLayers
from lightning_mp.options import PluginOptions
from lightning_mp.reporting.events import OverflowEvent
from lightning_mp.reporting.ledger import RunLedger
from lightning_mp.scaling import AdaptiveLossScaler
from lightning_mp.step.core import PrecisionCore

__all__ = ["CoreView"]


class CoreView:
    """Read-only properties over ``self.core`` (the public names of DESIGN.md's API)."""

    core: PrecisionCore

    @property
    def precision(self) -> str:  # type: ignore[override]
        """The precision in force: ``"auto"`` until setup resolves it; ``"bf16-mixed"`` after a switch."""
        return self.core.setting.name

    @property
    def device(self) -> str | None:
        return self.core.setting.device

    @property
    def scaler(self) -> AdaptiveLossScaler | None:
        return self.core.scaler

    @scaler.setter
    def scaler(self, scaler: AdaptiveLossScaler | None) -> None:
        self.core.scaler = scaler

    @property
    def ledger(self) -> RunLedger:
        """Optimizer steps, skipped steps and overflow events of this run (what callbacks and reports read)."""
        return self.core.ledger

    @property
    def statistics(self) -> ModuleStatistics:
        """Per-module headroom and underflow sampled so far."""
        return self.core.statistics

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps attempted so far, skipped ones included."""
        return self.core.ledger.optimizer_steps

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients, whatever the precision."""
        self.core.settle_pending()
        return self.core.ledger.skipped_steps

    def step_was_skipped(self, optimizer: Any = None) -> bool:
        """Whether the last ``optimizer.step()`` was skipped for non-finite gradients (``optimizer``: a torch
        optimizer or Lightning's wrapper of one; ``None``: the last optimizer step of the run, any optimizer).

        Ask it before updating anything that should follow real steps only: an EMA of the weights in
        ``on_train_batch_end`` (timm's ``ModelEma``), a step-interval scheduler you step yourself. (Lightning's
        ``WeightAveraging`` callbacks and step-interval LR schedulers ask it already.)
        """
        return self.core.step_was_skipped(getattr(optimizer, "optimizer", optimizer))

    @property
    def rescued_steps(self) -> int:
        """fp16 steps that overflowed in the backward and were re-run at a lower scale instead of skipped."""
        return self.core.ledger.rescued_steps

    @property
    def overflow_events(self) -> list[OverflowEvent]:
        """Non-finite events, oldest first (the last ``max_events``)."""
        return self.core.ledger.events

    @property
    def overflow_counts(self) -> dict[str, int]:
        """Events per phase over the whole run (never truncated)."""
        return dict(self.core.ledger.counts)

    @property
    def fp32_modules(self) -> list[str]:
        """Fully qualified names of the modules running in fp32 now (static, default and promoted)."""
        return list(self.core.decisions.fallback.promotions)

    @property
    def promotions(self) -> list[Promotion]:
        """Why each module in ``fp32_modules`` runs in fp32, then each fp8/int8 layer moved back to bf16
        (``scope="low_bit"``)."""
        return self.core.decisions.fallback.all_promotions

    @property
    def low_bit_layers(self) -> list[str]:
        """The layers multiplying in fp8/int8 now (empty for the other precisions)."""
        return list(self.core.decisions.low_bit.layers)

    @property
    def low_bit(self) -> LowBitLayers:
        """fp8/int8: every converted layer, those moved back (``.moved``), and each layer's latest and worst
        measurements (``.latest``, ``.worst``; see ``lightning_mp.lowbit``)."""
        return self.core.decisions.low_bit

    @property
    def scale_history(self) -> list[tuple[int, float]]:
        """``(optimizer step, loss scale)`` after each step (fp16; bounded, see ``ledger.ScaleHistory``)."""
        return self.core.scales.points()

    @property
    def options(self) -> PluginOptions:
        """The knobs this plugin was built with (``plugin.options.stats_every``, ...; ``None`` there means the
        default, and ``plugin.core.stats_every`` is the cadence in force)."""
        return self.core.options

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """``torch.float16`` / ``torch.bfloat16`` under mixed precision, ``None`` for fp32."""
        return self.core.setting.autocast_dtype

    @property
    def stats_dtype(self) -> torch.dtype:
        """The format headroom and underflow are judged against: the autocast dtype, fp32 without one."""
        return self.core.setting.stats_dtype

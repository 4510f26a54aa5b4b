"""Step-interval LR schedulers that do not advance on a skipped optimizer step.

Lightning steps schedulers after every optimizer step, even one the scaler or the guard skipped; a warm-up then
ends early by as many steps as were skipped. Wrapping the scheduler (instead of patching it) keeps its
``state_dict`` free of our code, and ``__class__`` keeps ``isinstance`` checks working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.core.optimizer import LRSchedulerConfig
from torch.optim import Optimizer

__all__ = ["SkipAwareScheduler", "skip_aware"]


class SkipAwareScheduler:
    """Forwards everything to a step-interval LR scheduler, but drops ``step()`` after a skipped optimizer step.

    Args:
        scheduler: the wrapped scheduler.
        step_was_skipped: tells whether the last step of an optimizer was skipped.
    """

    def __init__(self, scheduler: Any, step_was_skipped: Callable[[Optimizer], bool]) -> None:
        object.__setattr__(self, "_scheduler", scheduler)
        object.__setattr__(self, "_step_was_skipped", step_was_skipped)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105 - makes isinstance(proxy, StepLR) true, as unittest.mock does
        return type(self._scheduler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._scheduler, name, value)

    def step(self, *args: Any, **kwargs: Any) -> None:
        if self._step_was_skipped(self._scheduler.optimizer):
            return None
        return self._scheduler.step(*args, **kwargs)


def skip_aware(config: Any, step_was_skipped: Callable[[Optimizer], bool]) -> Any:
    """Wrap the scheduler of a Lightning ``LRSchedulerConfig`` stepped every optimizer step; others unchanged.

    Epoch-interval and ``ReduceLROnPlateau`` schedulers are left alone: a skipped step is not an epoch, and a
    plateau scheduler reads a metric, not the step count.
    """
    if not isinstance(config, LRSchedulerConfig) or config.interval != "step" or config.reduce_on_plateau:
        return config
    if not isinstance(config.scheduler, SkipAwareScheduler):
        config.scheduler = SkipAwareScheduler(config.scheduler, step_was_skipped)
    return config

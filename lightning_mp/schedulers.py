"""Step-interval LR schedulers that do not advance on a skipped optimizer step.

Lightning steps schedulers after every optimizer step, even one the scaler or the guard skipped; a warm-up then
ends early by as many steps as were skipped. Wrapping the scheduler (instead of patching it) keeps its
``state_dict`` free of our code, and ``__class__`` keeps ``isinstance`` checks working.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.core.optimizer import LRSchedulerConfig

__all__ = ["SkipAwareScheduler", "skip_aware"]


class SkipAwareScheduler:
    """Forwards everything to a step-interval LR scheduler, but drops ``step()`` after a skipped optimizer step.

    Args:
        scheduler: the wrapped scheduler.
        core: tells when an optimizer's last step is known and whether it was skipped (``when_settled``).
    """

    def __init__(self, scheduler: Any, core: Any) -> None:
        object.__setattr__(self, "_scheduler", scheduler)
        object.__setattr__(self, "_when_settled", core.when_settled)
        object.__setattr__(self, "_settle", core.settle_pending)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105 - makes isinstance(proxy, StepLR) true, as unittest.mock does
        return type(self._scheduler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._scheduler, name, value)

    def step(self, *args: Any, **kwargs: Any) -> None:
        # The verdict may still be on the device (an optimizer that skips there): then the scheduler steps when
        # it is read, before the next update, which so uses the learning rate it would have.
        self._when_settled(self._scheduler.optimizer, lambda skipped: skipped or self._scheduler.step(*args, **kwargs))

    def state_dict(self) -> dict[str, Any]:
        self._settle()  # a checkpoint holds the schedule as of the last step, its deferred step included
        return self._scheduler.state_dict()


def skip_aware(config: Any, core: Any) -> Any:
    """Wrap the scheduler of a Lightning ``LRSchedulerConfig`` stepped every optimizer step; others unchanged.

    Epoch-interval and ``ReduceLROnPlateau`` schedulers are left alone: a skipped step is not an epoch, and a
    plateau scheduler reads a metric, not the step count.
    """
    if not isinstance(config, LRSchedulerConfig) or config.interval != "step" or config.reduce_on_plateau:
        return config
    if not isinstance(config.scheduler, SkipAwareScheduler):
        config.scheduler = SkipAwareScheduler(config.scheduler, core)
    return config

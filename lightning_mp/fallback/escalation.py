"""The escalation ladder: what to do when skipping steps is not getting a run anywhere.

Two observations start a climb: the fp16 loss scale sits at its floor and still overflows (the scaler's
``ScaleAction.FLOOR``), or ``max_consecutive_skips`` optimizer steps in a row were skipped. Each climb takes
the first rung that applies:

1. ``PROMOTE``: run the most recently blamed module in fp32, or its enclosing block if it already runs there;
2. ``LEAVE_LOW_BIT``: move every remaining fp8/int8 layer back to bf16 (the low-bit formats' own rung);
3. ``SWITCH_TO_BF16``: leave fp16 for bf16, which has fp32's range, where the device runs bf16 natively;
4. ``GIVE_UP``: stop with :class:`~lightning_mp.LossScaleFloorError` and the recent events.

The ladder is pure: observations in, candidate rungs out. The plugin applies a rung and, when a promotion turns
out impossible (the module already runs in fp32), takes the next candidate.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_mp.reporting.events import OverflowEvent

__all__ = ["Escalation", "EscalationLadder", "Rung", "enclosing", "give_up_message"]


class Rung(str, Enum):
    """A rung of the escalation ladder (see ``escalation.py``)."""

    PROMOTE = "promote"  # run the blamed module, or its enclosing block, in fp32
    LEAVE_LOW_BIT = "leave_low_bit"  # move every remaining fp8/int8 layer back to bf16
    SWITCH_TO_BF16 = "switch_to_bf16"  # leave fp16 for bf16 (fp32's range) where the device runs it natively
    GIVE_UP = "give_up"  # stop with a diagnosis


@dataclass(frozen=True)
class Escalation:
    """One candidate rung, with the module it would promote (``PROMOTE`` only) and why the ladder was climbed."""

    rung: Rung
    reason: str
    module: str | None = None


def enclosing(fqn: str, names: Collection[str]) -> str | None:
    """The nearest proper ancestor of ``fqn`` among ``names`` (the enclosing block), if any."""
    parts = fqn.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if parent in names:
            return parent
    return None


class EscalationLadder:
    """Counts skipped steps in a row and decides when, and to which rungs, to escalate.

    Args:
        max_consecutive_skips: skipped optimizer steps in a row that start a climb.
    """

    def __init__(self, max_consecutive_skips: int = 50) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0

    def observe(self, skipped: bool, at_floor: bool = False) -> str | None:
        """Feed one optimizer step; returns why to climb now, or ``None``. A climb restarts the count."""
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if at_floor:
            reason = "the loss scale is at its floor"
        elif self.consecutive_skips >= self.max_consecutive_skips:
            reason = f"{self.consecutive_skips} optimizer steps in a row were skipped"
        else:
            return None
        self.consecutive_skips = 0
        return reason

    @staticmethod
    def candidates(
        reason: str,
        blamed: str | None,
        in_fp32: Collection[str],
        module_names: Collection[str],
        can_switch_to_bf16: bool,
        low_bit_left: bool = False,
    ) -> list[Escalation]:
        """The rungs to try, in order; the last one is always ``GIVE_UP``.

        Args:
            reason: why the ladder is climbed (from ``observe``), carried into every candidate.
            blamed: the most recently blamed module, if any.
            in_fp32: modules already running in fp32.
            module_names: every module of the model (to find an enclosing block).
            can_switch_to_bf16: the run is fp16 on a device that runs bf16 natively.
            low_bit_left: some layers still multiply in fp8/int8.
        """
        rungs = []
        if blamed is not None:
            target = blamed if blamed not in in_fp32 else enclosing(blamed, module_names)
            if target is not None and target not in in_fp32:
                rungs.append(Escalation(Rung.PROMOTE, reason, target))
        if low_bit_left:
            rungs.append(Escalation(Rung.LEAVE_LOW_BIT, reason))
        if can_switch_to_bf16:
            rungs.append(Escalation(Rung.SWITCH_TO_BF16, reason))
        rungs.append(Escalation(Rung.GIVE_UP, reason))
        return rungs

    def state_dict(self) -> dict[str, int]:
        return {"consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive_skips = int(state.get("consecutive_skips", 0))


def give_up_message(reason: str, recent: Sequence[OverflowEvent]) -> str:
    """The diagnosis of the last rung: why, the recent events, and what usually helps."""
    shown = ", ".join(f"step {e.step} {e.phase} {e.module or '-'} {e.kind}" for e in recent)
    return (
        f"AdaptiveMP gave up: {reason}, and none of fp32 promotion, moving fp8/int8 layers back to bf16 or a"
        " switch from fp16 to bf16 helped (those that applied). Recent events:"
        f" {shown or 'none'}. Non-finite values at every scale usually mean diverging training: lower the"
        " learning rate, clip gradients, or check the data and the loss."
    )

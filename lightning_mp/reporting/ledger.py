"""The run ledger: what happened in a run, for everyone who reports on it.

The plugin writes it; the callbacks, the report and the CLI read it through read-only properties. It counts
optimizer steps and skipped steps, keeps the newest ``max_events`` overflow events in a bounded buffer and the
per-phase totals of all of them. Every event gets a sequence number (1, 2, ...) that is never reused: a
reader remembers the last number it has seen and asks for the newer events, which stays right once the
buffer is full and its length no longer grows.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from lightning_mp.diagnosis.attribution import Finding
from lightning_mp.fallback.escalation import Escalation
from lightning_mp.fallback.promotion import Promotion
from lightning_mp.reporting.events import OverflowEvent
from lightning_mp.scaling import ScaleAction

__all__ = ["RunLedger"]


class RunLedger:
    """Optimizer steps, skipped and rescued steps and overflow events of one run; checkpointed with the plugin.

    Args:
        max_events: events kept in memory (oldest dropped); ``counts`` keeps the per-phase totals of all.
    """

    def __init__(self, max_events: int = 10_000) -> None:
        self.optimizer_steps = 0  # optimizer steps attempted, skipped ones included
        self.skipped_steps = 0  # optimizer steps skipped for non-finite gradients or a loss spike
        self.rescued_steps = 0  # fp16 steps that overflowed, were re-run at a lower scale and then stepped
        self.counts: dict[str, int] = {}  # phase -> events, never truncated
        self.last_seq = 0  # sequence number of the newest event
        self._events: deque[OverflowEvent] = deque(maxlen=max_events)

    @property
    def events(self) -> list[OverflowEvent]:
        """The kept events, oldest first."""
        return list(self._events)

    def events_after(self, seq: int) -> list[OverflowEvent]:
        """Kept events newer than sequence number ``seq`` (all kept events for ``seq=0``)."""
        return [event for event in self._events if event.seq > seq]

    def last_blamed_module(self) -> str | None:
        """The module of the newest kept event that names one."""
        return next((e.module for e in reversed(self._events) if e.module is not None), None)

    def start_step(self) -> int:
        """Count one optimizer step; returns its number (from 1)."""
        self.optimizer_steps += 1
        return self.optimizer_steps

    def step_ended(self, skipped: bool, rescued: bool) -> None:
        """Count how the optimizer step ended: skipped, or taken after a rescue (or plainly taken)."""
        self.skipped_steps += skipped
        self.rescued_steps += rescued and not skipped

    def record(
        self,
        finding: Finding,
        scale: float | None,
        scaler_action: ScaleAction | None = None,
        promotion: Promotion | None = None,
        escalation: Escalation | None = None,
        spike_ratio: float | None = None,
    ) -> OverflowEvent:
        """Record the skipped current optimizer step: where it went bad and what was done about it."""
        self.last_seq += 1
        event = OverflowEvent(
            step=self.optimizer_steps,
            phase=finding.phase,
            module=finding.module,
            kind=finding.kind,
            dtype=finding.dtype,
            scale=scale,
            seq=self.last_seq,
            scaler_action=scaler_action,
            promoted=promotion.module if promotion is not None else None,
            promoted_scope=promotion.scope if promotion is not None else None,
            escalation=escalation.rung if escalation is not None else None,
            escalated_module=escalation.module if escalation is not None else None,
            op=finding.op,
            source=finding.source,
            reproduced=finding.reproduced,
            spike_ratio=spike_ratio,
        )
        self._events.append(event)
        self.counts[finding.phase] = self.counts.get(finding.phase, 0) + 1
        return event

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "rescued_steps": self.rescued_steps,
            "events": [e.to_dict() for e in self._events],
            "overflow_counts": dict(self.counts),
            "last_seq": self.last_seq,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer_steps = int(state.get("steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rescued_steps = int(state.get("rescued_steps", 0))
        self._events.clear()
        self._events.extend(OverflowEvent.from_dict(e) for e in state.get("events", ()))
        self.counts = dict(state.get("overflow_counts", {}))
        self.last_seq = int(state.get("last_seq", self._events[-1].seq if self._events else 0))

"""The run ledger: what happened in a run, for everyone who reports on it.

The plugin writes it; the callbacks, the report and the CLI read it through read-only properties. It counts
optimizer steps and skipped steps, keeps the newest ``max_events`` overflow events in a bounded buffer and the
per-phase totals of all of them. Every event gets a sequence number (1, 2, ...) that is never reused: a
reader remembers the last number it has seen and asks for the newer events, which stays right once the
buffer is full and its length no longer grows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from lightning_mp.attribution import Finding, Kind, Phase
from lightning_mp.scaling import ScaleAction

__all__ = ["EventWarnings", "OverflowEvent", "Rung", "RunLedger", "ScaleHistory"]


class Rung(str, Enum):
    """A rung of the escalation ladder (see ``escalation.py``)."""

    PROMOTE = "promote"  # run the blamed module, or its enclosing block, in fp32
    SWITCH_TO_BF16 = "switch_to_bf16"  # leave fp16 for bf16 (fp32's range) where the device runs it natively
    GIVE_UP = "give_up"  # stop with a diagnosis


@dataclass(frozen=True)
class OverflowEvent:
    """One skipped step, attributed to where its non-finite value started, and what was done about it.

    ``module`` is the fully qualified name of the module (``encoder.layers.3.attn``), or ``None`` when the
    phase has no module (``input``, ``loss``) or the forward pass was not localized yet. ``action`` is the
    display text of the typed fields after it (``"skipped; scale backed off"``); it is built from them when
    not given.
    """

    step: int
    phase: Phase
    module: str | None
    kind: Kind
    dtype: str
    scale: float | None
    action: str = ""
    seq: int = 0  # this event's number in the run, from 1; never reused
    scaler_action: ScaleAction | None = None  # what the loss scaler did on this step (fp16)
    promoted: str | None = None  # the module promoted to fp32 for repeated blame at this event
    promoted_scope: str | None = None  # "module" (all of it) or "own_code" (its own operations only)
    escalation: Rung | None = None  # the escalation rung taken at this event
    escalated_module: str | None = None  # the module the PROMOTE rung put in fp32
    op: str | None = None  # the operation that produced the first non-finite value ("aten::softmax"), from a replay
    source: str | None = None  # the user's line that ran it ("model.py:67"), from a replay
    reproduced: bool | None = None  # the replay went bad the same way (None: no replay ran)

    def __post_init__(self) -> None:
        if not self.action:
            object.__setattr__(self, "action", self._describe())

    def _describe(self) -> str:
        words = ["skipped"]
        if self.scaler_action is not None and self.scaler_action.text:
            words.append(self.scaler_action.text)
        if self.promoted is not None:
            own = "'s own code" if self.promoted_scope == "own_code" else ""
            words.append(f"promoted {self.promoted}{own} to fp32")
        if self.escalation is Rung.PROMOTE:
            words.append(f"escalation: promoted {self.escalated_module} to fp32")
        elif self.escalation is Rung.SWITCH_TO_BF16:
            words.append("escalation: switched fp16 to bf16")
        return "; ".join(words)

    @property
    def where(self) -> str:
        """Where it went non-finite, in one line: ``"blocks.1.attn: aten::softmax in float16 produced inf
        (model.py:67)"``; without a replay, what the cheap attribution knows (``"forward (inf, float16)"``)."""
        place = self.module or {"loss": "the loss", "input": "the batch"}.get(self.phase, f"{self.phase} pass")
        if self.op is None:
            return f"{place}: {self.phase} value {self.kind} ({self.dtype})"
        backward = " in backward" if self.phase == "backward" else ""
        line = f" ({self.source})" if self.source else ""
        return f"{place}: {self.op}{backward} in {self.dtype} produced {self.kind}{line}"

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (enums as their strings): JSON and ``torch.load(weights_only=True)`` safe."""
        return {k: v.value if isinstance(v, Enum) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OverflowEvent:
        """The inverse of ``to_dict``; also reads the seven-field events of version 0.1 checkpoints."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("scaler_action") is not None:
            values["scaler_action"] = ScaleAction(values["scaler_action"])
        if values.get("escalation") is not None:
            values["escalation"] = Rung(values["escalation"])
        return cls(**values)


class RunLedger:
    """Optimizer steps, skipped steps and overflow events of one run; checkpointed with the plugin.

    Args:
        max_events: events kept in memory (oldest dropped); ``counts`` keeps the per-phase totals of all.
    """

    def __init__(self, max_events: int = 10_000) -> None:
        self.optimizer_steps = 0  # optimizer steps attempted, skipped ones included
        self.guard_skipped = 0  # steps skipped by the bf16/fp32 guard (the scaler counts its own)
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

    def record(self, finding: Finding, scale: float | None, **outcome: Any) -> OverflowEvent:
        """Record a skipped step of the current optimizer step; ``outcome`` are the event's typed action fields."""
        self.last_seq += 1
        event = OverflowEvent(
            step=self.optimizer_steps,
            phase=finding.phase,
            module=finding.module,
            kind=finding.kind,
            dtype=finding.dtype,
            scale=scale,
            seq=self.last_seq,
            op=finding.op,
            source=finding.source,
            reproduced=finding.reproduced,
            **outcome,
        )
        self._events.append(event)
        self.counts[finding.phase] = self.counts.get(finding.phase, 0) + 1
        return event

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.optimizer_steps,
            "guard_skipped_steps": self.guard_skipped,
            "rescued_steps": self.rescued_steps,
            "events": [e.to_dict() for e in self._events],
            "overflow_counts": dict(self.counts),
            "last_seq": self.last_seq,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer_steps = int(state.get("steps", 0))
        self.guard_skipped = int(state.get("guard_skipped_steps", 0))
        self.rescued_steps = int(state.get("rescued_steps", 0))
        self._events.clear()
        events = [OverflowEvent.from_dict(e) for e in state.get("events", ())]
        if events and not events[-1].seq:  # a version 0.1 checkpoint: number the kept events in order
            events = [OverflowEvent.from_dict({**e.to_dict(), "seq": i}) for i, e in enumerate(events, 1)]
        self._events.extend(events)
        self.counts = dict(state.get("overflow_counts", {}))
        self.last_seq = int(state.get("last_seq", events[-1].seq if events else 0))


class ScaleHistory:
    """A bounded ``(step, scale)`` history of the loss scale, for the report's plot.

    Args:
        max_points: the most points kept. The history starts with every optimizer step; when it would exceed
            this, every other point is dropped and from then on only every second (fourth, ...) step is
            recorded, so memory stays bounded on any run length with an even resolution over the whole run.
            ``points()`` always ends with the latest step.
    """

    def __init__(self, max_points: int = 4096) -> None:
        self.kept: list[tuple[int, float]] = []
        self._stride = 1
        self._latest: tuple[int, float] | None = None
        self.resize(max_points)

    def resize(self, max_points: int) -> None:
        """Keep at most ``max_points`` from now on (thinning what is kept if it holds more)."""
        if not isinstance(max_points, int) or isinstance(max_points, bool) or max_points < 2:
            raise ValueError(f"max_points={max_points!r} is invalid: must be an integer >= 2.")
        self.max_points = max_points
        while len(self.kept) > self.max_points:
            self._stride *= 2
            self.kept = [p for p in self.kept if p[0] % self._stride == 0]

    def record(self, step: int, scale: float) -> None:
        self._latest = (step, scale)
        if step % self._stride:
            return
        self.kept.append((step, scale))
        if len(self.kept) > self.max_points:
            self._stride *= 2
            self.kept = [p for p in self.kept if p[0] % self._stride == 0]

    def points(self) -> list[tuple[int, float]]:
        """The kept points, ending with the latest step recorded."""
        if self._latest is not None and (not self.kept or self.kept[-1] != self._latest):
            return [*self.kept, self._latest]
        return list(self.kept)

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale_history": [list(p) for p in self.kept],
            "stride": self._stride,
            "latest": list(self._latest) if self._latest is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = [tuple(p) for p in state.get("scale_history", [])]
        self._stride = state.get("stride", 1)
        latest = state.get("latest")
        self._latest = tuple(latest) if latest is not None else None


class EventWarnings:
    """The warning text for each new place a step went non-finite, once per place (phase, module, operation,
    line): ``step 7: blocks.1.attn: aten::softmax in float16 produced inf (model.py:67); action: skipped``.
    An event with no module (a bad batch, a bad loss, a forward overflow not localized yet) is told once per
    phase: ``step 3: the batch: input value nan (input); action: skipped``."""

    def __init__(self) -> None:
        self._told: set[tuple] = set()
        self._last_seq = 0  # the newest event looked at (the ledger's buffer is bounded: ask by number)

    def new(self, ledger: RunLedger) -> list[str]:
        """Messages for the ledger's events not looked at yet whose place was not told before."""
        if ledger.last_seq == self._last_seq:
            return []  # nothing recorded since: every step of a clean run, without a pass over the events
        messages = []
        for event in ledger.events_after(self._last_seq):
            self._last_seq = event.seq
            key = (event.phase, event.module, event.op, event.source)
            if key not in self._told:
                self._told.add(key)
                messages.append(f"lightning-mp: step {event.step}: {event.where}; action: {event.action}.")
        return messages

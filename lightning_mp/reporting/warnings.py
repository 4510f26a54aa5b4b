"""The warnings a run emits, once per new thing to say: where a step went non-finite (``EventWarnings``)."""

from __future__ import annotations

from lightning_mp.reporting.ledger import RunLedger

__all__ = ["EventWarnings"]


class EventWarnings:
    """The warning text for each new place a step went non-finite, once per place (phase, module, operation,
    line): ``step 7: blocks.1.attn: aten::softmax in float16 produced inf (model.py:67); action: skipped``.
    An event with no module (a bad batch, a bad loss, a forward overflow not localized yet) is told once per
    phase: ``step 3: the batch: input value nan (input); action: skipped``."""

    def __init__(self) -> None:
        self._told: set[tuple] = set()
        self._last_seq = 0  # the newest event looked at (the ledger's buffer is bounded: ask by number)

    def told_up_to(self, ledger: RunLedger) -> None:
        """Consider every event the ledger holds told (a resumed run: they were warned about before)."""
        self._last_seq = ledger.last_seq
        self._told |= {(e.phase, e.module, e.op, e.source) for e in ledger.events}

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

"""The run ledger and its events, without a Trainer."""

import json

import pytest

from lightning_mp import OverflowEvent, ScaleAction
from lightning_mp.diagnosis.attribution import Finding
from lightning_mp.fallback.escalation import Escalation, Rung
from lightning_mp.fallback.promotion import Promotion, Reason
from lightning_mp.reporting.ledger import RunLedger

BACKWARD = Finding("backward", "net.2", "inf", "float16")


def test_every_event_gets_the_next_sequence_number_even_after_the_buffer_is_full():
    ledger = RunLedger(max_events=2)
    for _ in range(5):
        ledger.start_step()
        ledger.record(BACKWARD, 1024.0)
    assert [e.seq for e in ledger.events] == [4, 5]
    assert [e.step for e in ledger.events] == [4, 5]
    assert ledger.last_seq == 5 and ledger.counts == {"backward": 5}


def test_events_after_a_sequence_number_are_exactly_the_newer_kept_ones():
    ledger = RunLedger(max_events=2)
    for _ in range(4):
        ledger.record(BACKWARD, None)
    assert [e.seq for e in ledger.events_after(0)] == [3, 4]
    assert [e.seq for e in ledger.events_after(3)] == [4]
    assert ledger.events_after(4) == []


def test_last_blamed_module_skips_events_without_one():
    ledger = RunLedger()
    ledger.record(BACKWARD, None)
    ledger.record(Finding("input", None, "nan", "input"), None)
    assert ledger.last_blamed_module() == "net.2"


@pytest.mark.parametrize(
    ("outcome", "text"),
    [
        ({}, "skipped"),
        ({"scaler_action": ScaleAction.BACKED_OFF}, "skipped; scale backed off"),
        ({"scaler_action": ScaleAction.HELD}, "skipped"),
        ({"promotion": Promotion("net.2", Reason.OVERFLOW)}, "skipped; promoted net.2 to fp32"),
        (
            {"promotion": Promotion("net", Reason.OVERFLOW, scope="own_code")},
            "skipped; promoted net's own code to fp32",
        ),
        ({"escalation": Escalation(Rung.PROMOTE, "why", "net")}, "skipped; escalation: promoted net to fp32"),
        (
            {"scaler_action": ScaleAction.FLOOR, "escalation": Escalation(Rung.SWITCH_TO_BF16, "why")},
            "skipped; scale at its floor; escalation: switched fp16 to bf16",
        ),
        ({"spike_ratio": 1234.0}, "skipped as a loss spike: finite, but 1.23e+03x the median loss before the last"),
    ],
    ids=[
        "plain",
        "backed-off",
        "silent-action",
        "promoted",
        "promoted-own-code",
        "escalation-promote",
        "escalation-switch",
        "spike",
    ],
)
def test_the_action_text_is_built_from_the_typed_outcome(outcome, text):
    assert RunLedger().record(BACKWARD, 2.0, **outcome).action.startswith(text)


def test_event_dicts_are_plain_json_and_round_trip():
    escalation = Escalation(Rung.GIVE_UP, "why")
    event = RunLedger().record(BACKWARD, 2.0, scaler_action=ScaleAction.TOLERATED, escalation=escalation)
    data = event.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["scaler_action"] == "tolerated" and type(data["scaler_action"]) is str
    assert OverflowEvent.from_dict(data) == event


def test_state_round_trip_keeps_counts_steps_and_numbering():
    ledger = RunLedger(max_events=3)
    for step in range(4):
        ledger.start_step()
        ledger.step_ended(skipped=step % 2 == 0, rescued=step == 1)
        ledger.record(BACKWARD, 4.0)
    restored = RunLedger(max_events=3)
    restored.load_state_dict(ledger.state_dict())
    assert restored.events == ledger.events
    assert (restored.optimizer_steps, restored.skipped_steps, restored.rescued_steps) == (4, 2, 1)
    assert restored.counts == {"backward": 4}
    assert restored.record(BACKWARD, 4.0).seq == 5

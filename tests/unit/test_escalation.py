"""The escalation ladder as a pure rule: observations in, rungs out."""

import pytest

from lightning_mp.diagnosis.attribution import Finding
from lightning_mp.fallback.escalation import Escalation, EscalationLadder, Rung, enclosing, give_up_message
from lightning_mp.reporting.ledger import RunLedger

NAMES = ["encoder", "encoder.layers", "encoder.layers.3", "encoder.layers.3.attn", "head"]


def test_a_run_of_skipped_steps_starts_a_climb_and_restarts_the_count():
    ladder = EscalationLadder(max_consecutive_skips=3)
    assert [ladder.observe(True), ladder.observe(True)] == [None, None]
    assert ladder.observe(True) == "3 optimizer steps in a row were skipped"
    assert ladder.consecutive_skips == 0
    assert [ladder.observe(True), ladder.observe(True), ladder.observe(False), ladder.observe(True)] == [None] * 4


def test_the_floor_starts_a_climb_at_once():
    ladder = EscalationLadder(max_consecutive_skips=50)
    assert ladder.observe(True, at_floor=True) == "the loss scale is at its floor"


def test_the_count_survives_a_checkpoint():
    ladder = EscalationLadder(max_consecutive_skips=3)
    ladder.observe(True)
    ladder.observe(True)
    resumed = EscalationLadder(max_consecutive_skips=3)
    resumed.load_state_dict(ladder.state_dict())
    assert resumed.observe(True) is not None


@pytest.mark.parametrize(
    ("blamed", "in_fp32", "can_switch", "rungs"),
    [
        ("encoder.layers.3.attn", [], True, [("promote", "encoder.layers.3.attn"), ("switch_to_bf16", None)]),
        ("encoder.layers.3.attn", ["encoder.layers.3.attn"], False, [("promote", "encoder.layers.3")]),
        ("encoder.layers.3.attn", ["encoder.layers.3.attn", "encoder.layers.3"], False, []),
        ("head", ["head"], True, [("switch_to_bf16", None)]),
        (None, [], False, []),
    ],
    ids=["promote-blamed", "promote-enclosing", "enclosing-done", "no-block", "nothing-blamed"],
)
def test_candidates_in_order_always_ending_with_give_up(blamed, in_fp32, can_switch, rungs):
    candidates = EscalationLadder.candidates("why", blamed, in_fp32, NAMES, can_switch)
    assert [(c.rung.value, c.module) for c in candidates] == [*rungs, ("give_up", None)]
    assert all(c.reason == "why" for c in candidates)
    assert candidates[-1] == Escalation(Rung.GIVE_UP, "why")


def test_enclosing_block_is_the_nearest_registered_ancestor():
    assert enclosing("encoder.layers.3.attn", NAMES) == "encoder.layers.3"
    assert enclosing("encoder", NAMES) is None


def test_the_diagnosis_names_the_reason_and_the_recent_events():
    ledger = RunLedger()
    ledger.start_step()
    ledger.record(Finding("backward", "head", "nan", "float16"), 1.0)
    message = give_up_message("the loss scale is at its floor", ledger.events)
    assert "gave up: the loss scale is at its floor" in message
    assert "step 1 backward head nan" in message and "lower the learning rate" in message

"""LossScaleMonitor's history stays bounded on any run length, evenly spaced, and ends at the latest step."""

import pytest

from lightning_mp import LossScaleMonitor


def test_history_is_every_step_until_full():
    monitor = LossScaleMonitor(max_points=100)
    for step in range(1, 51):
        monitor.record(step, 2.0**step)
    assert monitor.history() == [(s, 2.0**s) for s in range(1, 51)]


def test_history_is_bounded_evenly_spaced_and_ends_with_the_latest_step():
    monitor = LossScaleMonitor(max_points=64)
    steps = 100_003
    for step in range(1, steps + 1):
        monitor.record(step, float(step % 7))
    kept = monitor.scale_history
    assert len(kept) <= 64
    gaps = {b[0] - a[0] for a, b in zip(kept, kept[1:])}
    assert len(gaps) == 1 and gaps.pop() * 64 >= steps / 2, "one stride, covering the whole run"
    assert all(scale == float(step % 7) for step, scale in kept), "each point is the scale of its own step"
    assert monitor.history()[-1] == (steps, float(steps % 7))


def test_state_round_trip_continues_identically():
    a, b = LossScaleMonitor(max_points=16), LossScaleMonitor(max_points=16)
    for step in range(1, 101):
        a.record(step, float(step))
    b.load_state_dict(a.state_dict())
    for step in range(101, 301):
        a.record(step, float(step))
        b.record(step, float(step))
    assert a.history() == b.history()


@pytest.mark.parametrize("bad", [0, 1, 2.5, "64"])
def test_max_points_is_checked(bad):
    with pytest.raises(ValueError, match="max_points"):
        LossScaleMonitor(max_points=bad)

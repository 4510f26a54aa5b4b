"""The loss-scale history (the plugin's, shown by LossScaleMonitor) stays bounded on any run length, evenly spaced,
and ends at the latest step; the callbacks keep no checkpoint state of their own."""

import pytest

from lightning_mp import LossScaleMonitor, OverflowDiagnostics, PrecisionReport
from lightning_mp.reporting.history import ScaleHistory


def test_history_is_every_step_until_full():
    history = ScaleHistory(max_points=100)
    for step in range(1, 51):
        history.record(step, 2.0**step)
    assert history.points() == [(s, 2.0**s) for s in range(1, 51)]


def test_history_is_bounded_evenly_spaced_and_ends_with_the_latest_step():
    history = ScaleHistory(max_points=64)
    steps = 100_003
    for step in range(1, steps + 1):
        history.record(step, float(step % 7))
    kept = history.kept
    assert len(kept) <= 64
    gaps = {b[0] - a[0] for a, b in zip(kept, kept[1:])}
    assert len(gaps) == 1 and gaps.pop() * 64 >= steps / 2, "one stride, covering the whole run"
    assert all(scale == float(step % 7) for step, scale in kept), "each point is the scale of its own step"
    assert history.points()[-1] == (steps, float(steps % 7))


def test_a_smaller_bound_thins_what_is_kept_evenly():
    history = ScaleHistory(max_points=100)
    for step in range(1, 101):
        history.record(step, float(step))
    history.resize(16)
    assert len(history.kept) <= 16 and len({b[0] - a[0] for a, b in zip(history.kept, history.kept[1:])}) == 1


def test_state_round_trip_continues_identically():
    a, b = ScaleHistory(max_points=16), ScaleHistory(max_points=16)
    for step in range(1, 101):
        a.record(step, float(step))
    b.load_state_dict(a.state_dict())
    for step in range(101, 301):
        a.record(step, float(step))
        b.record(step, float(step))
    assert a.points() == b.points()


@pytest.mark.parametrize("bad", [0, 1, 2.5, "64"])
def test_max_points_is_checked(bad):
    with pytest.raises(ValueError, match="max_points"):
        LossScaleMonitor(max_points=bad)


def test_the_callbacks_keep_no_checkpoint_state():
    for callback in (LossScaleMonitor(), OverflowDiagnostics(), PrecisionReport()):
        assert callback.state_dict() == {}


def test_callbacks_leave_the_per_batch_hooks_they_do_not_use_to_lightning_to_skip():
    """Lightning calls every callback's empty per-batch hooks each step; ours shadow them so they are skipped,
    and a subclass that overrides one still gets it."""
    from lightning_mp._compat import BATCH_HOOKS

    for callback in (LossScaleMonitor(), OverflowDiagnostics(), PrecisionReport()):
        unused = [name for name in BATCH_HOOKS if getattr(callback, name) is None]
        assert "on_before_backward" in unused and "on_train_batch_start" in unused
    assert LossScaleMonitor().on_train_batch_end is not None and PrecisionReport().on_train_batch_end is None

    class Mine(LossScaleMonitor):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            pass

    assert callable(Mine().on_train_batch_start)

"""Fault-injection campaign (harness: benchmarks/faults.py): inf/NaN injected into inputs, module outputs, the
loss and gradients at random steps of a long run, under fp16, bf16 and fp32. The weights and optimizer state
must stay finite, every fault must be reported with the right phase and, for forward/backward faults (module
outputs, a module's own arithmetic, gradients), the right module, from the first one on, and memory must stay
flat over a long run of frequent faults."""

import gc
import weakref
from dataclasses import replace

import pytest

from benchmarks import faults
from lightning_mp import OverflowEvent, ScaleAction


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "steps"), [("16-mixed", 600), ("bf16-mixed", 600), ("32-true", 300)], ids=["fp16", "bf16", "fp32"]
)
def test_injected_faults_are_skipped_and_attributed(precision, steps):
    r = faults.campaign(precision, steps)
    plan, events, plugin = r["plan"], r["events"], r["plugin"]
    assert r["faults"] >= 100 and set(r["by_phase"]) == set(faults.PHASES)
    print(
        f"{precision}: {r['faults']} faults, phase right {r['right_phase']}, module {r['right_module']}/{r['located']}"
    )

    assert r["nonfinite_steps"] == 0, "a parameter or optimizer state went non-finite"
    assert sorted(events) == sorted(plan), "exactly the faulty steps are skipped and reported"
    assert plugin.skipped_steps == r["faults"]
    assert r["right_phase"] == r["faults"], "every fault, the first included"
    assert r["right_module"] == r["located"]
    replayed = [e for e in events.values() if e.phase != "input"]
    assert all(e.reproduced and e.op and e.source for e in replayed), "every non-input fault named to its line"
    if precision == "16-mixed":
        # No fault reaches the loss scale. Input, forward and loss faults are excused at once; a gradient fault
        # is re-run (a rescue) at a lower scale and then at the floor, stays non-finite there, and is excused too,
        # its back-off undone.
        excused = {step for step, event in events.items() if event.scaler_action is ScaleAction.EXCUSED}
        assert excused == set(plan)
        gradient_faults = sum(phase == "backward" for phase, _, _ in plan.values())
        assert gradient_faults > 0 and plugin.scaler.rescues >= 2 * gradient_faults


def test_campaign_score_counts_wrong_phases_wrong_modules_and_missing_events():
    """The harness's score must be able to fail."""
    plan = {
        2: ("backward", "net.2", "nan"),
        3: ("forward", "net.0", "inf"),
        5: ("input", None, "nan"),
        7: ("own", "net.4", "inf"),
    }
    right = {
        2: OverflowEvent(2, "backward", "net.2", "nan", "float32", None, "skipped"),
        3: OverflowEvent(3, "forward", "net.0", "inf", "bfloat16", None, "skipped"),
        5: OverflowEvent(5, "input", None, "nan", "float32", None, "skipped"),
        7: OverflowEvent(7, "forward", "net.4", "inf", "float16", None, "skipped"),
    }
    assert faults.score(plan, right) == (4, 3, 3)
    wrong_module = {**right, 2: replace(right[2], module="net.4")}
    assert faults.score(plan, wrong_module) == (4, 3, 2)
    wrong_phase = {**right, 5: replace(right[5], phase="loss")}
    assert faults.score(plan, wrong_phase) == (3, 3, 3)
    own_as_loss = {**right, 7: replace(right[7], phase="loss", module=None)}
    assert faults.score(plan, own_as_loss) == (3, 3, 2)
    assert faults.score(plan, {2: right[2]}) == (1, 3, 1)


def test_events_are_kept_in_a_bounded_buffer_with_running_counts():
    plan = faults.schedule(200, rate=0.5, seed=1)
    plugin = faults.make_plugin("bf16-mixed", max_events=20, watch_steps=10)
    faults.fit(plugin, plan, 200)
    assert len(plugin.overflow_events) == 20
    assert [e.step for e in plugin.overflow_events] == sorted(plan)[-20:], "the newest events are kept"
    assert sum(plugin.overflow_counts.values()) == len(plan) > 20, "the counts cover every event"
    assert len(plugin.state_dict()["events"]) == 20
    assert not plugin.core.tracker.hooked and not plugin.statistics.active, "no hooks left behind"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_memory_stays_flat_over_a_long_run_with_frequent_faults(precision):
    r = faults.long_run(precision, steps=4000, every=500)
    samples = r["samples"]
    assert r["nonfinite_steps"] == 0
    assert samples[-1]["events_seen"] == r["faults"] > 1000
    assert samples[-1]["events_kept"] == 100, "the event buffer is bounded"
    warm = samples[1:]  # after the first 500 steps: allocator and caches settled
    tensors = [s["tensors"] for s in warm]
    assert max(tensors) - min(tensors) <= 4, f"live tensors grow: {tensors}"
    growth = warm[-1]["rss_mb"] - warm[0]["rss_mb"]
    assert growth < 8, f"resident memory grew {growth:.1f} MB over {warm[-1]['step'] - warm[0]['step']} steps"


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_diagnostics_keep_no_batch_or_loss_alive(precision):
    refs = []

    class Recorded(faults.FaultyNet):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            refs.extend([weakref.ref(loss), weakref.ref(batch[0])])
            return loss

    plan = faults.schedule(40, rate=0.35)
    plugin = faults.make_plugin(precision)
    faults.fit(plugin, plan, 40, model=Recorded(plan))
    gc.collect()
    replays = sum(e.reproduced is not None for e in plugin.overflow_events)  # each ran training_step once more
    rescues = plugin.scaler.rescues if plugin.scaler is not None else 0  # and so did each rescue's re-run
    assert replays > 0 and len(refs) == 2 * (40 + replays + rescues)
    assert [i for i, ref in enumerate(refs) if ref() is not None] == [], "a batch or loss outlived its step"
    assert plugin.overflow_events, "faults were seen (the plugin is still alive and holds its events)"

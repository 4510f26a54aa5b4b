"""The predictive scaler against GradScaler on the synthetic fp16 gradient streams of
``benchmarks/scaler_streams.py``: the claims its table makes, at a shorter length."""

import pytest

from benchmarks.scaler_streams import fp16_stream, run_stream
from lightning_mp import AdaptiveLossScaler
from lightning_mp.options import GRADSCALER_RULE

GRADSCALER_SETTINGS = GRADSCALER_RULE  # the one declaration (lightning_mp.options)


def classic(**kwargs):
    """An AdaptiveLossScaler configured to be GradScaler (tests/unit/test_scaling.py checks that it is)."""
    return AdaptiveLossScaler("cpu", **GRADSCALER_SETTINGS, **kwargs)


@pytest.mark.parametrize("drift", [0.0, -3.0, 1.0], ids=["stationary", "drifting-down", "drifting-up"])
def test_predictive_skips_a_tenth_of_gradscalers_steps_at_similar_scale(drift):
    stream = fp16_stream(12_000, drift=drift)
    ref = classic(growth_interval=200)  # classic() is GradScaler's trajectory, checked above
    ours = AdaptiveLossScaler("cpu", growth_interval=200)
    ref_scales = run_stream(ref, stream).scales
    our_result = run_stream(ours, stream)
    our_scales = our_result.scales
    assert our_result.skipped == ours.skipped_steps, "the scaler counts exactly the steps that overflowed"
    assert ref.skipped_steps >= 45
    assert ours.skipped_steps * 10 <= ref.skipped_steps, (ours.skipped_steps, ref.skipped_steps)
    # No extra underflow: after warm-up our scale stays within one power of two of GradScaler's (median).
    ratios = sorted(r / o for r, o in zip(ref_scales[2000:], our_scales[2000:]))
    assert ratios[len(ratios) // 2] <= 2.0


def test_spikes_are_skipped_but_do_not_halve_the_scale():
    stream = fp16_stream(12_000, spike_every=997)
    ref = classic(growth_interval=100)
    ours = AdaptiveLossScaler("cpu", growth_interval=100)
    run_stream(ref, stream)
    run_stream(ours, stream)
    spikes = 12_000 // 997  # a 40x spike overflows at any useful scale: both must skip it
    assert ours.policy.overflows >= spikes
    avoidable_ours = ours.skipped_steps - spikes
    avoidable_ref = ref.skipped_steps - spikes
    assert avoidable_ours * 10 <= avoidable_ref, (ours.skipped_steps, ref.skipped_steps)
    assert ours.policy.backoffs < spikes, "hysteresis must absorb isolated spikes"

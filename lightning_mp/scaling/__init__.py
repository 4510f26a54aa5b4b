"""Adaptive loss scaling for fp16 mixed precision.

Why scale at all
----------------
fp16 has 5 exponent bits: its largest finite value is 65504 and anything smaller than about 6e-8 rounds to
zero. Gradients of activations are usually tiny, so in an fp16 backward pass many of them underflow and are
lost. Loss scaling (Micikevicius et al., 2018) multiplies the loss by a scale ``S`` before ``backward``;
every gradient in the backward graph is then ``S`` times larger and clears the underflow line. Before the
optimizer sees them, the fp32 parameter gradients are divided by ``S`` again ("unscaled"). The price: with
``S`` too large, some intermediate gradient exceeds 65504, becomes ``inf``, the step has to be skipped and
``S`` lowered.

What ``torch.amp.GradScaler`` does (``policy="dynamic"`` here)
-------------------------------------------------------------
Halve ``S`` on every step with an inf/NaN gradient (skipping that step) and double it after
``growth_interval`` clean steps in a row. At equilibrium it therefore re-tries a scale it already knows to
be too large once every ``growth_interval`` steps and pays a skipped step each time; a single spiky batch
halves the scale; nothing stops the scale from decaying to zero. ``policy="dynamic"`` keeps that rule and
adds three guards: ``hysteresis`` (tolerate isolated overflows), ``min_scale`` / ``max_scale`` and a
defined action at the floor. With ``hysteresis=1, min_scale=None, max_scale=None`` it reproduces
GradScaler's scale trajectory exactly (same float32 rounding, same growth tracker).

What ``policy="predictive"`` adds
---------------------------------
In the same pass that checks the gradients for inf/NaN we also take their largest magnitude (``amax``), and
read it on the one host synchronisation that ``GradScaler.step`` already does. With it the policy keeps:

* a short history of the *unscaled* gradient amax ``a`` of recent clean steps;
* the *overflow product* ``P``: the smallest value of ``S * a`` known to overflow. It starts at the format's
  largest value (a clean fp16 step can not hold a scaled gradient above 65504) and is lowered to
  ``S * max(history)`` whenever an overflow is confirmed. ``P`` captures what we can not see directly, the
  ratio between the largest *activation* gradient inside the backward pass and the largest parameter
  gradient.

Growth then asks "would ``S * g * a`` stay at least ``headroom_bits`` below ``P``?" instead of doubling
blindly, and jumps by as many factors of ``g`` as that headroom allows (faster recovery, less underflow).
A scale that is refused growth stays put, so the periodic failed probe of GradScaler disappears; after
``probe_after`` refused growth checks ``P`` is relaxed by one factor so a stale ``P`` can not pin the scale
low forever (one probe every ``probe_after + 1`` growth intervals instead of every interval). When the
recent amax rises so that ``S * a`` comes within ``shrink_headroom_bits`` of ``P``, the scale is lowered
*before* the overflow happens. While ``P`` is still the format's limit (a loose guess) each growth covers
half the remaining distance to it; once an overflow has measured ``P`` growth goes straight to the
largest scale it allows. A growth that overflows while still on probation (fewer than ``amax_history``
clean steps at the new scale) is reverted to the scale that worked, in one step, instead of being halved
one skipped step at a time.

Hysteresis counting rule
------------------------
An overflow is *tolerated* (the step is skipped, the scale kept) unless it is the ``hysteresis``-th overflow
within the last ``hysteresis_window`` optimizer steps, or the current scale has not proven itself yet (one
clean step; for a predictive growth, its probation). We count within a window rather than consecutively
because a scale that is slightly too large overflows on *some* batches, e.g. every other step: a consecutive
counter is reset by each clean step in between and would never back off, skipping half the steps forever.
The "not proven" exception keeps the start-up descent (and a failed growth probe) as fast as GradScaler's.

The floor
---------
The scale never goes below ``min_scale`` (or, with ``min_scale=None``, below the smallest normal float32),
so it never becomes zero, subnormal or non-finite. Overflows that keep coming at the floor mean the
gradients are non-finite at any scale, which is not a scaling problem. After ``floor_patience`` confirmed
overflows at the floor without a clean step in between the scaler calls ``on_floor(scaler)`` if one was
given (the :class:`~lightning_mp.AdaptiveMP` plugin uses this hook to escalate), otherwise it raises
:class:`LossScaleFloorError` with advice.
"""

from lightning_mp.scaling.policy import FP16_MAX, LossScaleFloorError, ScaleAction, ScalePolicy, ScalerConfig
from lightning_mp.scaling.scaler import AdaptiveLossScaler

__all__ = ["FP16_MAX", "AdaptiveLossScaler", "LossScaleFloorError", "ScaleAction", "ScalePolicy", "ScalerConfig"]

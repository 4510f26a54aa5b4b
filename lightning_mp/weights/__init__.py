"""Low-precision weights (``"bf16-true"``, ``"16-true"``) and the optimizer's side of precision: how much of each
update rounding takes away (``lost``), the remedies (``remedies``: fp32 masters, Kahan summation, stochastic
rounding), settings that break with low-precision state (``care``), what the training state weighs (``memory``),
and one run's use of all of it (``run``)."""

from lightning_mp.weights.care import care_messages, half_ulp_share
from lightning_mp.weights.lost import LOST_LIMIT, PATIENCE, LostUpdates, UpdateSample, shadow_step
from lightning_mp.weights.memory import training_state_bytes
from lightning_mp.weights.remedies import MASTER_WEIGHTS, MasterCopies, replacement, resolve_remedy
from lightning_mp.weights.run import RunWeights

__all__ = [
    "LOST_LIMIT",
    "MASTER_WEIGHTS",
    "PATIENCE",
    "LostUpdates",
    "MasterCopies",
    "RunWeights",
    "UpdateSample",
    "care_messages",
    "half_ulp_share",
    "replacement",
    "resolve_remedy",
    "shadow_step",
    "training_state_bytes",
]

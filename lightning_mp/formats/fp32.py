"""fp32: no autocast, no scaling; the non-finite guard still skips a step with inf/NaN gradients."""

from lightning_mp.formats.base import Format

__all__ = ["FP32"]

# A sample only watches for values running away in fp32's range: every 100th step (and the first).
FP32 = Format(name="32-true", short="fp32", autocast_dtype=None, scaled=False, fp32_defaults=(), stats_every=100)

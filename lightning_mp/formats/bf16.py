"""bf16 mixed precision: autocast to bfloat16, no loss scaling (bf16 has fp32's exponent range)."""

import torch

from lightning_mp.formats.base import Format

__all__ = ["BF16"]

# fp32's range: nothing forced into fp32, and the statistics only watch for values running away (every 100th
# step, and the first: a quarter of the cost of fp16's cadence on small, fast steps).
BF16 = Format(
    name="bf16-mixed", short="bf16", autocast_dtype=torch.bfloat16, scaled=False, fp32_defaults=(), stats_every=100
)

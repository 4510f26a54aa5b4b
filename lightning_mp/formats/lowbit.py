"""fp8 and int8 matrix multiplies: bf16 autocast everywhere, eligible ``Linear`` layers through torchao.

The format only names what the step needs (bf16 autocast, no loss scale: bf16 has fp32's range, and the low-bit
GEMMs scale their own operands dynamically); which layers are converted, how they are watched and when one moves
back to bf16 live in ``lightning_mp.lowbit``.

Statistics, and the low-bit layers' watch with them, are sampled every 50th optimizer step (and the first): half
bf16's interval, because a layer the format hurts is only moved back after two bad samples in a row.
"""

import dataclasses

import torch

from lightning_mp.formats.base import Format

__all__ = ["FP8", "INT8"]

FP8 = Format(
    name="fp8-mixed",
    short="fp8",
    autocast_dtype=torch.bfloat16,
    scaled=False,
    fp32_defaults=(),
    stats_every=50,
    low_bit="fp8",
)
INT8 = dataclasses.replace(FP8, name="int8-mixed", short="int8", low_bit="int8")  # the same step, int8 layers

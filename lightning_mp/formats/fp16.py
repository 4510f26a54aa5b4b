"""fp16 mixed precision: autocast to float16, the loss scaled by ``AdaptiveLossScaler``.

What runs in fp32 by default, and the measured reason (``python -m benchmarks.fp16_norms``). A norm's variance
does not overflow fp16: the CPU and CUDA kernels take statistics in fp32 (Welford), and every norm stayed finite
forward and backward up to |x| = 6e4. What goes wrong is two CPU fp16 kernels that keep a running sum in fp16:
LayerNorm's backward accumulates dgamma/dbeta in an fp16 buffer (0.6-0.8% off at any scale, inf once a
loss-scaled partial sum passes 65504), and LogSoftmax keeps each row's sum of exponentials in fp16 (every
log-probability -inf once ~65504 near-equal logits share a row: a 128k-token head at initialization; 5e-3 to
1e-2 nats off otherwise). GroupNorm, InstanceNorm, BatchNorm, RMSNorm and Softmax accumulate in fp32 on CPU and
match fp32 up to the rounding of their fp16 output: not forced. CUDA autocast already runs layer_norm and
log_softmax in fp32 (there the islands change nothing). Each island costs two casts and fp32 math for that
module only; models without these modules are untouched (bitwise equal to Lightning's ``MixedPrecision``).
"""

import torch
from torch import nn

from lightning_mp.formats.base import Format

__all__ = ["FP16"]

# The predictive scaler reads every sample (range is what fp16 runs out of): every 25th step.
FP16 = Format(
    name="16-mixed",
    short="fp16",
    autocast_dtype=torch.float16,
    scaled=True,
    fp32_defaults=(nn.LayerNorm, nn.LogSoftmax),
    stats_every=25,
)

"""Low-precision weights, as Lightning's ``"bf16-true"`` and ``"16-true"``: the model's weights, its inputs and
every operation in bf16 / fp16, no autocast. Half the bytes of fp32 for weights, gradients and (with a remedy
that keeps it low) optimizer state; the cost is updates rounded away when they are smaller than half a unit in
the last place of a weight, which ``lightning_mp.weights`` measures per module and remedies (``master_weights``).

``"16-true"`` scales the loss, ``"bf16-true"`` does not, for the reason autocast's fp16 does: fp16's smallest
normal value is 6.1e-5 and its smallest subnormal 6e-8, so gradients computed and stored in fp16 flush to zero
where a bf16 gradient (fp32's exponent range) keeps them. The scaler's guard and its rescue then work as in
``"16-mixed"``; the unscaled gradients stay in fp16 unless ``master_weights="fp32"`` moves them into fp32 first.

What runs in fp32 by default is each dtype's own list: nothing in bf16 (fp32's range), fp16's list in fp16
(``formats/fp16.py``: the CPU LayerNorm and LogSoftmax kernels keep running sums in fp16). Those modules keep fp32
weights, like every module promoted to fp32 in these formats.
"""

import dataclasses

import torch

from lightning_mp.formats.bf16 import BF16
from lightning_mp.formats.fp16 import FP16

__all__ = ["BF16_TRUE", "FP16_TRUE"]

BF16_TRUE = dataclasses.replace(
    BF16, name="bf16-true", short="bf16-true", autocast_dtype=None, weights_dtype=torch.bfloat16
)
FP16_TRUE = dataclasses.replace(
    FP16, name="16-true", short="fp16-true", autocast_dtype=None, weights_dtype=torch.float16
)

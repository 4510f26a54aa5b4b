"""fp8 and int8 matrix multiplies with the same safety as fp16: which ``Linear`` layers are converted (with
torchao), how each is watched on sampled steps, and when one moves back to bf16 while the run goes on.

``convert.py`` chooses and converts layers (and moves one back); ``watch.py`` measures each layer's range,
underflow, saturation and GEMM error; ``layers.py`` holds one run's layers and the rule that moves them.
"""

from lightning_mp.lowbit.convert import FP8_RECIPES, default_selection, ineligible, require_torchao
from lightning_mp.lowbit.layers import PATIENCE, SATURATION_LIMIT, SNR_FLOOR_DB, UNDERFLOW_LIMIT, LowBitLayers, judge
from lightning_mp.lowbit.watch import FORMAT_RANGE, LayerSample, gemm_snr_db

__all__ = [
    "FORMAT_RANGE",
    "FP8_RECIPES",
    "PATIENCE",
    "SATURATION_LIMIT",
    "SNR_FLOOR_DB",
    "UNDERFLOW_LIMIT",
    "LayerSample",
    "LowBitLayers",
    "default_selection",
    "gemm_snr_db",
    "ineligible",
    "judge",
    "require_torchao",
]

"""Speech recipe: log-mel features computed in the model with torch.stft, feeding a small CNN.

Its names are imported on first use (PEP 562): ``knobs`` (what the recipe's config accepts) is read by the command
line's checks without importing torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "KeywordCNN": "model",
    "LogMel": "model",
    "SpeechData": "data",
    "load_wav_folder": "data",
    "synthesize_keywords": "data",
}
__all__ = ["KeywordCNN", "LogMel", "SpeechData", "load_wav_folder", "synthesize_keywords"]  # == sorted(_EXPORTS)

if TYPE_CHECKING:
    from lightning_mp.recipes.speech.data import SpeechData, load_wav_folder, synthesize_keywords
    from lightning_mp.recipes.speech.model import KeywordCNN, LogMel


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

"""NLP recipe: a small Transformer encoder classifier on generated sentences or an AG News style CSV.

Its names are imported on first use (PEP 562): ``knobs`` (what the recipe's config accepts) is read by the command
line's checks without importing torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TextData": "data",
    "TransformerClassifier": "model",
    "generate_sentences": "data",
    "read_text_csv": "data",
}
__all__ = ["TextData", "TransformerClassifier", "generate_sentences", "read_text_csv"]  # == sorted(_EXPORTS)

if TYPE_CHECKING:
    from lightning_mp.recipes.nlp.data import TextData, generate_sentences, read_text_csv
    from lightning_mp.recipes.nlp.model import TransformerClassifier


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

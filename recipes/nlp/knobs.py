"""The NLP recipe's knobs: what ``data.*`` (``TextData``) and ``model.net.*`` (``TransformerClassifier``) accept.

See ``lightning_mp.recipes.knobs`` for how a declaration is read; no torch or Lightning import here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_mp.errors import invalid
from lightning_mp.recipes.knobs import Folder, Integer, Knobs

DATA = Knobs(
    "data",
    {
        "root": Folder(),
        "num_classes": Integer(minimum=2),
        "vocab_size": Integer(minimum=1),
        "max_length": Integer(minimum=1),
        "batch_size": Integer(minimum=1),
        "train_size": Integer(minimum=1),
        "val_size": Integer(minimum=1),
        "seed": Integer(),
    },
)


def _heads_divide_dim(values: Mapping[str, Any], where: str) -> None:
    """Attention splits ``dim`` features evenly over the heads (torch asserts it, with a traceback)."""
    dim, heads = values.get("dim"), values.get("heads")
    if isinstance(dim, int) and isinstance(heads, int) and dim % heads:
        raise invalid(f"{where}.dim", dim, f"must be a multiple of {where}.heads={heads} (each head gets dim / heads)")


NET = Knobs(
    "model.net",
    {
        "vocab_size": Integer(minimum=1),
        "num_classes": Integer(minimum=2),
        "dim": Integer(minimum=1),
        "heads": Integer(minimum=1),
        "layers": Integer(minimum=1),
        "max_length": Integer(minimum=1),
    },
    checks=(_heads_divide_dim,),
)

KNOBS = {"TextData": DATA, "TransformerClassifier": NET}

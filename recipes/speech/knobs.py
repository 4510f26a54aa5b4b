"""The speech recipe's knobs: what ``data.*`` (``SpeechData``) and ``model.net.*`` (``KeywordCNN``) accept.

See ``lightning_mp.recipes.knobs`` for how a declaration is read; no torch or Lightning import here.
"""

from __future__ import annotations

from lightning_mp.recipes.knobs import Folder, Integer, Knobs

DATA = Knobs(
    "data",
    {
        "root": Folder(),
        "num_classes": Integer(minimum=2),
        "sample_rate": Integer(minimum=1),
        "batch_size": Integer(minimum=1),
        "train_size": Integer(minimum=1),
        "val_size": Integer(minimum=1),
        "seed": Integer(),
    },
)

NET = Knobs(
    "model.net",
    {
        "num_classes": Integer(minimum=2),
        "sample_rate": Integer(minimum=1),
        "n_mels": Integer(minimum=1),
        "width": Integer(minimum=1),
    },
)

KNOBS = {"SpeechData": DATA, "KeywordCNN": NET}

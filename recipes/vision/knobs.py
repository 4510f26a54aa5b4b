"""The vision recipe's knobs: what ``data.*`` (``VisionData``) and ``model.net.*`` (``SmallResNet``) accept.

See ``lightning_mp.recipes.knobs`` for how a declaration is read; no torch or Lightning import here.
"""

from __future__ import annotations

from lightning_mp.recipes.knobs import Folder, Integer, Knobs

DATA = Knobs(
    "data",
    {
        "root": Folder(),
        "num_classes": Integer(minimum=2),
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
        "width": Integer(minimum=1),
        "in_channels": Integer(minimum=1),
    },
)

KNOBS = {"VisionData": DATA, "SmallResNet": NET}

"""``python -m lightning_mp.cli ...``: the ``lightning-mp`` command (``compare`` runs each precision this way)."""

import sys

from lightning_mp.cli import main

sys.exit(main())

"""``ConfigError``: what the user wrote (a knob, a pattern) or what the user's files contain is invalid.

A ``ValueError``, so code that catches those keeps working. The command line prints it as one line and exits
with status 2 wherever it is raised, inside ``trainer.fit`` too (data are loaded and ``fp32_modules`` patterns
are matched there); any other exception inside training is a failure, printed with its traceback (status 1).
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Invalid input: the message names the field or the file, the value, and what is allowed."""

"""``ConfigError``, the one error type for the user's mistakes, and ``invalid``, the one shape of its message.

A mistake is something the user wrote (a knob, a pattern, a command line) or what the user's files contain.
Every such error names the field, the value and what is allowed, in one line::

    data.batch_size=0 is invalid: must be an integer >= 1.
    AdaptiveMP(stats='most') is invalid: must be one of ('off', 'cheap', 'full').

The ``lightning-mp`` command prints a ``ConfigError`` as that line and exits with status 2, wherever it is
raised (inside ``trainer.fit`` too: data are loaded and ``fp32_modules`` patterns are matched there). Any
other exception is a failure, not a mistake, and keeps its traceback (status 1). ``ConfigError`` is a
``ValueError``, so code that catches those keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "invalid"]


class ConfigError(ValueError):
    """Invalid input: the message names the field or the file, the value, and what is allowed."""


def invalid(
    field: str, value: Any, allowed: str, *, problem: str = "is invalid", owner: str | None = None, quote: bool = True
) -> ConfigError:
    """The error for ``field=value``: ``field=value <problem>: <allowed>.``

    Args:
        field: the name as the user wrote it: a config key (``data.batch_size``) or an argument.
        value: what the user gave; shown as Python writes it, so ``'3'`` (a string) differs from ``3``.
        allowed: what is accepted, or what to do instead (``must be an integer >= 1``).
        problem: what is wrong with the value, when "is invalid" says less (``does not exist``).
        owner: the class whose argument ``field`` is: ``AdaptiveMP(stats='most') is invalid: ...``.
        quote: ``False`` for a name picked from a list (``recipe=visoin``), shown as typed.

    Returns:
        The error, to ``raise``.
    """
    shown = f"{field}={value!r}" if quote else f"{field}={value}"
    if owner is not None:
        shown = f"{owner}({shown})"
    end = "" if allowed.endswith((".", "?", "!")) else "."
    return ConfigError(f"{shown} {problem}: {allowed}{end}")

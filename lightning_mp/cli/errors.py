"""How the command reports an exception: the user's mistake as one line (status 2), anything else with its
traceback (status 1).

A mistake is a ``ConfigError`` (``lightning_mp.errors``: raised by the command's checks, the recipes and the
plugin), an error of Hydra or OmegaConf (they read the command line and the configs), or Lightning's
``MisconfigurationException`` (its word for a setting it refuses). Nothing else is: a ``ValueError`` or a
``TypeError`` raised while training is a failure to see whole, not a line to read. Hydra wraps whatever an
object's constructor raises in an ``InstantiationException``; what was wrapped decides.
"""

from __future__ import annotations

import sys

from lightning_mp.errors import ConfigError

__all__ = ["TrainingFailed", "is_user_error", "one_line"]


class TrainingFailed(RuntimeError):
    """An exception inside ``trainer.fit`` that is not about the user's input: printed with its traceback."""


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's mistake (see the module docstring), to print as one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if _raised_by_a_target(error):
        return is_user_error(error.__cause__)
    known: tuple[type[BaseException], ...] = (ConfigError, HydraException, OmegaConfBaseException)
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")  # only if Lightning was imported
    if exceptions is not None:
        known = (*known, exceptions.MisconfigurationException)
    return isinstance(error, known)


def _raised_by_a_target(error: BaseException) -> bool:
    """Hydra's ``InstantiationException`` around what the object's own code raised ("Error in call to target"),
    as opposed to one about the config itself (a ``_target_`` that does not import)."""
    from hydra.errors import InstantiationException

    return (
        isinstance(error, InstantiationException)
        and error.__cause__ is not None
        and str(error).startswith("Error in call to target")
    )


def one_line(error: BaseException) -> str:
    """The line that matters of a user's mistake: Hydra's and OmegaConf's messages are often several lines,
    wrapped, and end with a config search path; an object's error is prefixed with the config key that built it
    (``trainer: ...``), unless it is a ``ConfigError``, which names its field already."""
    from hydra.errors import InstantiationException

    key = ""
    if isinstance(error, InstantiationException):
        for line in str(error).splitlines():
            if line.startswith("full_key:"):
                key = line.split(":", 1)[1].strip() + ": "
        cause = error.__cause__ or error.__context__
        if cause is not None:
            return ("" if isinstance(cause, ConfigError) else key) + one_line(cause)
    lines: list[str] = []
    for raw in str(error).splitlines():
        if raw.strip() == "Config search path:":
            break
        if raw.startswith("\t") and lines:  # an item of the list the line above opens ("Available options:")
            lines[-1] += (" " if lines[-1].endswith(":") else ", ") + raw.strip()
        elif raw.strip():
            lines.append(raw.strip())
    # Sentences run on ("Could not override 'x'. To append ..."); other lines are separated by semicolons.
    text = "".join(line + (" " if line.endswith(".") else "; ") for line in lines[:-1]) + "".join(lines[-1:])
    text = text or type(error).__name__
    return key + text.replace("\t", "")

"""The ``lightning-mp`` command: ``train``, ``compare`` and ``ls`` over the Hydra configs in ``conf/``.

    lightning-mp train recipe=speech precision=fp16 precision.scaler.growth_interval=500
    lightning-mp compare recipe=vision precisions=fp32,bf16,fp16 trainer.max_epochs=3
    lightning-mp ls

Configs are composed with Hydra's compose API from ``pkg://lightning_mp.conf`` (shipped inside the package),
so the command works from any directory after a plain ``pip install``. One module per job:

    compose.py   a command line -> the checked config (Hydra's form, group options, values)
    keys.py      every key typed must exist: the nearest real key otherwise
    run.py       one training run: its directory, the objects, ``fit``, ``result.json``
    sweep.py     ``train --multirun``: Hydra sweeps and launchers, every job checked first
    compare.py   several precisions and seeds, the table and the verdict
    help.py      the usage, ``--help`` and ``ls``
    errors.py    the user's mistake as one line (status 2), anything else with its traceback (status 1)

Checking a command line and ``--help`` never import Lightning (about 5 s on a small CPU): every module here
imports it inside the function that trains. ``LIGHTNING_MP_DEBUG=1`` shows the traceback of a mistake too.
"""

from __future__ import annotations

import os
import sys

from lightning_mp.cli.compare import compare, comparison_markdown, comparison_table, verdict
from lightning_mp.cli.compose import PRECISIONS, check, compose, normalize_overrides
from lightning_mp.cli.errors import TrainingFailed, is_user_error, one_line
from lightning_mp.cli.help import USAGE, command_help, list_configs, print_configs
from lightning_mp.cli.keys import plugin_knob_overrides
from lightning_mp.cli.run import prepare_output_dir, quiet_known_noise, train
from lightning_mp.cli.sweep import multirun, sweep_jobs, swept_keys
from lightning_mp.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "USAGE",
    "ConfigError",
    "TrainingFailed",
    "check",
    "command_help",
    "compare",
    "comparison_markdown",
    "comparison_table",
    "compose",
    "list_configs",
    "main",
    "multirun",
    "normalize_overrides",
    "plugin_knob_overrides",
    "prepare_output_dir",
    "sweep_jobs",
    "swept_keys",
    "train",
    "verdict",
]


def main(argv: list[str] | None = None) -> int:
    """The command: ``main(["train", "recipe=nlp"])``. Returns the exit status: 0, 2 for the user's mistake
    (one line on stderr), 130 when interrupted; any other exception propagates with its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, overrides = argv[0], argv[1:]
    if command == "help" or (command in ("train", "compare") and ({"-h", "--help", "help"} & set(overrides))):
        topic = overrides[0] if command == "help" and overrides else command
        try:
            print(command_help(topic) if topic in ("train", "compare") else USAGE)
        except BrokenPipeError:
            _reader_left()
        return 0
    quiet_known_noise()
    try:
        if command == "train" and ("--multirun" in overrides or "-m" in overrides):
            multirun(overrides)
        elif command == "train":
            train(compose(overrides))
        elif command == "compare":
            compare(overrides)
        elif command == "ls":
            print_configs()
        else:
            raise ConfigError(f"unknown command {command!r}: expected train, compare or ls.")
    except KeyboardInterrupt:
        print("lightning-mp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _reader_left()
        return 0
    except Exception as error:  # noqa: BLE001 - the user's mistakes become one line; others keep their trace
        if not is_user_error(error) or os.environ.get("LIGHTNING_MP_DEBUG"):
            raise
        print(f"lightning-mp: error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


def _reader_left() -> None:
    """``lightning-mp ls | head``: the reader closed the pipe. Not an error; send what is left of the output
    (and Python's flush at exit) to /dev/null instead of a BrokenPipe traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

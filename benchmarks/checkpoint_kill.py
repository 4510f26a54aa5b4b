"""Kill a process while it writes ``last.ckpt`` over and over, then try to load what it left behind.

A child process saves a checkpoint of ``--megabytes`` MB (every value equal to the save's version number)
to the same ``last.ckpt`` in a loop, through one CheckpointIO; the parent SIGKILLs it at a random moment
and loads the file. A load that fails or gives a mix of versions is a corrupt checkpoint. ``$TMPDIR`` for
the child is put on a different file system than the checkpoint (``/dev/shm`` by default), the usual
layout on clusters (local scratch, shared checkpoints), where Lightning's own transaction degrades to a
copy into the truncated target.

    python -m benchmarks.checkpoint_kill                 # 40 kills each for Lightning's and our CheckpointIO
    python -m benchmarks.checkpoint_kill --quick         # CI-sized
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

IOS = {
    "lightning TorchCheckpointIO": "lightning.pytorch.plugins.io:TorchCheckpointIO",
    "lightning_mp AtomicCheckpointIO": "lightning_mp.checkpoint:AtomicCheckpointIO",
}

_WRITER = """
import importlib, sys, torch
module, name = sys.argv[1].split(":")
io = getattr(importlib.import_module(module), name)()
numel = int(sys.argv[3]) * 2**20 // 4
version = 0
while True:
    version += 1
    io.save_checkpoint({"version": version, "weights": torch.full((numel,), float(version))}, sys.argv[2])
"""


def check(path: Path) -> str:
    """ "ok", "missing" or "corrupt" for the checkpoint a killed writer left."""
    if not path.exists():
        return "missing"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights = state["weights"]
        return "ok" if bool((weights == float(state["version"])).all()) else "corrupt"
    except Exception:  # noqa: BLE001 - any failure to load is what we count
        return "corrupt"


def kill_campaign(io: str, kills: int, directory: Path, megabytes: int = 32, tmpdir: str | None = None) -> dict:
    """SIGKILL ``kills`` writer processes at random moments; count what loads."""
    counts = {"ok": 0, "corrupt": 0, "missing": 0}
    rng = random.Random(0)
    env = {**os.environ, "TMPDIR": tmpdir} if tmpdir else dict(os.environ)
    for kill in range(kills):
        path = directory / f"kill{kill}" / "last.ckpt"
        path.parent.mkdir(parents=True)
        child = subprocess.Popen(
            [sys.executable, "-c", _WRITER, IOS[io], str(path), str(megabytes)], env=env, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 120
            while not path.exists():  # the first save is done: from here on every save replaces a good file
                if child.poll() is not None:
                    raise RuntimeError(f"the writer died: {child.stderr.read().decode()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError("the writer produced no checkpoint in 120 s")
                time.sleep(0.001)
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=30)
            child.stderr.close()
        counts[check(path)] += 1
        for leftover in path.parent.iterdir():
            leftover.unlink()
    return counts


@contextlib.contextmanager
def other_file_system_tmpdir(directory: Path) -> Iterator[str | None]:
    """A fresh folder in /dev/shm when that is a different file system from ``directory`` (so TMPDIR is
    cross-device), removed afterwards with whatever temporary files killed writers left in it."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != directory.stat().st_dev):
        yield None
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="checkpoint_kill_") as tmpdir:
        yield tmpdir


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--megabytes", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    kills = 4 if args.quick else args.kills
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as work, other_file_system_tmpdir(Path(work)) as tmpdir:
        print(f"TMPDIR for the writer: {tmpdir or '(same file system)'}; {args.megabytes} MB checkpoints")
        for io in IOS:
            counts = kill_campaign(io, kills, Path(work) / io.split()[1], args.megabytes, tmpdir)
            rows.append({"io": io, "kills": kills, **counts})
            print(f"{io:34} kills {kills:3}  loadable {counts['ok']:3}  corrupt {counts['corrupt']:3}", flush=True)
    return rows


if __name__ == "__main__":
    main()

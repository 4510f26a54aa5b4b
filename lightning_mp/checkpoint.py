"""Checkpoint files that are either the old one or the new one, never half of each.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction: the bytes go to a temporary file in
``$TMPDIR`` and are then moved over the target. When ``$TMPDIR`` is on another file system than the
checkpoints (local scratch vs. a shared file system, the usual layout on clusters), that move is a copy into
the already-truncated target, and a job killed during it leaves a corrupt ``last.ckpt``. ``AtomicCheckpointIO``
writes the temporary file beside the target, flushes it to disk and renames it over the target, which POSIX
guarantees to be atomic within one directory.

    Trainer(plugins=[AdaptiveMP(), AtomicCheckpointIO()])
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

__all__ = ["AtomicCheckpointIO"]

_PARTIAL = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic renames; remote paths go through Lightning as before."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"storage_options={storage_options!r} is not supported by {type(self).__name__}: it takes none."
            )
        if "file" not in get_filesystem(path).protocol:
            return super().save_checkpoint(checkpoint, path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*{_PARTIAL}"):  # left by a writer killed mid-save
            stale.unlink(missing_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(partial, 0o666 & ~_umask())  # mkstemp makes 0600; keep the permissions open() would give
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)  # make the rename itself survive a power loss


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""AtomicCheckpointIO: a checkpoint file is the old one or the new one, never a torn mix."""

import os
import stat

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_mp import AtomicCheckpointIO


def test_round_trip_with_ordinary_permissions_and_no_leftovers(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"  # the folder does not exist yet
    state = {"step": 3, "weights": torch.arange(6.0)}
    AtomicCheckpointIO().save_checkpoint(state, path)
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["step"] == 3 and torch.equal(loaded["weights"], state["weights"])
    assert os.listdir(path.parent) == ["last.ckpt"]
    reference = tmp_path / "reference.ckpt"
    TorchCheckpointIO().save_checkpoint(state, reference)  # Lightning's file mode is the one to match
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def torn_save(obj, f):
        f.write(b"\x80\x02half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"], "the partial file must be removed"


def test_stale_partial_files_of_a_killed_writer_are_cleaned_up(tmp_path):
    stale = tmp_path / ".last.ckpt.abc123.partial"
    stale.write_bytes(b"torn")
    AtomicCheckpointIO().save_checkpoint({"step": 5}, tmp_path / "last.ckpt")
    assert not stale.exists()


def test_storage_options_are_refused_naming_the_argument(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"compress": True})

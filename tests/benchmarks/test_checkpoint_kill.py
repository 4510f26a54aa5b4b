"""The kill harness of ``benchmarks/checkpoint_kill.py``: it can fail, and AtomicCheckpointIO passes it."""

from pathlib import Path

import pytest
import torch

from benchmarks import checkpoint_kill


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_corrupt_last_checkpoint(tmp_path):
    """Real SIGKILLs at random moments of a loop of 32 MB saves, with TMPDIR on another file system where
    this machine has one (where Lightning's own TorchCheckpointIO can be caught mid-copy; see
    ``python -m benchmarks.checkpoint_kill`` for the side-by-side count)."""
    with checkpoint_kill.other_file_system_tmpdir(tmp_path) as tmpdir:
        counts = checkpoint_kill.kill_campaign("lightning_mp AtomicCheckpointIO", 5, tmp_path, 32, tmpdir)
    assert counts == {"ok": 5, "corrupt": 0, "missing": 0}


def test_kill_harness_detects_a_torn_checkpoint(tmp_path):
    """The campaign's check must be able to fail: a truncated file and a mix of versions count as corrupt."""
    good = tmp_path / "good.ckpt"
    torch.save({"version": 2, "weights": torch.full((1000,), 2.0)}, good)
    assert checkpoint_kill.check(good) == "ok"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert checkpoint_kill.check(truncated) == "corrupt"
    mixed = tmp_path / "mixed.ckpt"
    torch.save({"version": 3, "weights": torch.full((1000,), 2.0)}, mixed)
    assert checkpoint_kill.check(mixed) == "corrupt"
    assert checkpoint_kill.check(Path(tmp_path / "absent.ckpt")) == "missing"

"""Kill a ``lightning-mp train`` run with SIGKILL mid-epoch, resume it with the documented command, and check
that it ends exactly where an uninterrupted run ends: weights, optimizer state, loss-scale history, skipped
steps and fp32 modules, bitwise.

fp16 with a deliberately high initial scale, so the loss-scale history has back-offs and skipped steps to
replay; deterministic CPU kernels; a stateful train loader (so the resumed epoch continues on the next batch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

STEPS_PER_EPOCH = 10
EPOCHS = 3
RUN = [
    "recipe=vision",
    "precision=fp16",
    "data.train_size=320",
    "data.val_size=64",
    "data.batch_size=32",
    "model.net.width=8",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.deterministic=true",
    "trainer.num_sanity_val_steps=0",
    "precision.scaler.init_scale=16777216",  # starts too high: back-offs and skips early in the run
    "precision.rescue=false",  # (skipped, not rescued: the skips are part of the state a resume must keep)
    "callbacks.last_checkpoint.every_n_train_steps=2",
    "callbacks.early_stopping=null",
    "callbacks.progress_bar=null",
    "logger=csv",
    "model.warmup_steps=5",  # the cosine decay runs (and is resumed) inside the 30 steps
]
TIMEOUT = 240


def _command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "lightning_mp.cli", "train", *RUN, *overrides]


def _train(tmp_path: Path, *overrides: str) -> None:
    proc = subprocess.run(_command(*overrides), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_after_first_checkpoint(tmp_path: Path, output_dir: str) -> None:
    """Start a run and SIGKILL it as soon as its first mid-epoch last.ckpt is on disk (no clean shutdown)."""
    last = tmp_path / output_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        _command(f"output_dir={output_dir}"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not last.exists():
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    _train(tmp_path, "output_dir=full")
    _kill_after_first_checkpoint(tmp_path, "killed")

    interrupted = _load(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    step_at_kill = interrupted["global_step"]
    assert 0 < step_at_kill < EPOCHS * STEPS_PER_EPOCH - 1
    assert step_at_kill % STEPS_PER_EPOCH != 0, "the kill was meant to land inside an epoch"
    assert not (tmp_path / "killed" / "result.json").exists(), "the killed run must not have finished"

    _train(tmp_path, "output_dir=killed", "ckpt_path=last")  # the resume command the README documents

    full = _load(tmp_path / "full" / "checkpoints" / "last.ckpt")
    resumed = _load(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == full["global_step"] == EPOCHS * STEPS_PER_EPOCH

    # Weights and BatchNorm buffers, bitwise.
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for name, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), name
    # AdamW moments and step counts, bitwise.
    for a, b in zip(full["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key

    # Loss scale: the whole per-step history, the scaler's counters and learned state, the fp32 modules.
    plugin_full, plugin_resumed = full["AdaptiveMP"], resumed["AdaptiveMP"]
    history = plugin_full["scale_history"]["scale_history"]
    assert len(history) == EPOCHS * STEPS_PER_EPOCH
    assert len({scale for _, scale in history}) > 2, "the scale should have moved during the run"
    assert plugin_full["scaler"]["adaptive"]["skipped_steps"] > 0
    assert plugin_resumed["scale_history"]["scale_history"] == history
    assert plugin_resumed["scaler"] == plugin_full["scaler"]
    assert plugin_resumed["promotions"] == plugin_full["promotions"]
    assert plugin_resumed["steps"] == plugin_full["steps"]

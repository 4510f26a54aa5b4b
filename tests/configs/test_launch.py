"""Beyond one machine: Lightning's SLURM support (trainer=slurm) launched through Hydra's submitit launcher
(hydra/launcher=slurm), and Hydra sweeps, all through ``lightning-mp train --multirun``."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from lightning_mp.cli import compose, main, sweep_jobs

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='needs pip install "lightning-mp[slurm]"')

CLUSTER = ["hydra/launcher=slurm", "trainer=slurm", "trainer.num_nodes=2", "trainer.devices=4"]


def test_slurm_launcher_preset_is_sized_from_the_trainer():
    cfg = compose([*CLUSTER, "hydra.launcher.partition=gpu", "recipe=nlp", "precision=bf16"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.name == "lightning-mp-nlp-bf16"
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 4


def test_sweeps_expand_exactly_as_hydras_basic_sweeper(tmp_path):
    overrides = ["precision=fp32,bf16", "seed=range(0,3)", "recipe=nlp", "trainer.max_epochs=2"]
    reference = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]
    assert sweep_jobs(overrides) == reference
    assert len(sweep_jobs(overrides)) == 6


def _multirun(tmp_path: Path, *overrides: str, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``lightning-mp train --multirun OVERRIDES`` in a fresh process, run in ``tmp_path``."""
    command = [sys.executable, "-m", "lightning_mp.cli", "train", "--multirun", *overrides]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _fake_slurm(tmp_path: Path) -> dict[str, str]:
    """sbatch and srun test doubles on PATH: sbatch keeps the script it was given and refuses the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        '#!/bin/sh\ncp "$1" "$SBATCH_CAPTURE"\necho "sbatch: error: test double" >&2\nexit 1\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SBATCH_CAPTURE": str(tmp_path / "job.sh"),
    }


def test_multirun_submits_one_sbatch_job_with_a_task_per_device(tmp_path):
    proc = _multirun(tmp_path, *CLUSTER, "hydra.launcher.partition=gpu", env=_fake_slurm(tmp_path), timeout=120)
    assert proc.returncode != 0 and "sbatch: error: test double" in proc.stderr  # the double refused it
    script = (tmp_path / "job.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=240"):
        assert f"#SBATCH {line}\n" in script, line
    assert "srun " in script and "submitit.core._submit" in script


def test_multirun_rejects_a_bad_job_before_submitting_anything(tmp_path, capsys):
    status = main(["train", "--multirun", *CLUSTER, "precision=fp16,fp64"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    choices = "auto, bf16-true, bf16, fp16-true, fp16, fp16_underflow, fp32, fp8, int8"
    assert f"precision=fp64 is not a precision: choose from {choices}." in err
    assert not (tmp_path / "multirun").exists(), "nothing may be submitted"


def test_slurm_launcher_needs_whole_numbers_of_tasks(tmp_path, capsys):
    status = main(["train", "--multirun", "hydra/launcher=slurm", "trainer=slurm"])  # devices=auto
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "tasks_per_node" in err and "auto" in err


@pytest.mark.slow
def test_multirun_with_submitits_local_launcher_runs_every_job(tmp_path):
    """The same launcher path a cluster uses (submitit pickles the job, a separate process runs it), with
    submitit's local executor standing in for SLURM."""
    local = ["hydra/launcher=submitit_local", "experiment=quick", "recipe=nlp", "precision=fp32,bf16"]
    proc = _multirun(tmp_path, *local, "callbacks.progress_bar=null", "logger=csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for precision in ("fp32", "bf16"):
        result = json.loads((tmp_path / "outputs" / "nlp" / precision / "result.json").read_text())
        assert result["precision"] == precision and result["optimizer_steps"] > 0 and result["val_acc"] is not None
    assert list((tmp_path / "multirun").glob("*/*/.submitit")), "the jobs went through submitit"

"""The command line as a new user meets it in the first hour (issue 13): the installed ``lightning-mp`` run from
an empty temporary directory. Every bad input is one line naming the field and what is allowed, exit 2, and
nothing already written is touched; a failure inside training keeps its traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_mp.cli import TrainingFailed, compose, main
from lightning_mp.cli import run as cli  # _warn_about_devices and the os it reads

COMMAND = Path(sys.executable).parent / "lightning-mp"
QUICK = ["recipe=nlp", "experiment=quick", "logger=csv", "callbacks.progress_bar=null"]


def run(cwd, *args, timeout=300):
    if not COMMAND.exists():
        pytest.skip("the lightning-mp console script is not installed in this environment")
    return subprocess.run([str(COMMAND), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert err.startswith("lightning-mp: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["output_dir="], "output_dir='' is invalid: must be a directory path"),
        (
            ["reciep=nlp"],
            "'reciep' is not a key of the training config (nothing would read it). Did you mean recipe=nlp?",
        ),
        (["+reciep=nlp"], "Did you mean recipe=nlp?"),
        (["seed=abc"], "seed='abc' is invalid: must be an integer."),
        (["recipe=nlp", "data.vocab_size=-1"], "data.vocab_size=-1 is invalid: must be an integer >= 1."),
        (
            ["trainer.accumulate_grad_batches=0"],
            "trainer.accumulate_grad_batches=0 is invalid: must be an integer >= 1",
        ),
        (["output_dir=a_file/run"], "output_dir='a_file/run' cannot be written: Not a directory."),
        (["output_dir=done"], "output_dir='done' already holds a run (result.json): resume it with ckpt_path=last"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_from_the_installed_command_is_one_line(tmp_path, args, message):
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "result.json").write_text('{"val_acc": 0.9}')
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    err = one_line_error(run(tmp_path, "train", *args))
    assert message in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing was written"
    assert (tmp_path / "done" / "result.json").read_text() == '{"val_acc": 0.9}'
    assert not Path("/checkpoints").exists(), "an empty output_dir never means the file system root"


@pytest.mark.parametrize(
    "args", [["train", "--help"], ["compare", "--help"], ["train", "-h"], ["help"], ["help", "compare"]]
)
def test_help_from_the_installed_command(tmp_path, args):
    proc = run(tmp_path, *args)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "usage: lightning-mp" in proc.stdout
    if args[0] != "help" or len(args) > 1:
        assert (
            "recipe:" in proc.stdout
            and "nlp, speech, vision" in proc.stdout
            and "precision.scaler.<knob>" in proc.stdout
        )


@pytest.mark.parametrize(
    ("alias", "name"),
    [("16-mixed", "fp16"), ("16", "fp16"), ("bf16-mixed", "bf16"), ("32-true", "fp32"), ("32", "fp32")],
)
def test_lightning_precision_names_are_aliases(alias, name):
    cfg = compose([f"precision={alias}"])
    assert cfg.precision_name == name


def test_common_spellings_compose():
    assert "logger" not in compose(["logger=null"]), "logger=null removes the logger, as ~logger does"
    assert compose(["data.root=~/somewhere"]).data.root == str(Path.home() / "somewhere")
    assert compose(["trainer.strategy=ddp"]).trainer.strategy == "ddp", "any Trainer argument, without +"
    assert compose(["precision=auto", "precision.scaler.growth_factor=4"]).precision.scaler.growth_factor == 4


def test_more_cpu_processes_than_cores_is_warned_about(capsys, monkeypatch):
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    cli._warn_about_devices(compose(["trainer.accelerator=cpu", "trainer.devices=3"]))
    assert "trainer.devices=3 on a CPU with 2 cores" in capsys.readouterr().err
    cli._warn_about_devices(compose(["trainer.accelerator=cpu", "trainer.devices=2"]))
    assert capsys.readouterr().err == ""


def test_a_failure_inside_training_keeps_its_traceback(tmp_path, monkeypatch):
    """A genuine bug inside fit is not the user's input: it is not turned into a one-line usage error."""
    from lightning_mp.recipes.common import Classifier

    def broken(self, batch, batch_idx):
        raise ValueError("a bug in training_step")

    monkeypatch.setattr(Classifier, "training_step", broken)
    with pytest.raises(TrainingFailed) as raised:
        main(["train", *QUICK, "precision=fp32", f"output_dir={tmp_path}/run"])
    assert isinstance(raised.value.__cause__, ValueError) and "a bug in training_step" in str(raised.value)
    assert not list((tmp_path / "run").glob("csv/version_*")), "no log folder of a run that trained nothing"


def test_a_bug_while_building_the_run_keeps_its_traceback(tmp_path, monkeypatch):
    """A ValueError that is not a ConfigError is a failure, wherever it is raised: Hydra wrapping it (the error
    came from an object's constructor) does not make it the user's input."""
    from lightning_mp.recipes.vision.model import SmallResNet

    def broken(self, *args, **kwargs):
        raise ValueError("a bug in a constructor")

    monkeypatch.setattr(SmallResNet, "__init__", broken)
    with pytest.raises(Exception) as raised:
        main(["train", "recipe=vision", "experiment=quick", "logger=csv", f"output_dir={tmp_path}/run"])
    assert isinstance(raised.value.__cause__, ValueError) and "a bug in a constructor" in str(raised.value.__cause__)
    assert not (tmp_path / "run").exists()


def test_a_refused_run_leaves_no_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    args = ["recipe=nlp", "experiment=quick", "logger=tensorboard", f"data.root={tmp_path / 'empty'}"]
    assert main(["train", *args, f"output_dir={tmp_path}/run"]) == 2
    assert not (tmp_path / "run" / "tensorboard").exists(), "no tensorboard/version_0 with an empty events file"
    assert not (tmp_path / "run").exists(), "nor the empty run folder itself"


def test_a_sweep_gives_every_job_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*QUICK, "precision=fp32", "seed=0,1", "trainer.max_steps=1", f"output_dir={tmp_path}/o"]
    assert main(["train", "--multirun", *args]) == 0
    results = {seed: json.loads((tmp_path / "o" / f"seed={seed}" / "result.json").read_text()) for seed in (0, 1)}
    assert {r["output_dir"] for r in results.values()} == {f"{tmp_path}/o/seed=0", f"{tmp_path}/o/seed=1"}


@pytest.mark.slow
def test_a_run_saves_its_config_and_every_fp32_module_and_prints_no_noise(tmp_path):
    proc = run(tmp_path, "train", *QUICK, "precision=fp16", "trainer.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs" / "nlp" / "fp16"
    config = OmegaConf.load(out / "config.yaml")
    assert config.precision_name == "fp16" and config.model.net.vocab_size == config.data.vocab_size
    result = json.loads((out / "result.json").read_text())
    assert result["fp32_modules"], "the fp16 defaults put the LayerNorms in fp32: listed, with why"
    assert {m["reason"] for m in result["fp32_modules"]} == {"default"}
    assert {m["scope"] for m in result["fp32_modules"]} == {"module"}
    for noise in ("litlogger", "not supported by the model summary", "LeafSpec"):
        assert noise not in proc.stdout + proc.stderr, noise
    resumed = run(tmp_path, "train", *QUICK, "precision=fp16", "trainer.max_steps=4", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Please add the following callbacks" not in resumed.stdout + resumed.stderr

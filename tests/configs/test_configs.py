"""Every shipped config composes and instantiates; the CLI turns bad input into one line."""

from importlib import resources

import pytest
from hydra.utils import instantiate

from lightning_mp import AdaptiveMP
from lightning_mp.cli import compose, list_configs, main

GROUPS = {
    "recipe": ["nlp", "speech", "vision"],
    "precision": ["auto", "bf16-true", "bf16", "fp16-true", "fp16", "fp16_underflow", "fp32", "fp8", "int8"],
    "trainer": ["default", "slurm"],
    "logger": ["csv", "tensorboard"],
    "callbacks": ["default"],
    "experiment": ["long", "quick"],
    "hydra/launcher": ["slurm"],
}


def shipped_yaml():
    root = resources.files("lightning_mp.conf")
    found = []

    def walk(folder, prefix=""):
        for item in folder.iterdir():
            if item.is_dir() and not item.name.startswith("__"):
                walk(item, f"{prefix}{item.name}/")
            elif item.name.endswith(".yaml"):
                found.append(f"{prefix}{item.name}")

    walk(root)
    return sorted(found)


def test_discovers_every_shipped_config():
    files = shipped_yaml()
    assert len(files) == 1 + sum(len(v) for v in GROUPS.values()) == 21
    assert {g: [n for n, _ in entries] for g, entries in list_configs().items()} == GROUPS


def test_every_yaml_opens_with_a_header_saying_how_to_run_it():
    root = resources.files("lightning_mp.conf")
    for name in shipped_yaml():
        text = root.joinpath(name).read_text()
        comments = [ln for ln in text.splitlines()[:6] if ln.startswith("#") and "@package" not in ln]
        assert comments, f"{name} has no header"
        assert "lightning-mp " in text, f"{name} does not say how to run it"


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts if g != "recipe"])
@pytest.mark.parametrize("recipe", GROUPS["recipe"])
def test_every_option_composes_and_instantiates(recipe, group, option, tmp_path):
    cfg = compose([f"recipe={recipe}", f"{group}={option}", f"output_dir={tmp_path}"])
    plugin = instantiate(cfg.precision)
    assert isinstance(plugin, AdaptiveMP)
    data, model = instantiate(cfg.data), instantiate(cfg.model)
    assert data.num_classes == model.hparams.num_classes
    trainer = instantiate(cfg.trainer, plugins=[plugin], logger=instantiate(cfg.logger), callbacks=[])
    assert trainer.precision_plugin is plugin
    for callback in cfg.callbacks.values():
        if callback is not None:
            instantiate(callback)


def test_scaler_knobs_reach_the_scaler():
    cfg = compose(["precision=fp16", "precision.scaler.growth_interval=500", "precision.scaler.hysteresis=3"])
    plugin = instantiate(cfg.precision)
    assert plugin.scaler.config.growth_interval == 500 and plugin.scaler.config.hysteresis == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["recipe=vizion"], "recipe=vizion is not a recipe: choose from nlp, speech, vision. Did you mean vision?"),
        (
            ["precision=fp4"],
            "precision=fp4 is not a precision: choose from auto, bf16-true, bf16, fp16-true, fp16, fp16_underflow,"
            " fp32, fp8, int8.",
        ),
        (["precision=fp8", "precision.low_bit_recipe=blockwise"], "AdaptiveMP(low_bit_recipe='blockwise') is invalid"),
        (["precision=bf16", "+precision.low_bit_modules=[a]"], "only fp8-mixed and int8-mixed convert layers"),
        (
            ["precision=fp16", "precision.scaler.growth_interval=abc"],
            "AdaptiveLossScaler(growth_interval='abc') is invalid",
        ),
        (["precision=fp16", "precision.scaler.backoff_factor=2"], "AdaptiveLossScaler(backoff_factor=2) is invalid"),
        (["precision=fp16", "precision.scaler.growth_factor=1"], "AdaptiveLossScaler(growth_factor=1) is invalid"),
        (["precision=fp16", "precision.scaler.min_scale=8", "precision.scaler.max_scale=2"], "min_scale must be <="),
        (["precision=fp16", "precision.scaler.polcy=dynamic"], "Did you mean precision.scaler.policy=dynamic?"),
        (["+trainer.precision=16-mixed"], "trainer.precision='16-mixed' is not allowed"),
        (["trainer.max_epochs=three"], "trainer.max_epochs='three' is invalid"),
        (["data.batch_size=0"], "data.batch_size=0 is invalid"),
        (["model.lr=abc"], "model.lr='abc' is invalid: must be a number > 0."),
        (["model.warmup_steps=-1"], "model.warmup_steps=-1 is invalid: must be an integer >= 0."),
        (["model.lr_schedule=linear"], "model.lr_schedule='linear' is invalid: must be one of cosine, constant."),
        (["model.net.width=0"], "model.net.width=0 is invalid: must be an integer >= 1."),
        (["recipe=nlp", "model.net.dim=30"], "model.net.dim=30 is invalid: must be a multiple of model.net.heads=4"),
        (["data.root=5"], "data.root=5 is invalid: must be a directory path, or null for the built-in data."),
        (["precision.stats=most"], "AdaptiveMP(stats='most') is invalid"),
        (["precision.fp32_modules=[5]", "experiment=quick"], "precision: fp32_modules entry 5 is invalid"),
        (
            ["trainer.strategy=foo", "experiment=quick"],
            "trainer: You selected an invalid strategy name: `strategy='foo'`",
        ),
        (["precision.fp32_modules=[encoderr.*]", "experiment=quick"], "match no module"),
        (["data.root=/does/not/exist", "experiment=quick"], "data.root='/does/not/exist' does not exist"),
        (["ckpt_path=/nope.ckpt", "experiment=quick"], "ckpt_path='/nope.ckpt' does not exist"),
        (["notakey"], "notakey"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_one_line_and_exit_status_2(overrides, message, capsys, tmp_path):
    assert main(["train", *overrides, f"output_dir={tmp_path}", "logger=csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-mp: error: ") and "\n" not in err, err
    assert message in err
    assert "Traceback" not in err


def test_unknown_command_and_usage(capsys):
    assert main(["fit"]) == 2
    assert "unknown command 'fit'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "lightning-mp train" in capsys.readouterr().out


@pytest.mark.slow
def test_bad_input_leaves_an_earlier_runs_files_untouched(tmp_path, capsys):
    """A good run, then bad commands aimed at the same output_dir: every file of the good run keeps its bytes."""
    import hashlib

    run = ["recipe=nlp", "experiment=quick", "precision=bf16", f"output_dir={tmp_path / 'run'}", "logger=csv"]
    assert main(["train", *run]) == 0

    def snapshot():
        return {
            p.relative_to(tmp_path): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((tmp_path / "run").rglob("*"))
            if p.is_file()
        }

    before = snapshot()
    assert any(p.name == "last.ckpt" for p in before) and any(p.name == "result.json" for p in before)
    assert any(p.name == "precision_report.json" for p in before)
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in (
        ["precision=fp16", "precision.scaler.backoff_factor=3"],  # refused while building the plugin
        ["precision.fp32_modules=[encoderr.*]"],  # refused at setup, inside fit
        [f"data.root={empty}"],  # refused when the data is loaded
        ["ckpt_path=/nope.ckpt"],
        ["trainer.max_epochs=many"],
    ):
        assert main(["train", *run, "overwrite=true", *bad]) == 2, bad
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        after = snapshot()
        assert {p: h for p, h in after.items() if p in before} == before, bad

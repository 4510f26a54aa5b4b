"""A typo in a command line is refused before anything runs: one line naming what was typed and the nearest real
name, exit status 2, and no run directory left behind (issue: nested-key typos)."""

import pytest

from lightning_mp.cli import compose, main
from tests.configs.test_first_hour import one_line_error, run


def refused(capsys, tmp_path, *overrides: str) -> str:
    """The one-line error of ``lightning-mp train OVERRIDES`` run in the empty ``tmp_path``, which stays empty."""
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-mp: error: ") and "\n" not in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [], "a refused command leaves no run directory"
    return err.removeprefix("lightning-mp: error: ")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("recipe=visoin", "recipe=visoin is not a recipe: choose from nlp, speech, vision. Did you mean vision?"),
        ("experiment=quik", "experiment=quik is not an experiment: choose from long, quick. Did you mean quick?"),
        (
            "logger=tensorbord",
            "logger=tensorbord is not a logger: choose from csv, tensorboard. Did you mean tensorboard?",
        ),
    ],
    ids=["recipe", "experiment", "logger"],
)
def test_a_group_option_typo_names_the_options_and_the_nearest(capsys, tmp_path, override, message):
    assert refused(capsys, tmp_path, override) == message


def test_hydras_list_of_options_reads_as_a_list(capsys, tmp_path):
    """A group this command does not check itself (Hydra's launchers) still prints its options without
    stray semicolons."""
    err = refused(capsys, tmp_path, "hydra/launcher=slurmm", "--multirun")
    assert "Available options in 'hydra/launcher': basic, slurm, submitit_local, submitit_slurm" in err


# The examples, and the same typos behind + and ~: each with the exact line a user sees.
NESTED_TYPOS = [
    (
        "data.batchsize=8",
        "data.batchsize=8: 'batchsize' is not a key of data (VisionData). Did you mean data.batch_size=8?",
    ),
    (
        "callbacks.early_stoping=null",
        "callbacks.early_stoping=null: 'early_stoping' is not a key of callbacks."
        " Did you mean callbacks.early_stopping=null?",
    ),
    ("model.widht=3", "model.widht=3: 'widht' is not a key of model (Classifier). Did you mean model.net.width=3?"),
    (
        "trainer.max_epoch=3",
        "trainer.max_epoch=3: 'max_epoch' is not a key of trainer (Trainer). Did you mean trainer.max_epochs=3?",
    ),
    (
        "precision.scaler.growth_intervall=5",
        "precision.scaler.growth_intervall=5: 'growth_intervall' is not a key of precision.scaler"
        " (AdaptiveLossScaler). Did you mean precision.scaler.growth_interval=5?",
    ),
    (
        "+data.batchsize=8",
        "+data.batchsize=8: 'batchsize' is not a key of data (VisionData), so + cannot add it."
        " Did you mean data.batch_size=8?",
    ),
    (
        "+callbacks.early_stoping=null",
        "+callbacks.early_stoping=null: 'early_stoping' is not a key of callbacks, so + cannot add it."
        " Did you mean callbacks.early_stopping=null?",
    ),
    (
        "~callbacks.early_stoping",
        "~callbacks.early_stoping: 'early_stoping' is not a key of callbacks. Did you mean ~callbacks.early_stopping?",
    ),
]


@pytest.mark.parametrize(("override", "message"), NESTED_TYPOS, ids=[override for override, _ in NESTED_TYPOS])
def test_a_nested_key_typo_names_the_nearest_real_key(capsys, tmp_path, override, message):
    assert refused(capsys, tmp_path, override) == message


def test_a_suggested_argument_the_yaml_leaves_out_is_written_with_plus(capsys, tmp_path):
    """weight_decay is an argument of Classifier that no recipe writes: Hydra adds it only with +."""
    assert refused(capsys, tmp_path, "model.weight_decy=0.1").endswith("Did you mean +model.weight_decay=0.1?")


def test_a_key_with_nothing_near_lists_what_the_node_takes(capsys, tmp_path):
    assert refused(capsys, tmp_path, "data.foo=1") == (
        "data.foo=1: 'foo' is not a key of data (VisionData)."
        " It takes: batch_size, num_classes, root, seed, train_size, val_size."
    )


def test_a_key_below_a_callback_turned_off_is_refused(capsys, tmp_path):
    """experiment=quick sets callbacks.early_stopping to null: a patience there would be read by nothing."""
    assert refused(capsys, tmp_path, "experiment=quick", "+callbacks.early_stopping.patience=3") == (
        "+callbacks.early_stopping.patience=3: callbacks.early_stopping is null here"
        " (a config or an override turned it off), so nothing would read 'patience'."
    )


def test_plus_adds_an_argument_the_yaml_leaves_at_its_default():
    assert compose(["+model.weight_decay=0.1"]).model.weight_decay == 0.1


def test_plus_adds_a_whole_new_callback():
    cfg = compose(["+callbacks.lr={_target_: lightning.pytorch.callbacks.LearningRateMonitor}"])
    assert cfg.callbacks.lr._target_ == "lightning.pytorch.callbacks.LearningRateMonitor"


def test_plus_adds_a_keyword_that_an_object_taking_kwargs_passes_on():
    """TensorBoardLogger hands its **kwargs to SummaryWriter: a key not close to a real one may be added."""
    assert compose(["logger=tensorboard", "+logger.flush_secs=5"]).logger.flush_secs == 5


def test_plus_refuses_a_keyword_close_to_a_real_one_even_where_kwargs_are_taken(capsys, tmp_path):
    assert refused(capsys, tmp_path, "logger=tensorboard", "+logger.nme=x").endswith("Did you mean logger.name=x?")


def test_any_trainer_argument_the_yaml_leaves_out_still_works_without_plus():
    assert compose(["trainer.gradient_clip_algorithm=value"]).trainer.gradient_clip_algorithm == "value"


def test_the_installed_command_refuses_a_typo_from_an_empty_directory(tmp_path):
    """As a user meets it: the console script, run where nothing exists yet, trains nothing and writes nothing."""
    err = one_line_error(run(tmp_path, "train", "recipe=vision", "data.batchsize=8"))
    assert err == (
        "lightning-mp: error: data.batchsize=8: 'batchsize' is not a key of data (VisionData)."
        " Did you mean data.batch_size=8?"
    )
    assert list(tmp_path.iterdir()) == []


def test_hydras_own_sentences_are_not_joined_with_semicolons(capsys, tmp_path):
    """A real argument the YAML leaves out, set without +: Hydra's advice (+, which the rule above accepts)."""
    err = refused(capsys, tmp_path, "callbacks.early_stopping.min_delta=0.1")
    assert err == (
        "Could not override 'callbacks.early_stopping.min_delta'."
        " To append to your config use +callbacks.early_stopping.min_delta=0.1"
    )

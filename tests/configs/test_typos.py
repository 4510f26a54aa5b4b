"""A typo in a command line is refused before anything runs: one line naming what was typed and the nearest real
name, exit status 2, and no run directory left behind (issue: nested-key typos)."""

import pytest

from lightning_mp.cli import main


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

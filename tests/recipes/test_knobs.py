"""Each recipe declares its own knobs (``recipes/<name>/knobs.py``): every argument of every class its config
builds, checked by the class at construction and by the command line before anything is built."""

import inspect
from importlib import resources

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf
from torch import nn

from lightning_mp.cli import main
from lightning_mp.errors import ConfigError
from lightning_mp.recipes.common import Classifier
from lightning_mp.recipes.knobs import Integer, knobs_of
from lightning_mp.recipes.nlp import TransformerClassifier
from lightning_mp.recipes.speech import SpeechData
from lightning_mp.recipes.vision import VisionData


def shipped_targets() -> list[str]:
    """Every ``_target_`` the shipped recipe configs build."""
    found = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found.add(node["_target_"])
            for child in node.values():
                walk(child)

    for item in resources.files("lightning_mp.conf").joinpath("recipe").iterdir():
        if item.name.endswith(".yaml"):
            walk(OmegaConf.to_container(OmegaConf.create(item.read_text()), resolve=False))
    return sorted(found)


@pytest.mark.parametrize("target", shipped_targets())
def test_every_recipe_class_declares_exactly_its_arguments(target):
    knobs = knobs_of(target)
    assert knobs is not None, f"{target}: no KNOBS entry in its package's knobs.py"
    arguments = [name for name in inspect.signature(get_object(target)).parameters if name != "self"]
    assert list(knobs.rules) == arguments


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: VisionData(batch_size=0), "data.batch_size=0 is invalid: must be an integer >= 1."),
        (
            lambda: SpeechData(root=5),
            "data.root=5 is invalid: must be a directory path, or null for the built-in data.",
        ),
        (lambda: Classifier(nn.Linear(2, 2), num_classes=2, lr=0), "model.lr=0 is invalid: must be a number > 0."),
        (
            lambda: TransformerClassifier(vocab_size=10, num_classes=2, dim=30, heads=4),
            "model.net.dim=30 is invalid: must be a multiple of model.net.heads=4",
        ),
    ],
    ids=["integer", "folder", "number", "a check across knobs"],
)
def test_a_recipe_class_refuses_a_bad_knob_at_construction(build, message):
    with pytest.raises(ConfigError) as raised:
        build()
    assert str(raised.value).startswith(message)


def test_a_knob_a_recipe_declares_is_a_key_the_command_line_accepts_and_checks(monkeypatch, capsys, tmp_path):
    """What adding a knob takes: the argument in the class and one line in its recipe's ``KNOBS``. The command
    line reads the declaration: the new key is accepted (``+``, as the YAML does not write it) and checked."""
    from lightning_mp.recipes.vision import knobs

    monkeypatch.setitem(knobs.NET.rules, "depth", Integer(minimum=1))
    assert main(["train", "+model.net.depth=0"]) == 2
    assert (
        capsys.readouterr().err.strip() == "lightning-mp: error: model.net.depth=0 is invalid: must be an integer >= 1."
    )
    assert list(tmp_path.iterdir()) == [], "refused before anything was written"

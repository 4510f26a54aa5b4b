"""PluginOptions: every AdaptiveMP knob validated at construction, naming the field, the value and what is allowed."""

import dataclasses
import inspect
from pathlib import Path

import pytest

import lightning_mp
from lightning_mp.options import PluginOptions
from lightning_mp.scaling import AdaptiveLossScaler


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precision": "fp16"}, r"AdaptiveMP\(precision='fp16'\) is invalid: precision must be one of"),
        ({"device": 0}, r"AdaptiveMP\(device=0\) is invalid: device must be None or a device type string"),
        ({"scaler": 2.0}, r"AdaptiveMP\(scaler=2.0\) is invalid: scaler must be None, an AdaptiveLossScaler"),
        ({"scaler": {"device": "cpu"}}, r"scaler=\{'device': \.\.\.\}\) is invalid: the device is taken from"),
        ({"scaler": {"growth_factor": 0.5}}, r"AdaptiveLossScaler\(growth_factor=0.5\) is invalid: .* > 1"),
        ({"precision": "bf16-mixed", "scaler": {}}, r"precision='bf16-mixed', scaler=\.\.\.\) is invalid"),
        ({"stats": "most"}, r"AdaptiveMP\(stats='most'\) is invalid: must be one of \('off', 'cheap', 'full'\)"),
        ({"attach_callbacks": 1}, r"AdaptiveMP\(attach_callbacks=1\) is invalid: must be True or False"),
        ({"stats_every": 0}, r"AdaptiveMP\(stats_every=0\) is invalid: must be None \(the default for the precisi"),
        ({"max_events": True}, r"AdaptiveMP\(max_events=True\) is invalid: must be an integer >= 1"),
    ],
    ids=["precision", "device", "scaler-type", "scaler-device", "scaler-knob", "scaler-bf16", "stats", "flag",
         "count", "bool-count"],
)  # fmt: skip
def test_bad_options_name_field_value_and_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PluginOptions(**kwargs)


def test_derived_values():
    options = PluginOptions(precision="16-mixed", device="cuda:1", scaler={"growth_interval": 5})
    assert options.device_type == "cuda"
    assert options.scaler_knobs == {"growth_interval": 5}
    assert PluginOptions(scaler=AdaptiveLossScaler("cpu")).scaler_knobs == {}
    assert PluginOptions().device_type is None


def test_the_options_are_exactly_the_plugins_arguments_in_order():
    """The CLI lists and accepts AdaptiveMP's knobs from PluginOptions (no Lightning import): they must agree."""
    import dataclasses
    import inspect

    from lightning_mp import AdaptiveMP

    assert [f.name for f in dataclasses.fields(PluginOptions)] == list(inspect.signature(AdaptiveMP).parameters)


def test_the_fabric_plugin_takes_the_trainer_plugins_arguments_but_the_trainer_only_ones():
    """Both shells spell out their arguments (for help and IDEs); names, order and defaults must not drift."""
    import inspect

    from lightning_mp import AdaptiveMP
    from lightning_mp.fabric import AdaptiveMP as FabricAdaptiveMP

    trainer_only = {"attach_callbacks", "sharded_gradients", "replay", "rescue"}
    trainer = [p for p in inspect.signature(AdaptiveMP).parameters.values() if p.name not in trainer_only]
    assert list(inspect.signature(FabricAdaptiveMP).parameters.values()) == trainer


# ---------------------------------------------------------------------------------- one declaration of every knob
def _signature(cls) -> dict[str, object]:
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}


def test_every_shell_takes_exactly_the_declared_knobs_with_the_declared_defaults():
    from lightning_mp import AdaptiveMP
    from lightning_mp.fabric import AdaptiveMP as FabricAdaptiveMP
    from lightning_mp.options import FABRIC_KNOBS, KNOBS

    defaults = {f.name: f.default for f in dataclasses.fields(PluginOptions)}
    assert _signature(AdaptiveMP) == {name: defaults[name] for name in KNOBS}
    assert _signature(FabricAdaptiveMP) == {name: defaults[name] for name in FABRIC_KNOBS}
    for cls, knobs in ((AdaptiveMP, KNOBS), (FabricAdaptiveMP, FABRIC_KNOBS)):
        documented = {line.strip().split(":")[0] for line in cls.__doc__.splitlines() if line.startswith(" " * 8)}
        assert set(knobs) <= documented, set(knobs) - documented  # the Args section, built from the declaration


def test_the_shipped_precision_configs_set_only_declared_knobs():
    from omegaconf import OmegaConf

    from lightning_mp.options import KNOBS

    for path in sorted(Path(lightning_mp.__file__).parent.parent.joinpath("conf", "precision").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))["precision"]
        assert node["_target_"] == "lightning_mp.AdaptiveMP", path.name
        assert set(node) - {"_target_", "_convert_"} <= set(KNOBS), path.name

"""AdaptiveMP without a Trainer: argument validation, precision resolution, state round trips."""

import pytest
import torch

from lightning_mp import AdaptiveLossScaler, AdaptiveMP
from lightning_mp.formats import resolve_auto_precision


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"precision": "fp16"}, ValueError, r"precision='fp16'.*one of \('auto', '16-mixed'"),
        ({"precision": 16}, ValueError, r"precision=16.*one of"),
        (
            {"precision": "bf16-mixed", "scaler": AdaptiveLossScaler("cpu")},
            ValueError,
            r"scaler.*only used with",
        ),
        (
            {"precision": "32-true", "scaler": AdaptiveLossScaler("cpu")},
            ValueError,
            r"scaler.*only used with",
        ),
        ({"precision": "16-mixed", "scaler": 2.0**16}, ValueError, r"scaler=65536.0.*torch.amp.GradScaler"),
        ({"device": 0}, ValueError, r"device=0.*device type string"),
        ({"guard_nonfinite": "yes"}, ValueError, r"guard_nonfinite='yes'"),
    ],
    ids=[
        "unknown-name",
        "int-precision",
        "scaler-with-bf16",
        "scaler-with-fp32",
        "plain-gradscaler",
        "device",
        "guard",
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaptiveMP(**kwargs)


def test_scaler_for_another_device_is_refused_at_setup():
    plugin = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cuda", enabled=False))
    with pytest.raises(ValueError, match=r"built for device 'cuda'.*runs on 'cpu'"):
        plugin.connect(torch.nn.Linear(2, 2), [], [])


def test_fp16_plugin_has_a_scaler_before_setup():
    plugin = AdaptiveMP("16-mixed", device="cpu")
    assert isinstance(plugin.scaler, AdaptiveLossScaler)
    assert plugin.scaler.config.policy == "predictive"


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_no_scaler_without_fp16(precision):
    assert AdaptiveMP(precision).scaler is None


@pytest.mark.parametrize(
    ("device", "native_bf16", "expected"),
    [("cpu", True, "bf16-mixed"), ("cpu", False, "32-true"), ("mps", False, "32-true")],
)
def test_auto_precision_table(monkeypatch, device, native_bf16, expected):
    monkeypatch.setattr("lightning_mp.formats.auto.cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_auto_precision(device) == expected


def test_auto_on_cuda_prefers_bf16_then_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_auto_precision("cuda") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_auto_precision("cuda") == "16-mixed"


def test_autocast_context_outside_a_trainer_uses_the_precision():
    with AdaptiveMP("bf16-mixed", device="cpu").forward_context():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with AdaptiveMP("32-true").forward_context():
        assert not torch.is_autocast_enabled("cpu")


def test_autocast_before_setup_decides_nothing():
    """Entering autocast outside a Trainer must not fix "auto" to the CPU's answer (or build a scaler): the
    model's device, known at setup, decides."""
    plugin = AdaptiveMP()
    with plugin.forward_context():
        pass
    assert plugin.precision == "auto" and plugin.device is None and plugin.scaler is None
    plugin.connect(torch.nn.Linear(2, 2).to("meta"), [], [])  # a device that is not the CPU: resolved for it
    assert (plugin.precision, plugin.device) == ("32-true", "meta")
    plugin.core.teardown()  # connect armed the execution-order hooks a first step would remove


def test_state_from_another_precision_keeps_counters_and_ignores_the_scaler(recwarn):
    source = AdaptiveMP("bf16-mixed")
    source.ledger.skipped_steps = 3
    target = AdaptiveMP("16-mixed", device="cpu")
    target.load_state_dict(source.state_dict())
    assert target.skipped_steps == 3
    assert target.scaler.get_scale() == 2.0**16
    assert any("does not apply" in str(w.message) for w in recwarn)


def test_migrates_the_scale_from_a_lightning_mixed_precision_checkpoint():
    plugin = AdaptiveMP("16-mixed", device="cpu")
    legacy = {
        "scale": 512.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 5,
    }
    plugin.on_load_checkpoint({"MixedPrecision": legacy})
    assert plugin.scaler.get_scale() == 512.0
    assert plugin.scaler._get_growth_tracker() == 5


def test_statistics_sample_every_25_steps_in_fp16_and_every_100_with_fp32s_range_unless_told():
    """fp16 runs out of range and its predictive scaler reads the samples; bf16 and fp32 watch for runaway values
    a quarter as often. An escalation from fp16 to bf16 takes bf16's cadence; an explicit one always holds."""
    assert AdaptiveMP("16-mixed").core.stats_every == 25
    assert AdaptiveMP("bf16-mixed").core.stats_every == AdaptiveMP("32-true").core.stats_every == 100
    assert AdaptiveMP("bf16-mixed", stats_every=7).core.stats_every == 7
    escalated = AdaptiveMP("16-mixed")
    escalated.core.setting.switch_to_bf16()
    assert escalated.core.stats_every == 100 and AdaptiveMP("16-mixed", stats_every=5).core.stats_every == 5

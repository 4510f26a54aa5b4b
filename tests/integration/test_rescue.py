"""Loss scaling on real steps: a rescued fp16 step, a calibrated first scale, the spike-aware growth limit.

Each behaviour is checked against a reference: a rescued step against a run that used the lower scale from
the start, the calibrated start against torch's GradScaler on the same model and data.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_mp import AdaptiveLossScaler, AdaptiveMP
from lightning_mp.reporting.report import build_report, render_markdown, run_metrics
from lightning_mp.scaling import ScaleAction, ScalePolicy, ScalerConfig
from tests.helpers import ExplodingBackward, TroubleNet, fit, gradscaler_reproduction, loader


class GainedRegressor(L.LightningModule):
    """An MLP whose loss is multiplied by ``gain``: the gain moves the scale at which its fp16 backward overflows
    (about 2^14 / gain here); the learning rate is divided by it, so the updates are the same whatever it is.
    With ``norm_and_dropout`` it has the state a rescue must put back: BatchNorm
    statistics and dropout's random masks. Logs one count per training step (a re-run must not log again)."""

    def __init__(self, gain: float = 1.0, norm_and_dropout: bool = False, lr: float = 0.05) -> None:
        super().__init__()
        middle = [nn.BatchNorm1d(8), nn.Dropout(0.25)] if norm_and_dropout else []
        self.net = nn.Sequential(nn.Linear(4, 8), *middle, nn.ReLU(), nn.Linear(8, 1))
        self.gain, self.lr = gain, lr / gain

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("steps_logged", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")
        return F.mse_loss(self.net(x).float(), y) * self.gain

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ScalePerStep(L.Callback):
    """The scale each optimizer step's gradients carried (read where clipping would run)."""

    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


def _gradscaler_reproduction(**knobs) -> AdaptiveLossScaler:
    return gradscaler_reproduction(**knobs)


def _fit(plugin, model, steps, data=None, callbacks=(), accumulate=1):
    data = data or loader(samples=4 * steps * accumulate)  # one epoch: epoch-level logged sums cover every step
    return fit(
        plugin, model=model, data=data, max_steps=steps, callbacks=list(callbacks), accumulate_grad_batches=accumulate
    )


def test_a_rescued_step_equals_the_step_a_run_at_the_lower_scale_takes_dropout_and_batchnorm_included():
    # At 2^15 this model's first backward overflows; the rescue re-runs the batch at 2^14, which is clean.
    torch.manual_seed(0)
    rescued_model = GainedRegressor(norm_and_dropout=True)
    rescuing = AdaptiveMP("16-mixed", scaler=_gradscaler_reproduction(init_scale=2.0**15), rescue=True)
    probe = ScalePerStep()
    _, t = _fit(rescuing, rescued_model, steps=6, callbacks=[probe])
    assert rescuing.skipped_steps == 0
    assert rescuing.ledger.rescued_steps >= 1 and rescuing.scaler.rescues >= 1
    assert rescuing.scaler.policy.rescuing  # told at setup: growth may use the rescued headroom
    assert probe.scales[0] == 2.0**14  # the first step's gradients carry the lower scale
    assert t.callback_metrics["steps_logged"] == 6  # the re-run's self.log calls were muted
    # What the user reads: the logged figure and the report count the rescued steps.
    assert run_metrics(rescuing)["precision/rescued_steps"] == rescuing.rescued_steps
    report = build_report(rescuing, [])
    assert report["run"]["rescued_steps"] == rescuing.rescued_steps
    assert f"rescued: {rescuing.rescued_steps}" in render_markdown(report)

    torch.manual_seed(0)
    reference_model = GainedRegressor(norm_and_dropout=True)
    reference = AdaptiveMP("16-mixed", scaler=_gradscaler_reproduction(init_scale=2.0**14), rescue=True)
    _fit(reference, reference_model, steps=6)
    # The same weights and BatchNorm statistics: the re-run saw the same dropout masks and started from the
    # buffers as the batch found them.
    for ours, theirs in zip(rescued_model.state_dict().values(), reference_model.state_dict().values()):
        assert torch.equal(ours, theirs)
    assert reference.ledger.rescued_steps == rescuing.ledger.rescued_steps - 1


def test_a_rescued_accumulated_step_equals_the_step_a_run_at_the_lower_scale_takes():
    # Each kept micro-batch runs again (dropout masks and BatchNorm statistics as the batch found them); the
    # logged count shows the re-runs' self.log calls were muted.
    torch.manual_seed(0)
    rescued_model = GainedRegressor(norm_and_dropout=True)
    rescuing = AdaptiveMP("16-mixed", scaler=_gradscaler_reproduction(init_scale=2.0**15), rescue=True)
    _, t = _fit(rescuing, rescued_model, steps=6, accumulate=3)
    assert rescuing.skipped_steps == 0 and rescuing.ledger.rescued_steps >= 1
    assert t.callback_metrics["steps_logged"] == 18
    torch.manual_seed(0)
    reference_model = GainedRegressor(norm_and_dropout=True)
    reference = AdaptiveMP("16-mixed", scaler=_gradscaler_reproduction(init_scale=2.0**14), rescue=True)
    _fit(reference, reference_model, steps=6, accumulate=3)
    for ours, theirs in zip(rescued_model.state_dict().values(), reference_model.state_dict().values()):
        assert torch.equal(ours, theirs)
    assert reference.ledger.rescued_steps == rescuing.ledger.rescued_steps - 1


@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_the_calibrated_start_skips_no_step_with_gradient_accumulation_either(accumulate):
    torch.manual_seed(0)
    plugin = AdaptiveMP("16-mixed", attach_callbacks=False)  # the defaults
    _fit(plugin, GainedRegressor(100.0), steps=16, accumulate=accumulate)
    assert plugin.skipped_steps == 0 and plugin.ledger.rescued_steps == 1


def test_without_rescue_the_same_overflow_is_a_skipped_step():
    torch.manual_seed(0)
    plugin = AdaptiveMP("16-mixed", scaler=_gradscaler_reproduction(init_scale=2.0**15), rescue=False)
    _fit(plugin, GainedRegressor(norm_and_dropout=True), steps=6)
    assert plugin.skipped_steps >= 1 and plugin.ledger.rescued_steps == 0


def test_a_bad_batch_is_not_rescued_it_is_skipped_and_attributed_to_the_input():
    x, y = loader(samples=16).dataset.tensors
    x = x.clone()
    x[0, 0] = float("nan")  # the first batch is bad whatever the scale
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    plugin = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=2.0**8, calibrate=False), rescue=True)
    _fit(plugin, GainedRegressor(), steps=4, data=data)
    assert plugin.ledger.rescued_steps == 0 and plugin.scaler.rescues == 0
    assert plugin.skipped_steps == 1 and plugin.overflow_events[0].phase == "input"


@pytest.mark.parametrize(
    "gain, expect",
    [
        (2.0**11, "below"),  # the right scale is about 2^3: GradScaler starts 13 halvings above it
        (2.0**-14, "above"),  # about 2^28: GradScaler would need a growth_interval per doubling
    ],
)
def test_the_calibrated_start_skips_no_step_where_gradscaler_pays_for_its_2_16(gain, expect):
    steps = 12
    torch.manual_seed(0)
    gradscaler = torch.amp.GradScaler("cpu")
    ref_probe = ScalePerStep()
    _fit(MixedPrecision("16-mixed", "cpu", scaler=gradscaler), GainedRegressor(gain), steps, callbacks=[ref_probe])
    gradscaler_skipped = sum(1 for a, b in zip(ref_probe.scales, ref_probe.scales[1:]) if b < a)

    torch.manual_seed(0)
    ours = AdaptiveMP("16-mixed")  # the defaults: predictive policy, calibration and rescue on
    probe = ScalePerStep()
    _fit(ours, GainedRegressor(gain), steps, callbacks=[probe])
    assert ours.skipped_steps == 0
    if expect == "below":
        assert gradscaler_skipped >= 10  # what the start costs GradScaler on this model
        assert ours.ledger.rescued_steps == 1  # the first step, probed at the floor, then calibrated
        assert max(probe.scales[1:]) <= 2.0**4
    else:
        assert set(ref_probe.scales) == {2.0**16}  # GradScaler never grows in 12 steps
        assert probe.scales[1] == ours.scaler.config.max_scale  # calibrated up to the ceiling at once
    assert ours.scaler.policy.calibrating is False


def test_a_resumed_run_is_never_calibrated():
    scaler = AdaptiveLossScaler("cpu")
    assert scaler.policy.calibrating
    plain = torch.amp.GradScaler("cpu", init_scale=2.0**10).state_dict()
    scaler.load_state_dict(plain)  # e.g. a checkpoint of Lightning's MixedPrecision
    assert not scaler.policy.calibrating
    assert scaler.policy.update(False, amax=1e-6) is not ScaleAction.CALIBRATED
    assert scaler.get_scale() == 2.0**10


def test_the_gradscaler_reproduction_neither_calibrates_nor_rescues():
    scaler = _gradscaler_reproduction()
    assert not scaler.policy.calibrating
    plugin = AdaptiveMP("16-mixed", scaler=scaler)
    assert not plugin.core.rescue_enabled
    assert AdaptiveMP("16-mixed").core.rescue_enabled  # the default predictive scaler rescues


def test_the_spike_aware_policy_refuses_a_growth_that_would_overflow_a_known_backward_gradient():
    config = ScalerConfig(init_scale=2.0**10, growth_interval=1, calibrate=False)
    blind, aware = ScalePolicy(config), ScalePolicy(config)
    # Parameter gradients are tiny (their amax alone allows a big jump), but a gradient inside the backward
    # was measured at 16: at 2^12 it would be 2^16 > 65504.
    aware.observe_backward_amax(16.0)
    assert blind.update(False, amax=1e-6) is ScaleAction.GREW
    assert blind.scale > 2.0**11
    assert aware.update(False, amax=1e-6) is ScaleAction.GREW
    assert aware.scale == 2.0**11  # 2^11 * 16 = 2^15 stays below the format's max by headroom_bits
    assert aware.update(False, amax=1e-6) is ScaleAction.GROWTH_REFUSED
    assert aware.scale == 2.0**11


def test_a_tolerated_overflow_is_rescued_at_a_lower_scale_for_that_step_only():
    policy = ScalePolicy(ScalerConfig(init_scale=2.0**12, calibrate=False, growth_interval=100))
    for _ in range(3):
        policy.update(False, amax=1.0)  # the scale has proven itself
    assert policy.rescue() == 2.0**11  # hysteresis tolerates this overflow: only the re-run is lower
    assert policy.scale == 2.0**12 and policy.overflows == 1 and policy.steps == 3
    policy.update(False, amax=1.0)  # the re-run was clean
    assert policy.scale == 2.0**12 and policy.steps == 4
    assert policy.rescue() == 2.0**11  # the second overflow within the window backs off for good
    assert policy.scale == 2.0**11


def test_rescue_and_calibrate_are_validated_with_the_field_named():
    with pytest.raises(ValueError, match=r"AdaptiveMP\(rescue='yes'\) is invalid"):
        AdaptiveMP("16-mixed", rescue="yes")
    with pytest.raises(ValueError, match=r"AdaptiveLossScaler\(calibrate=1\) is invalid"):
        AdaptiveLossScaler("cpu", calibrate=1)


def test_where_overflows_are_rescued_growth_goes_closer_to_the_edge():
    # An amax at which 2^15 leaves 0.2 bits below fp16's max: enough for the rescued headroom (0.125 bits),
    # not for the default one (0.25 bits).
    amax = 65504.0 / 2.0**15.2
    config = ScalerConfig(init_scale=2.0**10, growth_interval=1, calibrate=False)
    plain, rescuing = ScalePolicy(config), ScalePolicy(config)
    rescuing.rescuing = True
    for policy in (plain, rescuing):
        for _ in range(40):
            policy.update(False, amax=amax)
    assert (plain.scale, rescuing.scale) == (2.0**14, 2.0**15)
    assert AdaptiveMP("16-mixed").scaler.policy.rescuing is False  # set at setup, from the plugin's rescue


def test_an_optimizer_without_gradients_is_not_an_overflow():
    scaler = gradscaler_reproduction()
    frozen = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)  # its parameter never gets a gradient
    scaler.scale(torch.ones(()))
    scaler.unscale_(frozen)
    assert scaler.overflowed(frozen) is False


def test_the_last_rerun_uses_no_loss_scaling_and_the_policy_backs_off_below_the_first():
    policy = ScalePolicy(ScalerConfig(init_scale=2.0**12, calibrate=False, growth_interval=100))
    for _ in range(3):
        policy.update(False, amax=1.0)
    first = policy.rescue()  # tolerated: only the re-run is lower
    assert (first, policy.scale) == (2.0**11, 2.0**12)
    assert policy.rescue(last=True, current=first) == 1.0  # the first re-run overflowed too
    assert policy.scale == 2.0**10, "both scales overflowed: the policy goes one factor below the re-run's"


def test_a_gradient_nonfinite_at_any_scale_is_excused_keeps_the_scale_and_is_blamed_on_its_module():
    plugin = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=256.0), rescue=True)
    fit(plugin, model_cls=lambda: TroubleNet(ExplodingBackward(float("nan"))), max_steps=4)
    events = plugin.overflow_events
    assert events and all(e.phase == "backward" and e.module == "middle" for e in events)
    assert all(e.scaler_action is ScaleAction.EXCUSED for e in events)
    assert plugin.scaler.get_scale() == 256.0, "re-runs without scaling proved it is not the scale's fault"
    assert "middle" in plugin.fp32_modules, "blamed twice: promoted, as a forward overflow would be"
    assert plugin.ledger.rescued_steps == 0 and plugin.scaler.rescues == 2 * len(events)


def test_a_disabled_scaler_trains_without_rescue_or_calibration():
    # An explicit cadence: the default one samples the first step anyway.
    plugin = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", enabled=False), stats_every=25)
    model, _ = fit(plugin, max_steps=3)
    assert not plugin.core.rescue_enabled and not plugin.scaler.policy.calibrating
    assert plugin.statistics.samples_taken == 0, "no first-step sample for a calibration that cannot happen"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_checkpoint_taken_between_rescue_and_update_keeps_the_policys_scale():
    scaler = AdaptiveLossScaler("cpu", init_scale=2.0**12, calibrate=False)
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    scaler.scale(optimizer.param_groups[0]["params"][0].sum()).backward()
    scaler.unscale_(optimizer)
    for _ in range(3):
        scaler.policy.update(False, amax=1.0)  # the scale has proven itself: the overflow will be tolerated
    assert scaler.rescue() == 2.0**11 and scaler.get_scale() == 2.0**11  # the re-run's scale
    assert scaler.state_dict()["scale"] == scaler.policy.scale == 2.0**12


class BoringModel(L.LightningModule):
    """Lightning's BoringModel (demos/boring_classes.py) as its fused-optimizer parity test uses it."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.layer = nn.Linear(32, 2)
        self.fused = fused

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1.0, fused=self.fused)


def test_fused_and_unfused_adam_train_the_same_as_in_lightnings_parity_test():
    # A CPU port of Lightning's test_amp_fused_optimizer_parity: the unfused run rescues its overflowing first
    # step; the fused one must take the same decision, not skip it.
    def run(fused: bool):
        L.seed_everything(1234, verbose=False)
        model = BoringModel(fused)
        data = torch.utils.data.DataLoader(torch.randn(64, 32), batch_size=2)
        plugin = AdaptiveMP("16-mixed", attach_callbacks=False)
        fit(plugin, model=model, data=data, max_steps=5, seed=1234)
        return model, plugin

    plain, plain_plugin = run(fused=False)
    fused, fused_plugin = run(fused=True)
    assert (fused_plugin.skipped_steps, fused_plugin.rescued_steps) == (
        plain_plugin.skipped_steps,
        plain_plugin.rescued_steps,
    )
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(p, q)

"""AdaptiveMP inside a real Lightning Trainer, compared with Lightning's own MixedPrecision."""

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mp import AdaptiveLossScaler, AdaptiveMP
from lightning_mp.formats import cpu_has_native_bf16
from tests.helpers import (
    ManualRegressor,
    TinyRegressor,
    fit,
    gradscaler_reproduction,
    loader,
    loader_with,
    same_weights,
    trainer,
)

# 2**24 makes the first fp16 backward passes overflow, so both runs also skip steps and back off.
SCALER_SETTINGS = {"init_scale": 2.0**24, "growth_interval": 3}


def classic_fp16():
    return AdaptiveMP("16-mixed", scaler=gradscaler_reproduction(**SCALER_SETTINGS))


def plugin_without_natural_overflows(precision):
    """The tiny model overflows fp16 at the default 2**16 scale; start lower so only injected faults skip."""
    if precision == "16-mixed":
        return AdaptiveMP(precision, scaler=AdaptiveLossScaler("cpu", init_scale=256.0))
    return AdaptiveMP(precision)


def lightning_fp16():
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", **SCALER_SETTINGS))


@pytest.mark.parametrize(
    ("model_cls", "trainer_kwargs"),
    [
        (TinyRegressor, {}),
        (TinyRegressor, {"accumulate_grad_batches": 2}),
        (TinyRegressor, {"gradient_clip_val": 0.01}),
        (TinyRegressor, {"gradient_clip_val": 0.05, "gradient_clip_algorithm": "value"}),
        (ManualRegressor, {}),
    ],
    ids=["plain", "accumulation", "clip-norm", "clip-value", "manual-optimization"],
)
def test_fp16_weights_bitwise_equal_lightning_mixed_precision(model_cls, trainer_kwargs):
    ours, ours_trainer = fit(classic_fp16(), model_cls=model_cls, max_steps=9, **trainer_kwargs)
    ref, ref_trainer = fit(lightning_fp16(), model_cls=model_cls, max_steps=9, **trainer_kwargs)
    plugin, ref_scaler = ours_trainer.precision_plugin, ref_trainer.precision_plugin.scaler
    assert plugin.scaler.get_scale() == ref_scaler.get_scale() < 2.0**24, "the runs must have backed off"
    assert plugin.skipped_steps > 0
    assert same_weights(ours, ref)


class CompiledNet(TinyRegressor):
    """The network compiled inside the LightningModule, as users write it (``aot_eager``: dynamo's graphs and
    guards with eager numerics, so weights compare bitwise)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = torch.compile(self.net, backend="aot_eager")


class CompiledManual(ManualRegressor):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = torch.compile(self.net, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model_cls", "trainer_kwargs"),
    [
        (CompiledNet, {"accumulate_grad_batches": 2}),
        (CompiledNet, {"gradient_clip_val": 0.01}),
        (CompiledNet, {"gradient_clip_val": 0.05, "gradient_clip_algorithm": "value"}),
        (CompiledManual, {}),
        (lambda: CompiledNet(optimizer="fused_adam"), {}),
    ],
    ids=["accumulation", "clip-norm", "clip-value", "manual-optimization", "fused-adam"],
)
def test_compiled_combinations_bitwise_equal_lightning_mixed_precision(model_cls, trainer_kwargs):
    torch._dynamo.reset()
    ours, ours_trainer = fit(classic_fp16(), model_cls=model_cls, max_steps=9, **trainer_kwargs)
    ref, ref_trainer = fit(lightning_fp16(), model_cls=model_cls, max_steps=9, **trainer_kwargs)
    assert ours_trainer.precision_plugin.scaler.get_scale() == ref_trainer.precision_plugin.scaler.get_scale()
    assert ours_trainer.precision_plugin.skipped_steps > 0, "the runs must have skipped steps"
    assert same_weights(ours, ref)


def test_clipping_sees_unscaled_gradients():
    # With SGD and clipping to norm 0.01, every applied step moves the weights by exactly lr * 0.01
    # (the raw gradients are far larger). Clipping scaled gradients would move them by ~0.01 / scale.
    steps = []

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.before = torch.cat([p.detach().flatten().clone() for p in module.parameters()])

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            after = torch.cat([p.detach().flatten() for p in module.parameters()])
            steps.append((after - self.before).norm().item())

    model = TinyRegressor(lr=0.1)
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.1)
    plugin = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu"))
    fit(plugin, model=model, gradient_clip_val=0.01, callbacks=[Recorder()])
    applied = [s for s in steps if s > 0]
    assert len(applied) == 6 - plugin.skipped_steps
    assert all(s == pytest.approx(0.1 * 0.01, rel=1e-2) for s in applied), steps


def test_bf16_weights_bitwise_equal_lightning_mixed_precision():
    ours, _ = fit(AdaptiveMP("bf16-mixed"), model_cls=lambda: TinyRegressor(optimizer="adam"))
    ref, _ = fit(MixedPrecision("bf16-mixed", "cpu"), model_cls=lambda: TinyRegressor(optimizer="adam"))
    assert same_weights(ours, ref)


def test_fp32_weights_bitwise_equal_plain_lightning():
    ours, _ = fit(AdaptiveMP("32-true"))
    ref, _ = fit(None)
    assert same_weights(ours, ref)


@pytest.mark.parametrize(
    ("precision", "expected"),
    [
        ("16-mixed", (True, torch.float16)),
        ("bf16-mixed", (True, torch.bfloat16)),
        ("32-true", (False, torch.float32)),
    ],
    ids=["fp16", "bf16", "fp32"],
)
def test_autocast_dtype_in_every_step_type(precision, expected):
    model, t = fit(AdaptiveMP(precision), max_steps=2)
    t.validate(model, loader(), verbose=False)
    t.test(model, loader(), verbose=False)
    t.predict(model, loader())
    assert t.precision == precision, "an explicit precision is honoured on CPU (Lightning would pick bf16)"
    assert model.seen == {kind: expected for kind in ("train", "validate", "test", "predict")}


def test_auto_resolves_from_the_device_at_setup(monkeypatch):
    plugin = AdaptiveMP()
    assert plugin.precision == "auto"
    fit(plugin, max_steps=1)
    assert plugin.precision == ("bf16-mixed" if cpu_has_native_bf16() else "32-true")
    assert plugin.device == "cpu"
    monkeypatch.setattr("lightning_mp.formats.auto.cpu_has_native_bf16", lambda: False)
    plugin = AdaptiveMP()
    fit(plugin, max_steps=1)
    assert plugin.precision == "32-true"
    assert plugin.scaler is None


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"], ids=["fp16", "bf16", "fp32"])
def test_nonfinite_step_is_skipped_and_weights_stay_finite(precision):
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            snapshots.append([p.detach().clone() for p in module.parameters()])

    plugin = plugin_without_natural_overflows(precision)
    model, _ = fit(plugin, model_cls=lambda: TinyRegressor(poison_steps={2}), callbacks=[Snapshot()])
    assert plugin.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The poisoned step (index 2) left the weights exactly as step 1 left them; the others moved them.
    assert all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))


def test_lightning_bf16_writes_nan_into_weights_where_adaptive_mp_does_not():
    # The reference behaviour this guard exists for.
    model, _ = fit(MixedPrecision("bf16-mixed", "cpu"), model_cls=lambda: TinyRegressor(poison_steps={2}))
    assert not all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"], ids=["fp16", "bf16"])
def test_scheduler_does_not_advance_on_a_skipped_step(precision):
    plugin = plugin_without_natural_overflows(precision)
    model, t = fit(plugin, model_cls=lambda: TinyRegressor(poison_steps={2}, scheduler="step"))
    ref_model, ref_t = fit(None, model_cls=lambda: TinyRegressor(poison_steps={2}, scheduler="step"))
    ours_sched, ref_sched = t.lr_scheduler_configs[0].scheduler, ref_t.lr_scheduler_configs[0].scheduler
    assert isinstance(ours_sched, torch.optim.lr_scheduler.StepLR)
    assert ref_sched.last_epoch == 6, "Lightning steps the scheduler after every batch, skipped or not"
    assert ours_sched.last_epoch == 6 - t.precision_plugin.skipped_steps == 5
    assert ours_sched.get_last_lr() == [pytest.approx(0.1 * 0.5**5)]
    assert "_step_was_skipped" not in ours_sched.state_dict(), "the wrapper must not leak into checkpoints"


def test_with_accumulation_a_bad_step_is_one_event_and_the_schedule_waits():
    # Four optimizer steps of two micro-batches each; NaN losses in the micro-batches of global step 1.
    plugin = plugin_without_natural_overflows("bf16-mixed")
    model, t = fit(
        plugin, model_cls=lambda: TinyRegressor(poison_steps={1}, scheduler="step"), data=loader(samples=32),
        accumulate_grad_batches=2, max_steps=4,
    )  # fmt: skip
    assert plugin.optimizer_steps == 4 and plugin.skipped_steps == 1
    assert [e.step for e in plugin.overflow_events] == [2]  # one event for the whole accumulated step
    assert t.lr_scheduler_configs[0].scheduler.last_epoch == 3  # stepped after the three applied steps only


def resumable_plugin():
    # 2**17 overflows the tiny model's first fp16 steps, so the checkpointed scale is not the initial one.
    return AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=2.0**17, growth_interval=2))


def test_checkpoint_restores_scaler_state_before_the_first_new_step(tmp_path):
    plugin = resumable_plugin()
    _, t = fit(plugin, max_steps=-1, max_epochs=1, model_cls=lambda: TinyRegressor(poison_steps={1}))
    ckpt = tmp_path / "run.ckpt"
    t.save_checkpoint(ckpt)
    saved = plugin.state_dict()
    assert saved["scaler"]["scale"] != 2.0**17 and plugin.skipped_steps > 0

    seen = {}

    class FirstStep(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.setdefault("state", trainer.precision_plugin.state_dict())

    torch.manual_seed(0)
    t2 = trainer(plugins=[resumable_plugin()], max_steps=-1, max_epochs=2, callbacks=[FirstStep()])
    t2.fit(TinyRegressor(poison_steps={1}), loader(), ckpt_path=ckpt)
    assert seen["state"] == saved
    assert torch.load(ckpt, weights_only=True)["AdaptiveMP"] == saved


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    def model_cls():
        return TinyRegressor(poison_steps={4})

    straight, straight_t = fit(resumable_plugin(), max_steps=-1, max_epochs=2, model_cls=model_cls)
    _, first_t = fit(resumable_plugin(), max_steps=-1, max_epochs=1, model_cls=model_cls)
    first_t.save_checkpoint(tmp_path / "half.ckpt")
    torch.manual_seed(1)  # a different init: everything must come from the checkpoint
    second = model_cls()
    second_t = trainer(plugins=[resumable_plugin()], max_steps=-1, max_epochs=2)
    second_t.fit(second, loader(), ckpt_path=tmp_path / "half.ckpt")
    plugin = second_t.precision_plugin
    assert plugin.scaler.policy.steps == 6 and plugin.scaler.policy.overflows < 6, "some steps must be clean"
    assert same_weights(straight, second)
    assert plugin.state_dict() == straight_t.precision_plugin.state_dict()


def test_lbfgs_with_fp16_is_refused_like_lightning():
    with pytest.raises(MisconfigurationException, match="LBFGS"):
        fit(AdaptiveMP("16-mixed"), model_cls=lambda: TinyRegressor(optimizer="lbfgs"), max_steps=1)


def test_lbfgs_with_bf16_trains_unguarded_like_lightning():
    model, _ = fit(AdaptiveMP("bf16-mixed"), model_cls=lambda: TinyRegressor(optimizer="lbfgs", lr=0.01), max_steps=2)
    ref, _ = fit(
        MixedPrecision("bf16-mixed", "cpu"),
        model_cls=lambda: TinyRegressor(optimizer="lbfgs", lr=0.01),
        max_steps=2,
    )
    assert same_weights(model, ref)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"], ids=["fp16", "bf16"])
def test_clipping_a_fused_optimizer_is_refused_like_lightning(precision):
    with pytest.raises(RuntimeError, match="fused"):
        fit(
            AdaptiveMP(precision),
            model_cls=lambda: TinyRegressor(optimizer="fused_adam"),
            gradient_clip_val=1.0,
            max_steps=1,
        )


def test_fused_optimizer_without_clipping_skips_overflow_steps():
    plugin = plugin_without_natural_overflows("16-mixed")
    model, _ = fit(plugin, model_cls=lambda: TinyRegressor(optimizer="fused_adam", poison_steps={2}))
    assert plugin.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_precision_and_plugin_together_are_refused_by_lightning():
    with pytest.raises(ValueError, match="precision"):
        L.Trainer(accelerator="cpu", precision="16-mixed", plugins=[AdaptiveMP()])


def test_adaptive_scaler_drops_into_lightnings_own_mixed_precision():
    ours, _ = fit(MixedPrecision("16-mixed", "cpu", scaler=gradscaler_reproduction(**SCALER_SETTINGS)))
    ref, _ = fit(lightning_fp16())
    assert same_weights(ours, ref)


class HooksDuringTraining(L.Callback):
    def __init__(self):
        self.hooked = []
        self.inputs_kept = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tracker = trainer.precision_plugin.core.tracker
        self.hooked.append(tracker.hooked)
        self.inputs_kept.append(len(tracker._batches))


@pytest.mark.parametrize(
    ("kwargs", "optimizer"), [({"guard_nonfinite": False}, "sgd"), ({}, "lbfgs")], ids=["guard-off", "lbfgs"]
)
def test_the_unguarded_path_ends_its_steps_too(kwargs, optimizer):
    """Lightning's own step path (guard off, LBFGS) kept the execution-order hooks on every module for the whole
    run and one batch's observations per step, forever; and it did not count its steps, so the statistics
    sampled every one of them (step 0 % stats_every == 0) at a cost of ~10 ms per step on a small GPT-2."""
    plugin, watch = AdaptiveMP("32-true", stats_every=5, **kwargs), HooksDuringTraining()
    fit(plugin, model_cls=lambda: TinyRegressor(optimizer=optimizer), data=loader(samples=80), max_steps=20,
        callbacks=[watch])  # fmt: skip
    assert watch.hooked[1:] == [False] * 19, "the order is recorded on the first step only"
    assert max(watch.inputs_kept) == 1, "one batch is kept, never more"
    assert plugin.core.tracker._batches == [], "and none after the fit"
    assert plugin.optimizer_steps == 20
    assert plugin.statistics.samples_taken == 4  # steps 5, 10, 15, 20


def test_a_bf16_run_samples_its_statistics_on_the_first_and_every_100th_step_by_default():
    plugin = AdaptiveMP("bf16-mixed")
    fit(plugin, data=loader(samples=404), max_steps=101)
    assert plugin.statistics.samples_taken == 2, "steps 1 and 100"
    short = AdaptiveMP("bf16-mixed")
    fit(short, max_steps=3)
    assert short.statistics.samples_taken == 1 and short.statistics.modules, "a short run's report has figures"
    explicit = AdaptiveMP("bf16-mixed", stats_every=100)
    fit(explicit, max_steps=3)
    assert explicit.statistics.samples_taken == 0, "an explicit cadence is exact"


class BadLosses(TinyRegressor):
    """A NaN loss on steps 3, 4 and 5 (global steps 2 to 4)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in (2, 3, 4) else loss


def test_a_skip_without_a_module_is_told_once_per_kind_with_or_without_the_callbacks():
    x, y = loader(samples=24).dataset.tensors
    x = x.clone()
    x[5] = float("nan")  # in the second batch
    for attach in (True, False):
        plugin = AdaptiveMP("bf16-mixed", attach_callbacks=attach, replay=False)
        with pytest.warns(UserWarning) as caught:
            fit(plugin, model_cls=BadLosses, data=loader_with(x, y), max_steps=6)
        told = [str(w.message) for w in caught if str(w.message).startswith("lightning-mp: step")]
        assert told == [
            "lightning-mp: step 2: the batch: input value nan (input); action: skipped.",
            "lightning-mp: step 3: forward pass: forward value nan (unknown); action: skipped.",
            "lightning-mp: step 4: the loss: loss value nan (loss); action: skipped.",
        ], told  # step 3 is not localized yet (the probe arms); step 5's bad loss is a kind already told


@pytest.mark.parametrize("own_scaler", [False, True], ids=["default-scaler", "users-scaler"])
def test_a_plugin_used_for_a_second_fit_starts_that_fit_afresh(own_scaler):
    def plugin():
        knobs = {"init_scale": 2.0**20, "policy": "dynamic"}  # GradScaler's rule: skips to find its scale
        scaler = AdaptiveLossScaler("cpu", **knobs) if own_scaler else knobs
        return AdaptiveMP("16-mixed", scaler=scaler, attach_callbacks=False)

    reused = plugin()
    fit(reused, max_steps=8)
    assert reused.skipped_steps > 0  # 2^20 overflows at first: there are counts to carry over
    second, _ = fit(reused, seed=1, max_steps=4)
    fresh = plugin()
    reference, _ = fit(fresh, seed=1, max_steps=4)
    assert reused.optimizer_steps == 4
    assert (reused.skipped_steps, reused.overflow_events) == (fresh.skipped_steps, fresh.overflow_events)
    assert reused.scale_history == fresh.scale_history
    assert same_weights(second, reference)


def test_a_plain_gradscaler_carries_its_settings_and_state_and_trains_as_mixed_precision_with_it():
    def gradscaler():
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
        scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**11, "_growth_tracker": 1})  # a used one
        return scaler

    with pytest.warns(UserWarning, match=r"GradScaler\(\.\.\.\)\): its settings and state carry over"):
        plugin = AdaptiveMP("16-mixed", scaler=gradscaler(), attach_callbacks=False)
    ours, _ = fit(plugin, max_steps=6)
    reference = MixedPrecision("16-mixed", "cpu", scaler=gradscaler())
    theirs, _ = fit(reference, max_steps=6)
    assert plugin.scaler.config.policy == "dynamic" and plugin.scaler.config.hysteresis == 1
    assert same_weights(ours, theirs)
    assert plugin.scaler.get_scale() == reference.scaler.get_scale() == 2.0**14  # 2^11, grown on steps 1, 3, 5


def test_an_event_records_the_scale_its_step_ran_at_not_the_one_after_the_back_off():
    plugin = AdaptiveMP("16-mixed", scaler={"init_scale": 2.0**20, "policy": "dynamic"}, attach_callbacks=False)
    fit(plugin, max_steps=2)
    first = plugin.overflow_events[0]
    assert first.scale == 2.0**20 and first.scaler_action.value == "backed_off"
    assert plugin.scale_history[0] == (1, 2.0**19)

"""bf16-true and 16-true in the Trainer and Fabric: Lightning's numerics without a remedy, the remedies with real
optimizers, checkpoints that resume bitwise, fp32 islands with fp32 weights, and why 16-true scales the loss."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_mp import AdaptiveMP
from lightning_mp.errors import ConfigError
from lightning_mp.fallback.promotion import Reason
from tests.helpers import TinyRegressor, fit, loader, loader_with, same_weights, trainer

pytest.importorskip("torchao")
optimi = pytest.importorskip("optimi")


class AdamWRegressor(TinyRegressor):
    """TinyRegressor with AdamW and a StepLR stepped every optimizer step (a scheduler to follow a replacement)."""

    def __init__(self, lr=1e-2, scale=1.0, **kwargs):
        super().__init__(lr=lr, **kwargs)
        self.scale = scale

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * self.scale

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_bf16_true_without_a_remedy_trains_bit_for_bit_as_lightnings_bf16_true():
    ours, _ = fit(AdaptiveMP("bf16-true", master_weights=None), model_cls=AdamWRegressor)
    torch.manual_seed(0)
    theirs = AdamWRegressor()
    trainer(precision="bf16-true").fit(theirs, loader())
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert same_weights(ours, theirs)


@pytest.mark.parametrize(
    ("remedy", "kind", "extra"),
    [("auto", "AdamW", "kahan_comp"), ("stochastic", "_AdamW", None), ("fp32", "AdamW", None)],
)
def test_a_remedy_keeps_the_users_schedule_and_its_state_resumes_bitwise(tmp_path, remedy, kind, extra):
    plugin = AdaptiveMP("bf16-true", master_weights=remedy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        straight, t = fit(plugin, model_cls=AdamWRegressor, max_steps=-1, max_epochs=2)  # 3 steps an epoch
    optimizer = t.optimizers[0]
    assert type(optimizer).__name__ == kind and plugin.core.weights.remedies == [remedy.replace("auto", "kahan")]
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(1e-2 * 0.5**6)  # the StepLR followed it
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    if extra is not None:
        assert all(extra in state for state in optimizer.state.values())
    if remedy == "fp32":
        assert all(m.dtype == torch.float32 for _, m in plugin.core.weights.masters[id(optimizer)].pairs)

    # Stopped and resumed at an epoch's end (Lightning restarts an interrupted epoch's data from its start).
    first, t1 = fit(
        AdaptiveMP("bf16-true", master_weights=remedy), model_cls=AdamWRegressor, max_steps=-1, max_epochs=1
    )
    t1.save_checkpoint(tmp_path / "half.ckpt")
    torch.manual_seed(123)  # the resumed run must not depend on where the RNG happens to be
    resumed, t2 = fit(
        AdaptiveMP("bf16-true", master_weights=remedy),
        model=AdamWRegressor(),
        ckpt_path=tmp_path / "half.ckpt",
        max_steps=-1,
        max_epochs=2,
    )
    assert same_weights(resumed, straight)
    for a, b in zip(t2.optimizers[0].state.values(), optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in b if isinstance(b[k], torch.Tensor))
    if remedy == "fp32":
        ours = [m for _, m in t2.precision_plugin.core.weights.masters[id(t2.optimizers[0])].pairs]
        theirs = [m for _, m in plugin.core.weights.masters[id(optimizer)].pairs]
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_plain_bf16_weights_are_told_when_updates_round_away_and_a_remedy_keeps_them():
    small = dict(model=AdamWRegressor(lr=1e-5), max_steps=4)
    plugin = AdaptiveMP("bf16-true", master_weights=None, stats_every=1)
    with pytest.warns(UserWarning, match=r"net\.0 \(\d+%\).* lose over 50% of each update to rounding"):
        fit(plugin, **small)
    assert plugin.core.weights.lost.losing and plugin.core.weights.lost.mean() > 0.5
    fixed = AdaptiveMP("bf16-true", master_weights="fp32", stats_every=1)
    fit(fixed, model=AdamWRegressor(lr=1e-5), max_steps=4)
    assert fixed.core.weights.lost.mean() == 0.0 and not fixed.core.weights.lost.losing
    autocast = AdaptiveMP("bf16-mixed", stats_every=1)  # fp32 weights: the measure's zero
    fit(autocast, model=AdamWRegressor(lr=1e-5), max_steps=4)
    assert autocast.core.weights.lost.mean() == 0.0 and len(autocast.core.weights.lost.history) == 1  # first only


class TinyGradients(TinyRegressor):
    """A loss so small that its gradients (~1e-8) are below fp16's smallest subnormal (6e-8)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x).float(), y.float()) * 1e-8


def test_16_true_scales_the_loss_so_gradients_under_fp16s_range_still_train():
    theirs = TinyGradients(lr=1e4)
    start = [p.detach().clone() for p in theirs.parameters()]
    trainer(precision="16-true").fit(theirs, loader())
    assert all(torch.equal(p.float(), s.float().half().float()) for p, s in zip(theirs.parameters(), start))

    reference, _ = fit(model_cls=lambda: TinyGradients(lr=1e4))  # fp32
    plugin = AdaptiveMP("16-true")
    ours, _ = fit(plugin, model_cls=lambda: TinyGradients(lr=1e4))
    assert plugin.scaler is not None and plugin.core.weights.remedy == "fp32"
    gradients = plugin.statistics.summary(plugin.stats_dtype)["net.0"]  # read from the masters, where they moved
    assert gradients["grad_amax"] is not None and gradients["underflow_fraction"] is not None
    for p, r, s in zip(ours.parameters(), reference.parameters(), start):
        moved, wanted = (p.float() - s).abs().sum(), (r - s).abs().sum()
        assert moved > 0.5 * wanted  # it learns what fp32 learns (fp16 rounding apart)
        torch.testing.assert_close(p.float(), r.detach(), rtol=2e-2, atol=2e-2)


def test_fp32_modules_keep_their_exact_fp32_weights_under_bf16_true():
    torch.manual_seed(0)
    model = AdamWRegressor(lr=0.0)  # the weights stay where the conversion put them
    head, body = model.net[2].weight.detach().clone(), model.net[0].weight.detach().clone()
    plugin = AdaptiveMP("bf16-true", fp32_modules=["net.2"], master_weights=None)
    trainer([plugin], max_steps=2).fit(model, loader())
    assert model.net[2].weight.dtype == torch.float32 and torch.equal(model.net[2].weight, head)  # never rounded
    assert model.net[0].weight.dtype == torch.bfloat16 and torch.equal(model.net[0].weight, body.bfloat16())
    assert model.seen["train"][1] == torch.bfloat16  # the island hands bf16 back to the rest of the model


class PromoteAt(L.Callback):
    """Promotes ``net.2`` to fp32 at the end of a given step, as the fallback does on repeated blame, and keeps
    its optimizer state as it was then and as the next ``optimizer.step()`` finds it."""

    def __init__(self, step):
        self.step, self.seen = step, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        optimizer, weight = trainer.optimizers[0], module.net[2].weight
        self.seen["before"] = {k: v.clone() for k, v in optimizer.state[weight].items()}
        trainer.precision_plugin.core.decisions.fallback.promote(module, "net.2", Reason.OVERFLOW, "cpu", self.step)

        def next_step(opt, args, kwargs):
            self.seen.setdefault("at_next_step", {k: v.clone() for k, v in opt.state[weight].items()})

        optimizer.register_step_pre_hook(next_step)


def test_a_module_promoted_mid_run_gets_fp32_weights_and_its_optimizer_state_upcast_exactly():
    watcher = PromoteAt(step=2)
    model = AdamWRegressor()
    plugin = AdaptiveMP("bf16-true", master_weights=None)
    trainer([plugin], max_steps=4, callbacks=[watcher]).fit(model, loader())
    assert model.net[2].weight.dtype == torch.float32 and model.net[0].weight.dtype == torch.bfloat16
    before, upcast = watcher.seen["before"], watcher.seen["at_next_step"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert before[key].dtype == torch.bfloat16 and upcast[key].dtype == torch.float32
        assert torch.equal(upcast[key], before[key].float())  # explicit and exact: no moment lost or rounded
    assert "net.2" in plugin.fp32_modules


def test_fabric_wraps_the_users_optimizer_for_fp32_masters_and_asks_for_the_library_one_otherwise():
    from lightning_mp.fabric import AdaptiveMP as FabricMP

    def run(remedy, make_optimizer):
        fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[FabricMP("bf16-true", master_weights=remedy)])
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        optimizer = make_optimizer(model.parameters())
        model, optimizer = fabric.setup(model, optimizer)
        for x, y in loader():
            optimizer.zero_grad()
            fabric.backward(F.mse_loss(model(x).float(), y))
            optimizer.step()
        return model, fabric

    with pytest.warns(UserWarning, match=r"keeps your AdamW with fp32 master copies .* \(with Fabric\); build the"):
        run("auto", lambda p: torch.optim.AdamW(p, lr=1e-2))  # says what would save the memory
    model, fabric = run("fp32", lambda p: torch.optim.AdamW(p, lr=1e-2))
    plugin = fabric._precision
    assert next(model.parameters()).dtype == torch.bfloat16 and plugin.core.weights.remedy == "fp32"
    with pytest.raises(ConfigError, match=r"cannot replace AdamW \(with Fabric\): build torchao\.optim\._AdamW"):
        run("stochastic", lambda p: torch.optim.AdamW(p, lr=1e-2))
    _, fabric = run("stochastic", lambda p: __import__("torchao").optim._AdamW(p, lr=1e-2))
    assert fabric._precision.core.weights.remedy == "stochastic"
    _, fabric = run("kahan", lambda p: optimi.AdamW(p, lr=1e-2, kahan_sum=False))
    assert fabric._precision.core.weights.optimizers[0].param_groups[0]["kahan_sum"] is True  # turned on


def test_16_true_with_lbfgs_is_refused():
    with pytest.raises(Exception, match="LBFGS"):
        fit(AdaptiveMP("16-true"), model_cls=lambda: TinyRegressor(optimizer="lbfgs"), data=loader_with(
            *loader().dataset.tensors))  # fmt: skip


class MasterGradients(L.Callback):
    """Keeps the fp32 masters' gradients the optimizer is about to apply."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]])


def test_fp32_masters_accumulate_micro_batches_in_fp32():
    """Two micro-batches whose bf16 gradients differ in size: summed in bf16 the small one rounds away."""
    torch.manual_seed(0)
    x, y = loader().dataset.tensors
    scaled = loader_with(torch.cat([x[:4] * 100, x[4:8] * 1e-2]), torch.cat([y[:4] * 100, y[4:8] * 1e-2]))
    seen = MasterGradients()
    model = AdamWRegressor(lr=0.0)
    plugin = AdaptiveMP("bf16-true", master_weights="fp32")
    trainer([plugin], max_steps=1, accumulate_grad_batches=2, callbacks=[seen]).fit(model, scaled)
    # the reference: each micro-batch's bf16 gradients, added in fp32
    reference = AdamWRegressor(lr=0.0)
    reference.load_state_dict(model.state_dict())
    reference.bfloat16()
    parts = []
    for xb, yb in scaled:
        reference.zero_grad()
        (F.mse_loss(reference(xb.bfloat16()).float(), yb.bfloat16().float()) / 2).backward()
        parts.append([p.grad.float() for p in reference.parameters()])
    summed = [a + b for a, b in zip(*parts)]
    assert all(torch.equal(g, s) for g, s in zip(seen.grads[0], summed))
    assert any(not torch.equal((a.bfloat16() + b.bfloat16()).float(), s) for a, b, s in zip(*parts, summed))


@pytest.mark.parametrize("remedy", [None, "fp32"])
def test_a_bad_step_under_bf16_true_is_skipped_without_a_trace_and_attributed(remedy):
    plugin = AdaptiveMP("bf16-true", master_weights=remedy)
    poisoned, _ = fit(plugin, model_cls=lambda: TinyRegressor(poison_steps=(2,)), max_steps=3)
    assert plugin.skipped_steps == 1
    event = plugin.overflow_events[0]
    assert (event.step, event.phase, event.dtype) == (3, "loss", "float32")  # the loss's NaN, after the network
    # skipped means untouched: the same as a run that stops before the poisoned step
    clean, _ = fit(AdaptiveMP("bf16-true", master_weights=remedy), model_cls=TinyRegressor, max_steps=2)
    assert same_weights(poisoned, clean)


class ScheduledRegressor(AdamWRegressor):
    """AdamW under a warm-up then decay (SequentialLR) or a one-cycle schedule that cycles momentum."""

    def __init__(self, schedule, **kwargs):
        super().__init__(**kwargs)
        self.schedule = schedule

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler
        if self.schedule == "sequential":
            warm = sched.LinearLR(optimizer, start_factor=0.1, total_iters=2)
            scheduler = sched.SequentialLR(optimizer, [warm, sched.StepLR(optimizer, 1, 0.5)], milestones=[2])
        else:
            scheduler = sched.OneCycleLR(optimizer, max_lr=self.lr, total_steps=10)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_a_replaced_optimizer_is_followed_by_every_scheduler_of_a_sequence():
    plugin = AdaptiveMP("bf16-true", master_weights="kahan")
    _, t = fit(plugin, model_cls=lambda: ScheduledRegressor("sequential"), max_steps=6)
    _, reference = fit(None, model_cls=lambda: ScheduledRegressor("sequential"), max_steps=6)  # fp32, torch's own
    assert isinstance(t.optimizers[0], optimi.AdamW)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(reference.optimizers[0].param_groups[0]["lr"])


def test_a_schedule_that_cycles_momentum_keeps_the_users_optimizer():
    plugin = AdaptiveMP("bf16-true")  # auto: optimi would rename betas, which OneCycleLR writes
    _, t = fit(plugin, model_cls=lambda: ScheduledRegressor("one_cycle"), max_steps=4)
    assert type(t.optimizers[0]) is torch.optim.AdamW and plugin.core.weights.remedies == ["fp32"]
    with pytest.raises(ConfigError, match=r"cannot replace AdamW \(OneCycleLR cycles the optimizer's momentum"):
        fit(AdaptiveMP("bf16-true", master_weights="kahan"), model_cls=lambda: ScheduledRegressor("one_cycle"))


def test_lbfgs_under_bf16_true_takes_no_remedy_and_a_remedy_asked_for_is_refused():
    plugin = AdaptiveMP("bf16-true")
    fit(plugin, model_cls=lambda: TinyRegressor(optimizer="lbfgs"), max_steps=2)
    assert plugin.core.weights.remedies == [None]
    with pytest.raises(ConfigError, match="master_weights='fp32'.* is invalid with LBFGS"):
        fit(AdaptiveMP("bf16-true", master_weights="fp32"), model_cls=lambda: TinyRegressor(optimizer="lbfgs"))


def test_fp32_masters_step_the_weights_without_the_guard_too():
    guarded, _ = fit(AdaptiveMP("bf16-true", master_weights="fp32"), model_cls=AdamWRegressor, max_steps=3)
    plugin = AdaptiveMP("bf16-true", master_weights="fp32", guard_nonfinite=False)
    unguarded, _ = fit(plugin, model_cls=AdamWRegressor, max_steps=3)
    assert same_weights(unguarded, guarded)
    torch.manual_seed(0)  # fit's seed: the initial weights
    assert not same_weights(unguarded, AdamWRegressor().bfloat16())  # and they did move


class EyeHead(torch.nn.Module):
    """A head whose forward makes a tensor of the default dtype (a mask, an identity) and multiplies with it."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.linear(x @ torch.eye(x.shape[-1]))


def test_an_fp32_island_makes_its_own_tensors_in_fp32_under_bf16_true():
    torch.manual_seed(0)
    model = AdamWRegressor()
    model.net[2] = EyeHead()
    plugin = AdaptiveMP("bf16-true", fp32_modules=["net.2"], master_weights=None)
    trainer([plugin], max_steps=2).fit(model, loader())  # bf16 eye against fp32 input would raise in mm
    assert model.net[2].linear.weight.dtype == torch.float32 and model.seen["train"][1] == torch.bfloat16


def test_a_run_resumed_after_a_promotion_keeps_the_promoted_modules_exact_fp32_weights(tmp_path):
    def run(max_epochs, ckpt_path=None, promote=True):
        plugin = AdaptiveMP("bf16-true", master_weights=None)
        torch.manual_seed(0)
        model = AdamWRegressor()
        callbacks = [PromoteAt(step=1)] if promote else []
        t = trainer([plugin], max_steps=-1, max_epochs=max_epochs, callbacks=callbacks)
        t.fit(model, loader(), ckpt_path=ckpt_path)
        return model, t

    straight, _ = run(2)
    half, t = run(1)
    t.save_checkpoint(tmp_path / "promoted.ckpt")
    resumed, t2 = run(2, tmp_path / "promoted.ckpt", promote=False)  # the checkpoint re-applies the promotion
    assert resumed.net[2].weight.dtype == torch.float32 and "net.2" in t2.precision_plugin.fp32_modules
    assert same_weights(resumed, straight)


def test_init_module_creates_low_precision_weights_in_their_dtype():
    t = trainer([AdaptiveMP("bf16-true")])
    with t.init_module():
        layer = torch.nn.Linear(2, 2)
    assert layer.weight.dtype == torch.bfloat16 and torch.get_default_dtype() == torch.float32
    with trainer([AdaptiveMP("bf16-mixed")]).init_module():
        assert torch.nn.Linear(2, 2).weight.dtype == torch.float32  # autocast keeps fp32 weights


class WarmFromZero(AdamWRegressor):
    """Hugging Face's schedules: the learning rate warms up from 0 (the first step moves nothing)."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(step / 3, 1.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_a_warm_up_from_zero_is_measured_on_the_next_step_and_checked_at_its_peak():
    plugin = AdaptiveMP("bf16-true", master_weights=None)  # samples every 100th step: only the first here
    with pytest.warns(UserWarning, match=r"initial_lr \(the schedule's peak; it warms up from 0\)=1e-05"):
        fit(plugin, model_cls=lambda: WarmFromZero(lr=1e-5), max_steps=4)
    assert [step for step, _ in plugin.core.weights.lost.history] == [2]  # step 1 moved nothing: measured step 2
    assert plugin.core.weights.lost.mean() > 0.5


class TwoOptimizers(TinyRegressor):
    """Manual optimization stepping two networks' optimizers in one batch (a GAN's shape)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.other = torch.nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        x, y = batch
        for opt, loss in (
            (first, F.mse_loss(self(x).float(), y.float())),
            (second, self.other(x).float().pow(2).mean()),
        ):
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=1e-5), torch.optim.AdamW(self.other.parameters(), lr=1e-5)


def test_every_optimizer_of_a_sampled_batch_is_measured_and_counted():
    plugin = AdaptiveMP("bf16-true", master_weights=None)
    fit(plugin, model_cls=TwoOptimizers, max_steps=2)
    assert {"net.0", "net.2", "other"} <= set(plugin.core.weights.lost.summary())
    memory = plugin.core.weights.memory
    assert memory["share_of_fp32"] == pytest.approx(0.5)  # bf16 weights, gradients and both AdamWs' moments
    assert memory["optimizer_state"] == 2 * memory["weights"]


def test_fabric_measures_a_step_whose_gradients_were_clipped_first():
    from lightning_mp.fabric import AdaptiveMP as FabricMP

    plugin = FabricMP("bf16-true", master_weights="fp32")
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    for x, y in loader():
        optimizer.zero_grad()
        fabric.backward(F.mse_loss(model(x).float(), y))
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
    assert plugin.core.weights.lost.samples == 1 and plugin.core.weights.lost.mean() == 0.0


def test_master_weights_is_refused_where_the_weights_are_fp32():
    with pytest.raises(ConfigError, match=r"master_weights='fp32'\) is invalid: precision='bf16-mixed' keeps fp32"):
        AdaptiveMP("bf16-mixed", master_weights="fp32")

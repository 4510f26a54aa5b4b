"""Attribution and fp32 fallback inside a real Trainer (CPU fp16 and bf16)."""

import lightning as L
import pytest
import torch
from torch import nn

import lightning_mp
from lightning_mp import AdaptiveLossScaler, AdaptiveMP, LossScaleFloorError, ScaleAction
from lightning_mp.fallback.escalation import Rung
from lightning_mp.fallback.islands import is_fp32_island, island_scope
from tests.helpers import (
    ExplodingBackward,
    LSTMRegressor,
    NaiveLogSumExp,
    TinyRegressor,
    TroubleNet,
    fit,
    line_of,
    loader,
    loader_with,
    same_weights,
    scaled_loader,
    trainer,
)


def fp16(init_scale=256.0, **kwargs):
    # 256 keeps the tiny models' backward clean, so every overflow below is the one under test. Overflows are
    # skipped, not rescued, so that each one is an event (rescue has its own tests, test_rescue.py).
    kwargs.setdefault("rescue", False)
    return AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=init_scale), **kwargs)


def lse_net():
    return TroubleNet(NaiveLogSumExp(), lr=1e-4)


def test_forward_overflow_is_named_promoted_and_training_continues():
    plugin = fp16(init_scale=16.0)  # low enough that the backward never overflows here
    model, _ = fit(plugin, model_cls=lse_net, data=scaled_loader(1.5), max_steps=9)
    forward = [e for e in plugin.overflow_events if e.phase == "forward"]
    assert [e.module for e in forward] == ["middle", "middle"], "named from the first one on (replayed)"
    assert (forward[0].op, forward[0].kind, forward[0].dtype) == ("aten::exp", "inf", "float16")
    assert forward[0].source == f"helpers.py:{line_of(NaiveLogSumExp.forward, 'torch.exp')}"
    assert forward[-1].promoted == "middle", "promote_after=2: the second event promotes"
    assert "middle" in plugin.fp32_modules and is_fp32_island(model.middle)
    assert plugin.skipped_steps == 2, "after the promotion the remaining steps train"
    assert plugin.scaler.get_scale() == 16.0, "a forward overflow must not drag the scale down"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_forward_overflow_module_is_finite_in_fp32():
    # The premise of the test above: the same data and model train cleanly in fp32.
    plugin = AdaptiveMP("32-true")
    fit(plugin, model_cls=lse_net, data=scaled_loader(1.5), max_steps=9)
    assert plugin.skipped_steps == 0


def test_exploding_backward_is_named_as_backward_and_handled_by_the_scale():
    plugin = fp16()
    fit(plugin, model_cls=lambda: TroubleNet(ExplodingBackward(1e4)), max_steps=5)
    backward = [e for e in plugin.overflow_events if e.phase == "backward"]
    assert backward and {e.module for e in backward} == {"middle"}
    assert all(e.scaler_action is ScaleAction.BACKED_OFF for e in backward)
    assert plugin.scaler.get_scale() < 256.0
    assert "middle" not in plugin.fp32_modules, "the scale could still fix it: no promotion"


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"], ids=["fp16", "bf16"])
def test_nan_in_a_batch_is_an_input_event_and_blames_no_layer(precision):
    x, y = loader().dataset.tensors
    x = x.clone()
    x[4:8, 0] = float("nan")  # the second batch, every epoch
    plugin = fp16() if precision == "16-mixed" else AdaptiveMP(precision)
    fit(plugin, data=loader_with(x, y), max_steps=6)
    assert [(e.step, e.phase, e.module, e.kind) for e in plugin.overflow_events] == [
        (2, "input", None, "nan"),
        (5, "input", None, "nan"),
    ]
    assert plugin.fp32_modules == []
    if plugin.scaler is not None:
        assert plugin.scaler.get_scale() == 256.0


def test_the_batch_observed_is_the_one_training_step_gets_after_the_transfer_hooks():
    """A NaN written by ``on_after_batch_transfer`` is in the input the model sees: an input event, not a layer's."""

    class PoisonedOnTransfer(TinyRegressor):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            x, y = batch
            return (x * float("nan"), y) if self.trainer.global_step == 2 else (x, y)

    plugin = AdaptiveMP("bf16-mixed")
    fit(plugin, model_cls=PoisonedOnTransfer, max_steps=5)
    assert [(e.step, e.phase, e.module) for e in plugin.overflow_events] == [(3, "input", None)]


def test_nan_loss_is_a_loss_event_and_blames_no_layer():
    plugin = fp16()
    fit(plugin, model_cls=lambda: TinyRegressor(poison_steps={1, 2, 3}), max_steps=6)
    phases = [(e.phase, e.module, e.op) for e in plugin.overflow_events]
    assert phases == [("loss", None, "aten::mul")] * 3, "the loss line of training_step, from the first one on"
    assert plugin.fp32_modules == []
    assert plugin.scaler.get_scale() == 256.0


def test_lstm_trains_under_cpu_fp16_via_fallback(recwarn):
    plugin = AdaptiveMP("16-mixed")
    model, _ = fit(plugin, model_cls=LSTMRegressor, max_steps=4)
    assert plugin.fp32_modules == ["lstm"]
    assert plugin.promotions[0].reason == "kernel error"
    assert "primitive descriptor" in plugin.promotions[0].detail
    assert model.seen["train"] == (True, torch.float16), "the rest of the model stays in fp16"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any("lstm runs in fp32" in str(w.message) for w in recwarn)


def test_lstm_kernel_error_is_raised_without_auto_fallback():
    with pytest.raises(RuntimeError, match="primitive descriptor"):
        fit(AdaptiveMP("16-mixed", auto_fallback=False), model_cls=LSTMRegressor, max_steps=1)


def test_lstm_in_sanity_validation_is_promoted_and_the_batch_skipped():
    plugin = AdaptiveMP("16-mixed")
    torch.manual_seed(0)
    t = trainer(plugins=[plugin], max_steps=2, num_sanity_val_steps=1, limit_val_batches=1)
    model = LSTMRegressor()
    t.fit(model, loader(), loader())
    assert plugin.fp32_modules == ["lstm"]


def test_static_fallback_runs_fp32_in_forward_and_backward():
    seen = {}

    def record(name):
        def forward_hook(module, args, output):
            seen[f"{name}.in"], seen[f"{name}.out"] = args[0].dtype, output.dtype

        def backward_hook(module, grad_input, grad_output):
            seen[f"{name}.grad"] = grad_output[0].dtype

        return forward_hook, backward_hook

    class Hooked(TinyRegressor):
        def __init__(self):
            super().__init__()
            for name, idx in (("first", 0), ("last", 2)):
                forward_hook, backward_hook = record(name)
                self.net[idx].register_forward_hook(forward_hook)
                self.net[idx].register_full_backward_hook(backward_hook)

    plugin = fp16(fp32_modules=["net.0"])
    fit(plugin, model_cls=Hooked, max_steps=2)
    assert plugin.fp32_modules == ["net.0"] and plugin.promotions[0].reason == "static"
    assert seen["first.out"] == seen["first.grad"] == torch.float32
    assert seen["last.out"] == seen["last.grad"] == torch.float16


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"], ids=["fp16", "bf16"])
def test_every_layer_in_fallback_equals_an_fp32_run_bitwise(precision):
    plugin = AdaptiveMP(precision, fp32_modules=[lambda module, fqn: True])
    ours, _ = fit(plugin, max_steps=6)
    ref, _ = fit(None, max_steps=6)
    assert plugin.fp32_modules == ["net", "net.0", "net.1", "net.2"]
    assert same_weights(ours, ref)


def test_fp16_defaults_put_layernorm_in_fp32_and_leave_other_models_alone():
    class WithNorm(TinyRegressor):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))

    plugin = fp16()
    fit(plugin, model_cls=WithNorm, max_steps=1)
    assert plugin.fp32_modules == ["net.1"] and plugin.promotions[0].reason == "default"
    plugin = fp16(fp32_defaults=False)
    fit(plugin, model_cls=WithNorm, max_steps=1)
    assert plugin.fp32_modules == []
    plugin = AdaptiveMP("bf16-mixed")
    fit(plugin, model_cls=WithNorm, max_steps=1)
    assert plugin.fp32_modules == []


def test_resume_reapplies_promotions_before_the_first_step(tmp_path):
    plugin = fp16()
    _, t = fit(plugin, model_cls=lse_net, data=scaled_loader(1.5), max_steps=-1, max_epochs=2)
    assert "middle" in plugin.fp32_modules
    t.save_checkpoint(tmp_path / "promoted.ckpt")

    seen = {}

    class FirstStep(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.setdefault("islands", [n for n, m in module.named_modules() if is_fp32_island(m)])

    resumed = fp16()
    torch.manual_seed(0)
    t2 = trainer(plugins=[resumed], max_steps=-1, max_epochs=4, callbacks=[FirstStep()])
    t2.fit(lse_net(), scaled_loader(1.5), ckpt_path=tmp_path / "promoted.ckpt")
    assert seen["islands"] == ["middle"]
    assert resumed.fp32_modules == ["middle"] and resumed.promotions[0].reason == "overflow"
    assert resumed.overflow_events == plugin.overflow_events, "no new overflow after the resume"


def test_fp32_modules_pattern_that_matches_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\['encoderr\.\*'\] match no module of TinyRegressor.*net\.0"):
        fit(AdaptiveMP("bf16-mixed", fp32_modules=["encoderr.*"]), max_steps=1)


def test_escalation_promotes_when_the_scale_sits_at_its_floor():
    scaler = AdaptiveLossScaler("cpu", init_scale=4.0, min_scale=1.0, floor_patience=2)
    plugin = AdaptiveMP("16-mixed", scaler=scaler, rescue=False)  # the floor rule, not a rescue's diagnosis
    model, _ = fit(plugin, model_cls=lambda: TroubleNet(ExplodingBackward(1e6), lr=1e-9), max_steps=12)
    escalated = [p for p in plugin.promotions if p.reason == "escalation"]
    assert escalated and "floor" in escalated[0].detail
    assert any(
        e.escalation is Rung.PROMOTE and e.escalated_module == escalated[0].module for e in plugin.overflow_events
    )
    assert plugin.overflow_events[-1].step < 12, "after the escalation the run trains again"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_escalation_ladder_switches_fp16_to_bf16_then_stops_with_a_diagnosis(monkeypatch, recwarn):
    monkeypatch.setattr("lightning_mp.formats.auto.cpu_has_native_bf16", lambda: True)
    plugin = fp16(max_consecutive_skips=3)
    with pytest.raises(LossScaleFloorError, match=r"gave up: 3 optimizer steps in a row were skipped.*loss"):
        fit(plugin, model_cls=lambda: TinyRegressor(poison_steps=set(range(20))), max_steps=20)
    assert plugin.precision == "bf16-mixed" and plugin.scaler is None
    assert plugin.skipped_steps == 6, "the scaler's count survives the switch"
    switch = [e for e in plugin.overflow_events if e.escalation is Rung.SWITCH_TO_BF16]
    assert len(switch) == 1 and switch[0].scale is not None, "the event keeps the fp16 scale it happened at"
    assert any("switching from fp16 to bf16" in str(w.message) for w in recwarn)


def test_no_hooks_are_left_after_fit_validate_and_predict():
    plugin = fp16(stats="full", stats_every=1)
    model, t = fit(plugin, model_cls=lse_net, data=scaled_loader(1.5), max_steps=4)  # arms the probe too
    t.validate(model, loader(), verbose=False)
    t.predict(model, loader())
    hooks = [m._forward_hooks or m._forward_pre_hooks for m in model.modules() if not isinstance(m, TroubleNet)]
    assert not any(hooks), "forward hooks left on the model"
    global_hooks = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    assert not global_hooks, "a global module hook left behind"


class OwnArithmetic(nn.Module):
    """A network whose own forward overflows fp16 (exp of a large activation), not any submodule of it."""

    def __init__(self, in_fp32_region: bool = False):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.head = nn.Linear(1, 1)
        self.in_fp32_region = in_fp32_region

    def forward(self, x):
        h = self.inp(x)
        if self.in_fp32_region:
            with lightning_mp.fp32():
                lse = torch.log(torch.exp(8.0 * h.float()).sum(dim=-1, keepdim=True))
        else:
            lse = torch.log(torch.exp(8.0 * h).sum(dim=-1, keepdim=True))
        return self.head(lse)


class Wrapper(TinyRegressor):
    """The shape users write: the whole network is one attribute of the LightningModule."""

    def __init__(self, in_fp32_region: bool = False):
        super().__init__(lr=1e-4)
        self.net = nn.Sequential()
        self.model = OwnArithmetic(in_fp32_region)

    def forward(self, x):
        return self.model(x)


def test_a_network_kept_as_self_model_gets_its_own_code_promoted_and_the_user_is_told_once(recwarn):
    plugin = fp16(init_scale=16.0)
    model, _ = fit(plugin, model_cls=Wrapper, data=scaled_loader(3.0), max_steps=9)
    forward = [e for e in plugin.overflow_events if e.phase == "forward"]
    assert [e.module for e in forward] == ["model", "model"], "promoted at the second blame; finite after"
    assert [(p.module, p.scope) for p in plugin.promotions] == [("model", "own_code")]
    assert island_scope(model.model.inp) is None, "its submodules keep fp16"
    told = [str(w.message) for w in recwarn if "model's own code runs in fp32" in str(w.message)]
    assert len(told) == 1 and "lightning_mp.fp32()" in told[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_same_lines_in_an_fp32_region_train_without_a_skipped_step():
    plugin = fp16(init_scale=16.0)
    fit(plugin, model_cls=lambda: Wrapper(in_fp32_region=True), data=scaled_loader(3.0), max_steps=9)
    assert plugin.skipped_steps == 0 and plugin.overflow_events == []


class TwoOptimizers(TinyRegressor):
    """The GAN shape: one forward and one manual_backward, then two optimizers step, generator then critic."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential()
        self.gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.critic = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        return self.critic(self.gen(x))

    def training_step(self, batch, batch_idx):
        opt_gen, opt_critic = self.optimizers()
        x, y = batch
        self.manual_backward(torch.nn.functional.mse_loss(self(x).float(), y))
        opt_gen.step()
        opt_critic.step()
        opt_gen.zero_grad()
        opt_critic.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.gen.parameters(), lr=0.01), torch.optim.SGD(self.critic.parameters(), lr=0.01)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"], ids=["fp16", "bf16"])
def test_one_bad_batch_is_one_event_when_two_optimizers_step_on_it(precision):
    x, y = loader(samples=24).dataset.tensors
    x = x.clone()
    x[4, 0] = x[12, 1] = float("nan")  # batches 1 and 3 (of 4 samples each)
    plugin = fp16() if precision == "16-mixed" else AdaptiveMP("bf16-mixed")
    fit(plugin, model_cls=TwoOptimizers, data=loader_with(x, y), max_epochs=1, max_steps=-1)
    assert [(e.phase, e.module) for e in plugin.overflow_events] == [("input", None), ("input", None)]
    assert plugin.skipped_steps == 4, "both optimizers skip each bad batch"
    assert plugin.fp32_modules == [], "the critic's layers were never blamed"


class CriticFault(TwoOptimizers):
    """The GAN shape with a BatchNorm in the generator and a NaN in the critic's gradient on one batch."""

    def __init__(self, bad_batch: int):
        super().__init__()
        self.gen = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
        self.bad_batch = bad_batch
        self.critic[2].weight.register_hook(self._poison)

    def training_step(self, batch, batch_idx):
        self.batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def _poison(self, grad):
        return grad * float("nan") if self.batch_idx == self.bad_batch else None


def test_a_critic_skip_keeps_the_generator_step_and_its_batchnorm_statistics():
    plugin = AdaptiveMP("bf16-mixed", auto_fallback=False)
    model, _ = fit(plugin, model_cls=lambda: CriticFault(bad_batch=1), max_epochs=1, max_steps=-1)
    assert [(e.phase, e.module) for e in plugin.overflow_events] == [("backward", "critic.2")]
    assert plugin.overflow_events[0].op == "aten::mul" and plugin.overflow_events[0].reproduced
    assert plugin.skipped_steps == 1, "only the critic skipped"
    bn = model.gen[1]
    assert bn.num_batches_tracked.item() == 3 and torch.isfinite(bn.running_mean).all(), "every batch counted"


class Gain(nn.Module):
    """Multiplies by ``gain``: a leaf with no parameters, promotable alone."""

    gain = 1.0

    def forward(self, x):
        return x * self.gain


class AmplifiedRegressor(TinyRegressor):
    """TinyRegressor whose output goes through ``amp``; ``gains`` maps a global step to amp's gain."""

    def __init__(self, gains):
        super().__init__(lr=0.01)
        self.amp = Gain()
        self.gains = gains

    def forward(self, x):
        self.amp.gain = self.gains.get(self.global_step, 1.0)
        return self.amp(self.net(x))


class Weights(L.Callback):
    def __init__(self):
        self.after_step = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after_step.append([p.detach().clone() for p in module.parameters()])


def test_after_a_promotion_a_finite_but_huge_step_is_skipped_as_a_spike():
    """Steps 2 and 3 overflow fp16 in amp: named, then promoted. On step 5 amp's harm is back, finite in fp32 now,
    with a loss hundreds of times the usual: applying it is what the promotion must not lead to."""
    weights = Weights()
    plugin = fp16(init_scale=1.0)
    fit(plugin, model_cls=lambda: AmplifiedRegressor({1: 1e9, 2: 1e9, 4: 300.0}), max_steps=6, callbacks=[weights])
    events = [(e.step, e.phase, e.module, e.kind) for e in plugin.overflow_events]
    assert events == [(2, "forward", "amp", "inf"), (3, "forward", "amp", "inf"), (5, "loss", None, "spike")]
    assert plugin.fp32_modules == ["amp"] and "spike" in plugin.overflow_events[-1].action
    assert all(torch.equal(a, b) for a, b in zip(weights.after_step[3], weights.after_step[4])), "step 5 not applied"
    assert not all(torch.equal(a, b) for a, b in zip(weights.after_step[4], weights.after_step[5])), "step 6 trains"
    assert plugin.skipped_steps == 3


class GeneratorFault(TwoOptimizers):
    """The GAN shape with arithmetic of its own in the generator (``gen.2``) that goes NaN on one batch."""

    def __init__(self, bad_batch: int):
        super().__init__()
        self.gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Gain(), nn.Linear(8, 4))
        self.bad_batch = bad_batch

    def training_step(self, batch, batch_idx):
        self.gen[2].gain = float("nan") if batch_idx == self.bad_batch else 1.0
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"], ids=["fp16", "bf16"])
def test_manual_optimization_replays_the_step_and_gives_one_exact_event(precision):
    plugin = fp16() if precision == "16-mixed" else AdaptiveMP("bf16-mixed")
    model, _ = fit(plugin, model_cls=lambda: GeneratorFault(bad_batch=1), max_epochs=1, max_steps=-1)
    [event] = plugin.overflow_events
    assert (event.phase, event.module, event.op, event.kind, event.reproduced) == (
        "forward",
        "gen.2",
        "aten::mul",
        "nan",
        True,
    )
    assert event.source == f"test_fallback_in_trainer.py:{line_of(Gain.forward, 'x * self.gain')}"
    assert plugin.skipped_steps == 2, "both optimizers skip the bad batch"
    assert model.trainer.global_step == 6, "the replay's opt.step() calls counted nothing (3 batches x 2)"
    assert all(torch.isfinite(p).all() for p in model.parameters())


class MaskedAttention(nn.Module):
    """minGPT's attention mask, as its model.py once wrote it: ``masked_fill(mask == 0, -1e10)``, which raises in
    fp16 ("value cannot be converted to type c10::Half without overflow")."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.register_buffer("mask", torch.ones(4, 4).tril())

    def forward(self, x):
        q = self.query(x)
        att = (q @ q.transpose(-2, -1)).masked_fill(self.mask == 0, -1e10)
        return att.softmax(dim=-1) @ q


class MaskedNet(TinyRegressor):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential()
        self.inp = nn.Linear(4, 8)
        self.attn = MaskedAttention()
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.inp(x).unsqueeze(1).expand(-1, 4, -1)
        return self.head(self.attn(h)).mean(dim=1)


def test_a_constant_that_does_not_fit_fp16_promotes_the_module_that_writes_it_and_the_step_is_retried():
    plugin = fp16(init_scale=256.0)
    with pytest.warns(UserWarning, match=r"attn's own code runs in fp32 from now on: its 16-mixed kernel failed"):
        model, _ = fit(plugin, model_cls=MaskedNet, max_steps=3)
    assert [(p.module, p.reason, p.scope) for p in plugin.promotions] == [("attn", "kernel error", "own_code")]
    assert plugin.optimizer_steps == 3 and all(torch.isfinite(p).all() for p in model.parameters())

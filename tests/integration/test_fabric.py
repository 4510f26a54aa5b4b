"""``lightning_mp.fabric.AdaptiveMP`` in a real Fabric loop, against Fabric's own ``MixedPrecision``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision
from torch import nn

from lightning_mp import AdaptiveLossScaler
from lightning_mp import AdaptiveMP as TrainerAdaptiveMP
from lightning_mp.fabric import AdaptiveMP
from tests.helpers import NaiveLogSumExp, gradscaler_reproduction


def batches(steps: int, scale: float = 1.0, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        out.append((x * scale, x.sum(dim=1, keepdim=True)))
    return out


class Net(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear: buffers that a skipped step must put back."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.inp(x))))


class LogSumExpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.middle = NaiveLogSumExp()
        self.head = nn.Linear(1, 1)

    def forward(self, x):
        return self.head(self.middle(self.inp(x)))


class LSTMNet(nn.Module):
    """An LSTM fed fp32 (Fabric casts the input to fp16; this forward casts it back): its CPU fp16 autocast
    kernel does not exist for fp32 input (oneDNN raises)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        out, _ = self.lstm(x.float().unsqueeze(1).expand(-1, 3, -1))
        return self.head(out[:, -1])


def run(plugin, data, net_cls=Net, accumulate=1, poison=(), clip=None, seed=0, error_if_nonfinite=False):
    """The Fabric loop a user writes; returns (module, optimizer, fabric). ``poison``: micro-batch indices whose
    loss is NaN."""
    torch.manual_seed(seed)
    net = net_cls()
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(net, optimizer)
    for i, (x, y) in enumerate(data):
        loss = F.mse_loss(model(x), y)
        if i in poison:
            loss = loss * float("nan")
        fabric.backward(loss / accumulate)
        if (i + 1) % accumulate == 0:
            if clip is not None:
                fabric.clip_gradients(model, optimizer, max_norm=clip, error_if_nonfinite=error_if_nonfinite)
            optimizer.step()
            optimizer.zero_grad()
    return net, optimizer, fabric


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bf16_matches_fabric_mixed_precision_bit_for_bit():
    data = batches(6)
    ours, _, _ = run(AdaptiveMP("bf16-mixed"), data)
    theirs, _, _ = run(MixedPrecision("bf16-mixed", "cpu"), data)
    assert same_state(ours, theirs)  # weights and BatchNorm buffers
    plain, _, _ = run(AdaptiveMP("32-true"), data)
    assert not same_state(ours, plain)  # bf16 did run: the comparison can fail


def test_fp16_with_gradscaler_settings_matches_fabric_mixed_precision_and_its_scale():
    data = batches(6)
    knobs = dict(init_scale=2.0**10, growth_interval=2)
    scaler = gradscaler_reproduction(**knobs)
    amp = AdaptiveMP("16-mixed", scaler=scaler, fp32_defaults=False)
    ours, _, _ = run(amp, data, clip=1.0)
    reference = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", **knobs))
    theirs, _, _ = run(reference, data, clip=1.0)
    assert same_state(ours, theirs)
    assert amp.scaler.get_scale() == reference.scaler.get_scale() == 2.0**13  # grew three times
    assert [s for _, s in amp.scale_history] == [2.0**10, 2.0**11, 2.0**11, 2.0**12, 2.0**12, 2.0**13]


def test_a_bad_batch_is_skipped_leaving_weights_optimizer_and_batchnorm_as_without_it():
    data = batches(5)
    amp = AdaptiveMP("bf16-mixed")
    ours, optimizer, _ = run(amp, data, poison={2})
    without, reference_optimizer, _ = run(MixedPrecision("bf16-mixed", "cpu"), data[:2] + data[3:])
    assert same_state(ours, without)  # the bad batch's BatchNorm update was put back, no step taken
    assert optimizer.state_dict()["state"][0]["step"] == reference_optimizer.state_dict()["state"][0]["step"] == 4
    assert amp.skipped_steps == 1 and amp.optimizer_steps == 5
    (event,) = amp.overflow_events
    # Without a replay (Fabric has no training_step to run again) the first bad loss is not localized yet:
    # the forward probe is armed for the next steps.
    assert (event.step, event.phase, event.module, event.kind) == (3, "forward", None, "nan")
    assert amp.step_was_skipped(optimizer) is False  # the last step (5) was clean


def test_the_armed_probe_tells_a_bad_loss_from_a_forward_overflow_on_the_next_bad_step():
    amp = AdaptiveMP("bf16-mixed")
    run(amp, batches(5), poison={1, 3})
    assert [(e.step, e.phase) for e in amp.overflow_events] == [(2, "forward"), (4, "loss")]


def test_a_bad_micro_batch_skips_the_whole_accumulated_step():
    data = batches(8)
    amp = AdaptiveMP("bf16-mixed")
    ours, _, _ = run(amp, data, accumulate=2, poison={3})  # the second micro-batch of step 2
    assert amp.optimizer_steps == 4 and amp.skipped_steps == 1
    assert amp.overflow_events[0].step == 2
    clean = AdaptiveMP("bf16-mixed")
    run(clean, data, accumulate=2)
    reference, _, _ = run(MixedPrecision("bf16-mixed", "cpu"), data, accumulate=2)
    assert clean.optimizer_steps == 4 and clean.skipped_steps == 0
    assert same_state(run(AdaptiveMP("bf16-mixed"), data, accumulate=2)[0], reference)
    assert not same_state(ours, reference)


def test_a_forward_overflow_is_named_on_the_module_and_skipped():
    data = batches(4, scale=40.0)  # exp(8 * x) overflows fp16 in `middle`
    amp = AdaptiveMP("16-mixed", auto_fallback=False)
    run(amp, data, net_cls=LogSumExpNet)
    assert amp.skipped_steps >= 1
    named = [e for e in amp.overflow_events if e.module == "middle"]
    assert named and named[0].phase == "forward"


def test_a_failing_fp16_kernel_promotes_its_module_and_the_forward_runs_again():
    amp = AdaptiveMP("16-mixed")
    net, _, _ = run(amp, batches(3), net_cls=LSTMNet)
    reasons = {p.module: p.reason for p in amp.promotions}
    assert reasons.get("lstm") == "kernel error"
    assert amp.optimizer_steps == 3 and all(torch.isfinite(p).all() for p in net.parameters())


def test_state_round_trips_through_fabric_save_and_load(tmp_path):
    amp = AdaptiveMP("16-mixed")
    run(amp, batches(5, scale=40.0), net_cls=LogSumExpNet)  # `middle` overflows until it is promoted
    assert "middle" in amp.fp32_modules
    path = tmp_path / "ckpt.pt"
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[amp])
    fabric.save(path, {"amp": amp})
    saved = amp.state_dict()

    fresh = AdaptiveMP("16-mixed")
    net = LogSumExpNet()
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[fresh])
    model, _ = fabric.setup(net, torch.optim.AdamW(net.parameters()))
    x = batches(1, scale=3.0)[0][0]  # exp(8 * x) past fp16 range, well inside fp32
    with torch.no_grad():
        assert not torch.isfinite(model(x)).all()  # the new model overflows in fp16 ...
        fabric.load(path, {"amp": fresh})
        assert torch.isfinite(model(x)).all()  # ... until the loaded promotion runs `middle` in fp32
    assert fresh.state_dict() == saved  # scale, counters, events, promotions, scale history
    assert fresh.skipped_steps == amp.skipped_steps >= 2
    assert {p.module: p.reason for p in fresh.promotions}["middle"] == "overflow"  # applied to the new model


def test_metrics_and_report_give_what_the_trainer_callbacks_log_and_write(tmp_path):
    amp = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=2.0**8), stats_every=1)
    run(amp, batches(3))
    metrics = amp.metrics()
    assert metrics["precision/loss_scale"] == amp.scaler.get_scale()
    assert metrics["precision/skipped_steps"] == 0
    assert any(k.startswith("precision/headroom_bits/") for k in metrics)
    paths = amp.report(tmp_path)
    report = json.loads(paths["json"].read_text())
    assert report["run"]["optimizer_steps"] == 3 and len(report["scale_history"]) == 3
    assert report["modules"]["inp"]["activation_headroom_bits"] is not None
    assert paths["png"].exists() and "inp" in paths["markdown"].read_text()


def test_the_trainer_plugin_in_fabric_names_the_class_to_use():
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[TrainerAdaptiveMP("bf16-mixed")])
    with pytest.raises(TypeError, match="from lightning_mp.fabric import AdaptiveMP"):
        fabric.setup(Net())


def test_a_second_model_is_refused_with_a_clear_message():
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[AdaptiveMP("bf16-mixed")])
    fabric.setup(Net())
    with pytest.raises(ValueError, match="one model per Fabric"):
        fabric.setup(Net())


def test_two_optimizers_on_one_backward_skip_together_as_one_event():
    """The GAN shape in Fabric: one forward and backward, then two optimizers over disjoint parameters."""
    data = batches(4)

    def loop(plugin, poison=()):
        torch.manual_seed(0)
        net = Net()
        fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
        first = torch.optim.AdamW([*net.inp.parameters(), *net.norm.parameters()], lr=1e-2)
        second = torch.optim.AdamW(net.head.parameters(), lr=1e-2)
        model, first, second = fabric.setup(net, first, second)
        for i, (x, y) in enumerate(data):
            loss = F.mse_loss(model(x), y)
            fabric.backward(loss * float("nan") if i in poison else loss)
            first.step()
            second.step()
            first.zero_grad()
            second.zero_grad()
        return net

    amp = AdaptiveMP("bf16-mixed")
    ours = loop(amp, poison={1})
    data = data[:1] + data[2:]  # the reference never sees the bad batch
    reference = loop(MixedPrecision("bf16-mixed", "cpu"))
    assert same_state(ours, reference)
    assert amp.skipped_steps == 2 and len(amp.overflow_events) == 1  # both optimizers skipped, one event


def test_a_skip_without_a_module_is_told_once_per_kind():
    amp = AdaptiveMP("bf16-mixed")
    with pytest.warns(UserWarning) as caught:
        run(amp, batches(7), poison={1, 3, 5})  # unlocalized forward, then bad losses twice
    told = [str(w.message) for w in caught if str(w.message).startswith("lightning-mp: step")]
    assert told == [
        "lightning-mp: step 2: forward pass: forward value nan (unknown); action: skipped.",
        "lightning-mp: step 4: the loss: loss value nan (loss); action: skipped.",
    ]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"], ids=["bf16", "fp16"])
def test_clipping_as_litgpt_writes_it_lets_a_bad_step_be_skipped(precision):
    # fabric.clip_gradients' default error_if_nonfinite=True raised before the guard could skip the step.
    def plugin():
        if precision == "bf16-mixed":
            return AdaptiveMP(precision)
        return AdaptiveMP(precision, scaler=AdaptiveLossScaler("cpu", init_scale=2.0**10, policy="dynamic"))

    data = batches(5)
    amp = plugin()
    ours, _, _ = run(amp, data, poison={2}, clip=1.0, error_if_nonfinite=True)
    assert amp.skipped_steps == 1 and amp.optimizer_steps == 5
    without, _, _ = run(plugin(), data[:2] + data[3:], clip=1.0, error_if_nonfinite=True)
    assert same_state(ours, without)


def test_guard_nonfinite_false_lets_a_bad_bf16_step_through_as_fabric_would():
    amp = AdaptiveMP("bf16-mixed", guard_nonfinite=False)
    ours, _, _ = run(amp, batches(4), poison={2})
    theirs, _, _ = run(MixedPrecision("bf16-mixed", "cpu"), batches(4), poison={2})
    assert amp.skipped_steps == 0
    assert not torch.isfinite(ours.inp.weight).all()
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0, equal_nan=True)

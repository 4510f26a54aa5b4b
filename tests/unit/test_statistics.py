"""Headroom, underflow and sampled per-module statistics against direct computation."""

import math

import pytest
import torch

from lightning_mp.diagnosis.statistics import ModuleStatistics, headroom_bits, underflow_fraction
from lightning_mp.reporting.report import headroom_metrics
from tests.helpers import Chain


def test_headroom_bits_against_hand_computed_values():
    assert headroom_bits(1024.0, torch.float16) == pytest.approx(math.log2(65504 / 1024))
    assert headroom_bits(65504.0, torch.float16) == 0.0
    assert headroom_bits(2.0**20, torch.float16) < 0, "already overflowing"
    assert headroom_bits(0.0, torch.float16) == math.inf
    assert headroom_bits(math.inf, torch.float16) == headroom_bits(math.nan, torch.float16) == -math.inf
    assert headroom_bits(1.0, torch.bfloat16) == pytest.approx(math.log2(torch.finfo(torch.bfloat16).max))


def test_underflow_fraction_counts_nonzero_values_below_the_smallest_normal():
    tiny = torch.finfo(torch.float16).tiny  # 6.1e-5
    values = torch.tensor([0.0, 1e-8, -1e-6, tiny / 2, tiny, 1.0, -3.0, 2e-5])
    # non-zero and below tiny: 1e-8, -1e-6, tiny/2, 2e-5 -> 4 of 8
    assert underflow_fraction(values, torch.float16).item() == 0.5
    # a loss scale of 2**16 lifts all of them above tiny
    assert underflow_fraction(values, torch.float16, scale=2.0**16).item() == 0.0
    # the same gradients are fine in bf16 (its smallest normal is fp32's)
    assert underflow_fraction(values, torch.bfloat16).item() == 0.0
    # against the direct definition on random magnitudes spanning the threshold, scaled and not
    wide = torch.randn(10_000).mul(torch.logspace(-12, 2, 10_000)).masked_fill(torch.rand(10_000) < 0.1, 0.0)
    for scale in (1.0, 2.0**10):
        direct = ((wide.abs() * scale > 0) & (wide.abs() * scale < tiny)).float().mean()
        assert underflow_fraction(wide, torch.float16, scale).item() == pytest.approx(direct.item(), abs=1e-4)


@pytest.mark.parametrize("level", ["cheap", "full"])
def test_module_statistics_match_direct_computation(level):
    torch.manual_seed(0)
    m = Chain()
    x = torch.randn(4, 3)
    stats = ModuleStatistics(level)
    stats.start(m)
    with torch.autocast("cpu", dtype=torch.float16):
        out = m(x)
    (out * 100).sum().backward()
    stats.collect(m, scale=1.0, dtype=torch.float16)
    assert not stats.active, "hooks are removed after the sample"
    with torch.autocast("cpu", dtype=torch.float16):
        a = m.a(x)
    assert stats.modules["a"].activation_amax == pytest.approx(a.abs().max().item())
    param_amax = max(p.grad.abs().max().item() for p in m.a.parameters())
    if level == "cheap":
        assert stats.modules["a"].grad_amax == pytest.approx(param_amax)
    else:
        # full also sees the gradient flowing into a's output, 100 * (c.weight @ b.weight) summed over rows
        with torch.autocast("cpu", dtype=torch.float16):
            into_a = torch.autograd.functional.vjp(lambda h: m.c(m.b(h)) * 100, a.detach(), torch.ones(4, 1))[1]
        assert stats.modules["a"].grad_amax == pytest.approx(max(param_amax, into_a.abs().max().item()))
    summary = stats.summary(torch.float16)["a"]
    assert summary["activation_headroom_bits"] == pytest.approx(math.log2(65504 / a.abs().max().item()))
    assert summary["samples"] == 1
    grads = torch.cat([p.grad.flatten() for p in m.a.parameters()])
    assert summary["underflow_fraction"] == pytest.approx(underflow_fraction(grads, torch.float16).item())


class ReturnsItsLoss(torch.nn.Module):
    """A Hugging Face-shaped model: its output holds fp16 logits and an fp32 loss."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        logits = self.head(x)
        return logits, logits.float().pow(2).mean()


def test_each_value_is_judged_against_the_format_it_was_computed_in():
    torch.manual_seed(0)
    model = ReturnsItsLoss()
    stats = ModuleStatistics("full")
    wrapper = torch.nn.Sequential(model)
    stats.start(wrapper, output_grads=True)
    with torch.autocast("cpu", dtype=torch.float16):
        logits, loss = wrapper(torch.randn(4, 3))
    (loss * 2.0**16).backward()  # the loss scale: the fp32 loss's own gradient is 65536, just above fp16's max
    stats.collect(wrapper, scale=2.0**16, dtype=torch.float16)
    summary = stats.summary(torch.float16)["0"]
    assert summary["grad_headroom_bits"] > 0, "the fp32 loss gradient is no risk to fp16"
    into_logits = (2.0**16 * 2 * logits.float() / logits.numel()).abs().max().item()
    assert summary["grad_amax"] == pytest.approx(into_logits, rel=1e-2), "judged on the fp16 logits' gradient"
    assert stats.backward_amax == pytest.approx(into_logits, rel=1e-2), "what the scaler reads: fp16 only"


def test_bf16_statistics_skip_underflow_and_a_nan_reads_as_an_overflow():
    m = Chain()
    stats = ModuleStatistics("cheap")
    stats.start(m)
    m(torch.randn(4, 3)).sum().backward()
    stats.collect(m, scale=1.0, dtype=torch.bfloat16)
    assert stats.summary(torch.bfloat16)["a"]["underflow_fraction"] is None, "bf16 has fp32's smallest normal"
    summary = stats.summary(torch.bfloat16)["a"]
    assert summary["grad_amax"] is None and summary["grad_headroom_bits"] is None, "and fp32's largest value"
    assert summary["activation_amax"] > 0
    metrics = headroom_metrics(stats.summary(torch.bfloat16), top_k=3)
    assert metrics["precision/headroom_bits/a"] == pytest.approx(summary["activation_headroom_bits"])
    stats.start(m)
    m(torch.full((4, 3), float("nan"))).sum().backward()
    stats.collect(m, scale=1.0, dtype=torch.bfloat16)
    stats.start(m)
    m(torch.randn(4, 3)).sum().backward()  # a finite sample after the NaN one does not hide it
    stats.collect(m, scale=1.0, dtype=torch.bfloat16)
    assert stats.summary(torch.bfloat16)["a"]["activation_headroom_bits"] == -math.inf


def test_statistics_off_records_nothing_and_bad_level_is_refused():
    stats = ModuleStatistics("off")
    stats.start(Chain())
    assert not stats.active and stats.modules == {}
    with pytest.raises(ValueError, match=r"level 'most' is invalid: must be one of \('off', 'cheap', 'full'\)"):
        ModuleStatistics("most")


def test_a_container_returning_its_last_submodules_output_gets_that_measurement():
    """The same tensor is measured once; a container that computes its own output (a residual sum) is measured."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())

        def forward(self, x):
            return self.inner(x)  # the ReLU's output tensor, returned as it is

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return x + 10 * self.block(x)

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(Residual()), torch.randn(4, 3)
    stats, calls = ModuleStatistics("cheap"), []
    original = torch.aminmax

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.shape)
        return original(tensor, *args, **kwargs)

    stats.start(model)
    torch.aminmax = counting
    try:
        out = model(x)
    finally:
        torch.aminmax = original
    stats.collect(model, 1.0, torch.float16)
    relu = model[0].block.inner(x).abs().max().item()
    amax = {fqn: s.activation_amax for fqn, s in stats.modules.items()}
    assert amax["0.block.inner.1"] == amax["0.block.inner"] == amax["0.block"] == pytest.approx(relu)
    assert amax["0"] == pytest.approx(out.abs().max().item()) != amax["0.block"]
    assert len(calls) == 3, "the linear, the ReLU and the residual sum: once each"


def test_an_output_written_in_place_after_its_measurement_is_measured_again():
    """torchvision's BasicBlock: `out = bn(...); out += identity; out = relu(out)` with an in-place ReLU returns
    the tensor the BatchNorm produced, changed twice since. Each module gets the amax of what it returned."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)
            self.relu = torch.nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.fc(x)
            out += 100 * x.abs()
            return self.relu(out)

    torch.manual_seed(0)
    model, x = torch.nn.Sequential(Block()), torch.randn(4, 3)
    with torch.no_grad():
        fc = model[0].fc(x).abs().max().item()
        out = model(x).abs().max().item()
    stats = ModuleStatistics("cheap")
    stats.start(model)
    model(x)
    stats.collect(model, 1.0, torch.float16)
    amax = {fqn: s.activation_amax for fqn, s in stats.modules.items()}
    assert amax["0.fc"] == pytest.approx(fc)
    assert amax["0.relu"] == amax["0"] == pytest.approx(out) != pytest.approx(fc)


def test_the_last_output_measured_is_not_kept_alive_by_the_statistics():
    """The reference used to skip a container's second measurement is weak: the logits of a sampled step must not
    outlive the forward because of it."""
    import gc
    import weakref

    model, stats = Chain(), ModuleStatistics("cheap")
    stats.start(model)
    out = model(torch.randn(2, 3))
    alive = weakref.ref(out)
    del out
    gc.collect()
    assert alive() is None
    stats.collect(model, 1.0, torch.float16)

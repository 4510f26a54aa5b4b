"""Attribution helpers on hand-built tensors and modules."""

import math

import pytest
import torch
from torch import nn

from lightning_mp.diagnostics import (
    ExecutionOrder,
    ForwardProbe,
    ModuleStatistics,
    headroom_bits,
    is_kernel_error,
    module_from_traceback,
    nearest_nonfinite_grad,
    nonfinite_code,
    underflow_fraction,
)

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("values", "code"),
    [
        ([torch.ones(3)], 0),
        ([torch.tensor([1.0, INF])], 1),
        ([torch.tensor([1.0, -INF])], 1),
        ([torch.tensor([INF]), torch.tensor([NAN])], 2),
        ({"x": torch.tensor([1.0, NAN], dtype=torch.float16), "label": torch.tensor([3])}, 2),
        ([torch.tensor([1, 2])], 0),
        ("no tensors", 0),
    ],
    ids=["finite", "inf", "minus-inf", "nan-wins", "nested-fp16", "integers-ignored", "none"],
)
def test_nonfinite_code(values, code):
    assert nonfinite_code(values).item() == code


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.c = nn.Linear(3, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_execution_order_is_recorded_once():
    m = Chain()
    order = ExecutionOrder()
    order.record(m)
    m(torch.ones(1, 3))
    m(torch.ones(1, 3))
    order.stop()
    assert order.names == ["a", "b", "c"]
    assert not order.recording


def test_probe_names_the_first_module_whose_output_went_nonfinite():
    m = Chain()
    with torch.no_grad():
        m.a.weight.fill_(1.0)
        m.b.weight.fill_(3e38)  # b overflows fp32; c then only propagates the inf
    probe = ForwardProbe()
    probe.arm(m, steps=1)
    m(torch.ones(1, 3))
    assert probe.first_offender() == ("b", "inf", "float32")
    probe.end_step()
    assert not probe.armed, "disarmed after its steps"
    m(torch.ones(1, 3))
    assert probe.first_offender() is None


def test_probe_does_not_blame_a_module_fed_nonfinite_input():
    m = Chain()
    probe = ForwardProbe()
    probe.arm(m, steps=1)
    m(torch.tensor([[NAN, 1.0, 1.0]]))
    assert probe.first_offender() is None


def test_nearest_nonfinite_grad_walks_back_from_the_loss():
    m = Chain()
    m(torch.ones(2, 3)).sum().backward()
    m.a.weight.grad[0, 0] = NAN
    m.b.bias.grad[0] = INF
    assert nearest_nonfinite_grad(m, ["a", "b", "c"]) == ("b", "inf", "float32")
    m.b.bias.grad.zero_()
    assert nearest_nonfinite_grad(m, ["a", "b", "c"]) == ("a", "nan", "float32")


def test_module_from_traceback_finds_the_innermost_failing_module():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("could not create a primitive descriptor for the LSTM forward propagation")

    m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), Boom()))
    with pytest.raises(RuntimeError) as info:
        m(torch.ones(1, 2))
    assert module_from_traceback(info.value, m) == "1.1"
    assert is_kernel_error(info.value)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RuntimeError("could not create a primitive descriptor for the LSTM"), True),
        (RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'"), True),
        (NotImplementedError("\"foo\" not implemented for 'BFloat16'"), True),
        (RuntimeError("CUDA out of memory"), False),
        (ValueError("could not create a primitive"), False),
    ],
    ids=["onednn", "half", "bf16", "oom", "not-runtime"],
)
def test_is_kernel_error(error, expected):
    assert is_kernel_error(error) is expected


# ------------------------------------------------------------------------------------------ statistics
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


@pytest.mark.parametrize("level", ["cheap", "full"])
def test_module_statistics_match_direct_computation(level):
    torch.manual_seed(0)
    m = Chain()
    x = torch.randn(4, 3)
    stats = ModuleStatistics(level)
    stats.start(m)
    out = m(x)
    (out * 100).sum().backward()
    stats.collect(m, scale=1.0, dtype=torch.float16)
    assert not stats.active, "hooks are removed after the sample"
    a = m.a(x)
    assert stats.stats["a"].activation_amax == pytest.approx(a.abs().max().item())
    param_amax = max(p.grad.abs().max().item() for p in m.a.parameters())
    if level == "cheap":
        assert stats.stats["a"].grad_amax == pytest.approx(param_amax)
    else:
        # full also sees the gradient flowing into a's output, 100 * (c.weight @ b.weight) summed over rows
        into_a = torch.autograd.functional.vjp(lambda h: m.c(m.b(h)) * 100, a.detach(), torch.ones(4, 1))[1]
        assert stats.stats["a"].grad_amax == pytest.approx(max(param_amax, into_a.abs().max().item()))
    summary = stats.summary(torch.float16)["a"]
    assert summary["activation_headroom_bits"] == pytest.approx(math.log2(65504 / a.abs().max().item()))
    assert summary["samples"] == 1


def test_statistics_off_records_nothing_and_bad_level_is_refused():
    stats = ModuleStatistics("off")
    stats.start(Chain())
    assert not stats.active and stats.stats == {}
    with pytest.raises(ValueError, match=r"level 'most' is invalid: must be one of \('off', 'cheap', 'full'\)"):
        ModuleStatistics("most")

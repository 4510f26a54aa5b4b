"""Attribution helpers on hand-built tensors and modules."""

import pytest
import torch
from torch import nn

from lightning_mp.diagnosis.attribution import (
    ExecutionOrder,
    Finding,
    ForwardProbe,
    OverflowTracker,
    is_kernel_error,
    module_from_traceback,
    nearest_nonfinite_grad,
    nonfinite_code,
)
from tests.helpers import Chain

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
    assert probe.first_offender() == Finding("forward", "b", "inf", "float32")
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
    assert nearest_nonfinite_grad(m, ["a", "b", "c"]) == Finding("backward", "b", "inf", "float32")
    m.b.bias.grad.zero_()
    assert nearest_nonfinite_grad(m, ["a", "b", "c"]) == Finding("backward", "a", "nan", "float32")


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


def test_a_bad_input_the_step_popped_from_its_batch_is_still_found():
    """Hugging Face style steps pop entries (`x = batch.pop("x")`): the check reads the batch only on a bad
    step, after the pop, so the tracker keeps its own copy of the batch's top-level container."""
    tracker = OverflowTracker()
    tracker.new_batch()
    batch = {"x": torch.tensor([1.0, NAN]), "y": torch.ones(2)}
    tracker.observe_input(batch)
    batch.pop("x")
    batch["y"] = torch.zeros(2)
    tracker.observe_loss(torch.tensor(1.0))
    assert not tracker.forward_finite()
    assert tracker.attribute(Chain()).phase == "input"

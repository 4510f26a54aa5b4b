"""The replay's operation tracer on its own: which operation a non-finite value is charged to, and which line."""

import sys

import torch
from torch import nn

from lightning_mp.diagnosis.replay import OpTracer
from tests.helpers import Explode, line_of


class Scores(nn.Module):
    def __init__(self, gain=1.0):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gain = gain

    def forward(self, x):
        scores = self.lin(x) * self.gain  # the gain line
        scores = scores.masked_fill(torch.ones(4, 4).triu(1).bool(), float("-inf"))  # the mask line
        return scores.softmax(dim=-1)


class Net(nn.Module):
    def __init__(self, gain=1.0):
        super().__init__()
        self.scores = Scores(gain)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.scores(x))


def trace(model, x, backward=False):
    tracer = OpTracer(model, stop_frame=sys._getframe())
    with tracer:
        out = model(x).sum()
        if backward:
            with tracer.backward_pass():
                out.backward()
    return tracer, out


def test_a_mask_that_softmax_makes_finite_again_is_born_but_never_blamed():
    tracer, out = trace(Net(), torch.randn(4, 4))
    assert torch.isfinite(out), "nothing reaches the output"
    assert [(b.op, b.module, b.kind) for b in tracer.births] == [("aten::masked_fill", "scores", "inf")]


def test_the_overflowing_operation_is_named_not_the_mask_after_it():
    tracer, out = trace(Net(gain=float("inf")), torch.ones(4, 4))
    birth = tracer.origin_of([out], backward=False)
    assert (birth.phase, birth.module, birth.op, birth.kind) == ("forward", "scores", "aten::mul", "inf")
    assert birth.source == f"test_replay.py:{line_of(Scores.forward, 'the gain line')}"


def test_a_constant_is_charged_to_the_operation_that_writes_it_into_data():
    model = nn.Linear(3, 3)

    def poisoned():
        out = model(torch.randn(2, 3))
        fault = torch.zeros_like(out)
        fault[0, 0] = float("nan")  # the write
        return (out + fault).sum()

    tracer = OpTracer(model, stop_frame=sys._getframe())
    with tracer:
        out = poisoned()
    birth = tracer.origin_of([out], backward=False)
    assert (birth.op, birth.constant) == ("aten::copy_", False), "not aten::lift_fresh, which made the constant"
    assert birth.source == f"test_replay.py:{line_of(poisoned, 'the write')}"


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)  # the exp line


class Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.ones((), dtype=torch.float16))

    def forward(self, x):
        return x * self.g


def test_a_backward_birth_names_the_forward_line_it_differentiates_not_where_backward_was_called():
    model = nn.Sequential(Gain(), Exp())  # fp16: exp(10) = 22026 is finite, 4 x 22026 is not

    def user_step(tracer):  # as a manual-optimization training_step calls backward
        loss = model(torch.full((2,), 10.0, dtype=torch.float16)).sum() * 4.0
        with tracer.backward_pass():
            loss.backward()  # the backward call

    tracer = OpTracer(model, stop_frame=sys._getframe())
    with tracer:
        user_step(tracer)
    birth = tracer.origin_of([model[0].g.grad], backward=True)
    assert (birth.phase, birth.module, birth.op, birth.kind) == ("backward", "1", "aten::mul", "inf")
    assert birth.source == f"test_replay.py:{line_of(Exp.forward, 'the exp line')}", "not the backward call"


def test_a_custom_backward_names_its_own_line():
    model = nn.Linear(4, 4)
    tracer = OpTracer(model, stop_frame=sys._getframe())
    with tracer:
        loss = Explode.apply(model(torch.randn(2, 4)), float("inf")).sum()
        with tracer.backward_pass():
            loss.backward()
    birth = tracer.origin_of([model.weight.grad], backward=True)
    assert (birth.op, birth.kind) == ("aten::mul", "inf")
    assert birth.source == f"helpers.py:{line_of(Explode.backward, 'grad * ctx.factor')}"


def test_the_gradient_of_a_cast_is_charged_to_the_module_that_produced_the_input():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    tracer = OpTracer(model, stop_frame=sys._getframe())
    with tracer:
        h = model[0](torch.randn(2, 4)).half()  # fp16 activations, as under autocast
        out = model[1](h.float())  # an fp32 island casts its input up
        with tracer.backward_pass():
            (out.sum() * 1e6).backward()  # the fp32 gradient overflows when cast back to fp16
    birth = tracer.origin_of([model[0].weight.grad], backward=True)
    assert (birth.op, birth.module, birth.dtype) == ("aten::_to_copy", "0", "float16")

"""BufferSnapshot: copy every buffer before a step, put the values back into the same tensors after a bad one."""

import torch
from torch import nn

from lightning_mp.step.buffers import BufferSnapshot


def test_restore_puts_back_every_buffer_in_place():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    before = {name: b.clone() for name, b in model.named_buffers()}
    tensors = {name: b for name, b in model.named_buffers()}
    snapshot = BufferSnapshot()
    snapshot.watch(model)
    snapshot.take()
    model(torch.full((5, 3), float("nan")))  # training-mode forward: running statistics turn NaN
    assert torch.isnan(model[1].running_mean).all() and model[1].num_batches_tracked == 1
    snapshot.restore()
    for name, buffer in model.named_buffers():
        assert buffer is tensors[name], "modules keep their buffer tensors"
        assert torch.equal(buffer, before[name]), name


def test_a_model_without_buffers_is_a_no_op():
    model = nn.Linear(2, 2)
    weights = [p.clone() for p in model.parameters()]
    snapshot = BufferSnapshot()
    snapshot.watch(model)
    snapshot.take()
    snapshot.restore()
    assert snapshot._saved == {} and list(model.buffers()) == []
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters())), "parameters are never touched"


def test_a_restore_before_any_take_puts_back_the_values_at_watch():
    """Never uninitialised memory: the snapshot holds the buffers as they were when it started watching."""
    model = nn.BatchNorm1d(3)
    snapshot = BufferSnapshot()
    snapshot.watch(model)
    model(torch.randn(4, 3))
    snapshot.restore()
    assert torch.equal(model.running_mean, torch.zeros(3)) and model.num_batches_tracked.item() == 0

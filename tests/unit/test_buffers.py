"""BufferSnapshot: copy every buffer before a step, put the values back into the same tensors after a bad one."""

import torch
from torch import nn

from lightning_mp.buffers import BufferSnapshot


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
    snapshot = BufferSnapshot()
    snapshot.watch(nn.Linear(2, 2))
    snapshot.take()
    snapshot.restore()

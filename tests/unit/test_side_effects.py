"""side_effects.py: what a second run of the user's step changed is put back, and only that."""

import torch
from torch import nn

from lightning_mp.step.side_effects import InPlaceParams, ModuleState, RerunState, WriteWatch


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))


def test_module_state_puts_back_flags_modes_bindings_hooks_and_containers():
    net = _net()
    net.outputs = [1]
    net.counter = 0
    state = ModuleState(net.modules())
    net[0].weight.requires_grad_(False)
    net[1].eval()
    net.counter += 1
    net.kept = torch.ones(1)
    net.outputs.append(2)
    handle = net[0].register_forward_hook(lambda *args: None)
    net[1].register_buffer("extra", torch.zeros(1))
    state.restore()
    assert net[0].weight.requires_grad and net[1].training
    assert net.counter == 0 and not hasattr(net, "kept") and net.outputs == [1]
    assert len(net[0]._forward_hooks) == 0 and "extra" not in dict(net[1].named_buffers())
    handle.remove()  # removing an already removed hook is harmless


def test_the_public_form_truncates_appended_lists_and_leaves_private_names_alone():
    net = _net()
    net.outputs = []
    state = ModuleState([net], public=True)
    net.outputs.append(1)
    net.counter = 3
    net._private = "kept"
    state.restore()
    assert net.outputs == [] and not hasattr(net, "counter") and net._private == "kept"


def test_write_watch_copies_only_what_is_written_and_puts_it_back():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    watch = WriteWatch(net.named_parameters())
    with watch, torch.no_grad():
        net[0].weight.mul_(2)  # in place
        net[0].bias.data.add_(1)  # through .data: the same storage
        net[1].weight.data = net[1].weight.data * 3  # rebinding
        torch._foreach_mul_([net[1].bias], 5.0)  # a foreach write
        (net[0].weight * 2).sum()  # reads are not copies
    assert watch.written == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert set(watch.saved) == {"0.weight", "0.bias", "1.bias"}  # the rebound one kept its old storage
    watch.restore()
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_in_place_params_copy_the_learned_ones_and_put_them_back():
    net = _net()
    params = InPlaceParams()
    assert params.learn(["0.weight"]) == ["0.weight"] and params.learn(["0.weight"]) == []
    params.take(net)
    start = net[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1)
        net[1].weight.add_(1)  # not learned: not copied, not put back
    params.restore(net)
    assert torch.equal(net[0].weight, start)
    assert not torch.equal(net[1].weight, _net()[1].weight)


def test_a_rerun_that_writes_an_unlearned_parameter_leaves_it_as_the_first_attempt_did():
    net = _net()
    state = RerunState()
    state.take(net)
    with torch.no_grad():
        net[0].weight.mul_(2)  # the first attempt, not watched
    once = net[0].weight.clone()
    for _ in range(2):  # two re-runs of the same step
        state.before_rerun(net)
        watch = WriteWatch(net.named_parameters())
        with watch, torch.no_grad():
            net[0].weight.mul_(2)
        state.after_rerun(watch)
        assert torch.equal(net[0].weight, once)
    assert state.in_place.names == {"0.weight"}

"""HookSet: one hook per named submodule, registered and removed together."""

import torch

from lightning_mp.hooks import HookSet
from tests.helpers import Chain


def test_hooks_every_submodule_but_the_root_and_removes_them_all():
    model, seen = Chain(), []
    hooks = HookSet()
    hooks.register(model, lambda fqn: lambda module, args, output: seen.append(fqn), "forward")
    model(torch.ones(1, 3))
    assert seen == ["a", "b", "c"] and hooks.active
    hooks.remove()
    model(torch.ones(1, 3))
    assert seen == ["a", "b", "c"] and not hooks.active
    assert all(not m._forward_hooks for m in model.modules())


def test_registering_again_replaces_the_hooks_instead_of_stacking_them():
    model, seen = Chain(), []
    hooks = HookSet()
    for _ in range(2):
        hooks.register(model, lambda fqn: lambda module, args: seen.append(fqn), "forward_pre")
    model(torch.ones(1, 3))
    assert seen == ["a", "b", "c"]
    hooks.remove()

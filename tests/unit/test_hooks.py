"""HookSet: a hook for every named submodule, registered and removed together (per module or dispatched by
one global module hook)."""

import pytest
import torch
from torch import nn

from lightning_mp.diagnosis.hooks import HookSet
from tests.helpers import Chain


def no_hooks_left(model: nn.Module) -> bool:
    """Neither a hook on any module nor a global module hook."""
    module_hooks = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    global_hooks = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    return not module_hooks and not global_hooks


both_ways = pytest.mark.parametrize("dispatch", [False, True], ids=["per-module", "dispatched"])


@both_ways
def test_hooks_every_submodule_but_the_root_and_removes_them_all(dispatch):
    model, seen = Chain(), []
    hooks = HookSet(dispatch)
    hooks.register(model, lambda fqn: lambda module, args, output: seen.append(fqn), "forward")
    model(torch.ones(1, 3))
    assert seen == ["a", "b", "c"] and hooks.active
    hooks.remove()
    model(torch.ones(1, 3))
    assert seen == ["a", "b", "c"] and not hooks.active
    assert no_hooks_left(model)


@both_ways
def test_modules_outside_the_model_are_not_hooked(dispatch):
    model, other, seen = Chain(), Chain(), []
    hooks = HookSet(dispatch)
    hooks.register(model, lambda fqn: lambda module, args, output: seen.append((fqn, module)), "forward")
    other(torch.ones(1, 3))
    assert seen == [], "a module of another model reached a hook"
    model(torch.ones(1, 3))
    assert [m for _, m in seen] == [model.a, model.b, model.c]
    hooks.remove()


def test_hooks_taking_kwargs_hook_every_submodule_and_are_removed():
    model, seen = Chain(), []
    hooks = HookSet(dispatch=True)  # kwargs: one hook per submodule even when dispatching
    hooks.register(model, lambda fqn: lambda module, args, kwargs, output: seen.append(fqn), "forward_with_kwargs")
    model(torch.ones(1, 3))
    assert seen == ["a", "b", "c"]
    hooks.remove()
    assert no_hooks_left(model)


@both_ways
def test_registering_again_replaces_the_hooks_instead_of_stacking_them(dispatch):
    model, seen = Chain(), []
    hooks = HookSet(dispatch)
    for _ in range(2):
        hooks.register(model, lambda fqn: lambda module, args: seen.append(fqn), "forward_pre")
    model(torch.ones(1, 3))
    assert seen == ["a", "b", "c"]
    hooks.remove()


def test_a_dispatching_hook_does_not_keep_the_model_alive():
    import gc
    import weakref

    model, hooks = Chain(), HookSet(dispatch=True)
    hooks.register(model, lambda fqn: lambda module, args, output: None, "forward")
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None, "the global hook table holds the model"
    hooks.remove()


def test_a_dispatching_hook_goes_when_its_model_does():
    """A loop that raised between arming and removing must not leave a global hook for the whole process."""
    import gc

    model, hooks = Chain(), HookSet(dispatch=True)
    hooks.register(model, lambda fqn: lambda module, args, output: None, "forward")
    assert nn.modules.module._global_forward_hooks
    del model
    gc.collect()
    assert not nn.modules.module._global_forward_hooks
    hooks.remove()  # still fine afterwards


def test_a_model_with_a_compiled_submodule_gets_one_hook_per_submodule():
    """torch warns on every call of a compiled submodule while a global hook exists: no global hook then."""
    model, seen = Chain(), []
    model.b = torch.compile(model.b, backend="eager")
    hooks = HookSet(dispatch=True)
    hooks.register(model, lambda fqn: lambda module, args, output: seen.append(fqn), "forward")
    assert not nn.modules.module._global_forward_hooks and model.a._forward_hooks
    hooks.remove()
    assert no_hooks_left(model)


def test_a_dispatching_set_keeps_its_table_until_a_module_registers_a_submodule():
    """Arming again with the same model and make_hook reuses the table (no walk, no hooks built). A submodule
    assigned since (any ``self.x = module`` in the process) makes it walk again at the next arming; one put
    straight into ``_modules``, which no registration hook sees, is found after REWALK_EVERY armings."""
    from lightning_mp.diagnosis.hooks import REWALK_EVERY

    model, seen, built = Chain(), [], []

    def make_hook(fqn):
        built.append(fqn)
        return lambda module, args, output: seen.append(fqn)

    def arm_and_run():
        hooks.register(model, make_hook, "forward")
        seen.clear()
        model(torch.ones(1, 3))

    hooks = HookSet(dispatch=True)
    arm_and_run()
    arm_and_run()
    assert built == ["a", "b", "c"] and seen == ["a", "b", "c"], "the kept table"
    model.b = nn.Sequential(nn.Linear(3, 3))  # replaced during the run
    arm_and_run()
    assert seen == ["a", "b.0", "b", "c"], "walked again at once"
    model._modules["c"] = nn.Sequential(nn.Linear(3, 1))  # behind the registration hooks' back
    armings = 0
    while "c.0" not in seen and armings <= REWALK_EVERY:
        arm_and_run()
        armings += 1
    assert seen == ["a", "b.0", "b", "c.0", "c"] and armings <= REWALK_EVERY
    hooks.register(Chain(), make_hook, "forward")  # another model: its own table
    hooks.remove()

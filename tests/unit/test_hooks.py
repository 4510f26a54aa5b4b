"""HookSet: a hook for every named submodule, registered and removed together (per module or dispatched by
one global module hook)."""

import pytest
import torch
from torch import nn

from lightning_mp.hooks import HookSet
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


def test_a_dispatching_set_keeps_its_table_and_walks_again_to_find_new_submodules():
    """Arming again with the same model and make_hook reuses the table (no walk, no new hooks built); a submodule
    added since is hooked once the set walks the model again, at the latest after REWALK_EVERY registrations."""
    from lightning_mp.hooks import REWALK_EVERY

    model, seen, built = Chain(), [], []

    def make_hook(fqn):
        built.append(fqn)
        return lambda module, args, output: seen.append(fqn)

    hooks = HookSet(dispatch=True)
    hooks.register(model, make_hook, "forward")
    assert built == ["a", "b", "c"]
    model.b = nn.Sequential(nn.Linear(3, 3))  # replaced during the run
    for armed in range(2, REWALK_EVERY + 2):
        hooks.register(model, make_hook, "forward")
        seen.clear()
        model(torch.ones(1, 3))
        if armed <= REWALK_EVERY:
            assert seen == ["a", "c"] and len(built) == 3, f"registration {armed}: the kept table"
    assert seen == ["a", "b.0", "b", "c"], "walked again: the new submodules are hooked"
    hooks.register(Chain(), make_hook, "forward")  # another model: its own table
    assert len(built) == 3 + 4 + 3
    hooks.remove()

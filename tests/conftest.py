import pytest


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Trainers default to writing logs, checkpoints and precision reports into the working directory."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _no_global_module_hooks_left():
    """A global module hook (what HookSet arms) fires for every module in the process: none may outlive a test."""
    from torch.nn.modules import module

    yield
    left = {**module._global_forward_hooks, **module._global_forward_pre_hooks}
    module._global_forward_hooks.clear()
    module._global_forward_pre_hooks.clear()
    assert not left, f"global module hooks left behind: {list(left.values())}"

"""Contract tests for the fence (``lightning_mp/_compat.py``): each private torch or Lightning name we still use
is pinned here, so an upgrade that changes one fails by name instead of deep inside a training run. The last
tests check the package itself: private names stay behind the fence, and modules import without a cycle."""

import ast
import inspect
import re
from pathlib import Path

import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision

import lightning_mp
from lightning_mp import AdaptiveFSDPMP, _compat

PACKAGE = Path(lightning_mp.__file__).parent


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_gradscaler_hooks_we_override_keep_their_signatures():
    expected = {
        "_unscale_grads_": ["self", "optimizer", "inv_scale", "found_inf", "allow_fp16"],
        "_maybe_opt_step": ["self", "optimizer", "optimizer_state", "args", "kwargs"],
        "_lazy_init_scale_growth_tracker": ["self", "dev"],
        "_get_growth_tracker": ["self"],
        "_check_scale_growth_tracker": ["self", "funcname"],
    }
    assert set(expected) == set(_compat.GRADSCALER_HOOKS)
    for name, params in expected.items():
        assert parameters(getattr(torch.amp.GradScaler, name)) == params, name


def test_gradscaler_attributes_we_read_exist():
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    for name in _compat.GRADSCALER_ATTRIBUTES:
        assert hasattr(scaler, name), name
    assert _compat.scaler_device(scaler) == "cpu"


def test_gradscaler_per_optimizer_state_shape():
    state = _compat.refresh_per_optimizer_state()
    assert state == {"stage": _compat.OptState.READY, "found_inf_per_device": {}}
    assert {s.name for s in _compat.OptState} >= {"READY", "UNSCALED", "STEPPED"}


def test_fused_check_and_unscale_kernel_unscales_and_flags():
    grads = [torch.tensor([2.0, 4.0]), torch.tensor([float("inf")])]
    found = torch.zeros(1)
    _compat.foreach_non_finite_check_and_unscale_(grads, found, torch.tensor([0.5]))
    assert grads[0].tolist() == [1.0, 2.0] and found.item() == 1.0


def test_sparse_gradients_expose_uncoalesced_values():
    sparse = torch.sparse_coo_tensor([[0, 0]], [1.0, 2.0], (3,), check_invariants=True)
    assert sparse._values().tolist() == [1.0, 2.0], "GradScaler unscales these in place"


def test_pytree_flattens_nested_outputs():
    a, b = torch.ones(1), torch.zeros(2)
    leaves = _compat.tree_leaves(({"x": a}, [b], None))
    assert [t.shape for t in leaves if isinstance(t, torch.Tensor)] == [a.shape, b.shape]


def test_cpu_capability_query_exists():
    # Without it cpu_has_native_bf16() would silently say no, and "auto" would mean fp32 on bf16 CPUs.
    assert callable(torch._C._cpu._get_cpu_capability)
    assert isinstance(_compat.cpu_capability(), dict) and _compat.cpu_capability()


def test_fabric_casts_floating_point_tensors_only():
    half = _compat.convert_fp_tensor(torch.ones(2), dst_type=torch.float16)
    assert half.dtype == torch.float16
    assert _compat.convert_fp_tensor(torch.ones(2, dtype=torch.long), dst_type=torch.float16).dtype == torch.long


def test_optimizer_unscaling_flag_is_read_the_way_lightning_does():
    param = torch.nn.Parameter(torch.ones(2))
    assert _compat.optimizer_handles_unscaling(torch.optim.Adam([param], fused=True))
    assert not _compat.optimizer_handles_unscaling(torch.optim.SGD([param], lr=0.1))


def test_lightning_after_closure_hook_keeps_its_signature():
    assert parameters(Precision._after_closure) == ["self", "model", "optimizer"]


def test_fsdp_shell_overrides_every_fsdp_precision_method_that_reads_precision_or_scaler():
    """AdaptiveFSDPMP delegates to its inner AdaptiveMP; a method FSDPPrecision adds would bypass it."""
    inherited_on_purpose = {  # these only read _desired_input_dtype, which "32-true" sets to float32
        "convert_module", "clip_grad_by_norm", "tensor_init_context", "module_init_context",
        "convert_output",
    }  # fmt: skip
    defined = {name for name, value in vars(FSDPPrecision).items() if callable(value) or isinstance(value, property)}
    overridden = {name for name in defined if name in vars(AdaptiveFSDPMP)}
    assert defined - inherited_on_purpose == overridden


PRIVATE_IMPORT = re.compile(r"^\s*from (torch|lightning)(\.[\w.]+)? import .*\b_[a-z]\w*", re.MULTILINE)
PRIVATE_ACCESS = re.compile(
    r"\b(torch\._(?!_)\w+|lightning\.\w+\._\w+|_checkpoint_connector|(?<!self)\._trainer\b)"
    # private names of torch's objects read outside the fence: a view's base, the interpreter's frames, a module's
    # submodule table, version counters, autograd's sequence numbers, an operation's schema, Lightning's
    # optimizer counters
    r"|\._base\b|sys\._getframe|\._modules\b|\._version\b|\._sequence_nr|\._schema\b|\._on_(before|after)_step"
    # live Lightning objects changed per instance outside the fence
    r"|\.(training_step|log|log_dict|manual_backward)\s*=[^=]"
)


def test_private_names_are_used_only_behind_the_fence():
    """Outside _compat.py, only scaling/scaler.py and flags.py (GradScaler's own internals) may touch private
    names, and no live Lightning object is changed per instance."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_compat.py" or path.parent.name == "cli":
            continue
        text = path.read_text()
        offenders += [f"{path.name}: {m.group(0).strip()}" for m in PRIVATE_IMPORT.finditer(text)]
        offenders += [f"{path.name}: {m.group(0)}" for m in PRIVATE_ACCESS.finditer(text)]
    assert offenders == []


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:  # module level only: an import inside a function does not make a cycle at import
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_mp"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lightning_mp")}
    return found


def test_the_package_has_no_import_cycle():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = _module_level_imports(path)
    done, visiting = set(), []

    def visit(name: str) -> None:
        assert name not in visiting, " -> ".join([*visiting[visiting.index(name) :], name])
        if name in done or name not in modules:
            return
        visiting.append(name)
        for dependency in modules[name] - {"lightning_mp"}:
            visit(dependency)
        visiting.pop()
        done.add(name)

    for name in sorted(modules):
        if name != "lightning_mp":
            visit(name)
    assert "lightning_mp.plugin" in done and "lightning_mp.reporting.callbacks" in done


def test_lightning_skips_a_callback_hook_that_is_not_callable(tmp_path):
    """``skip_inherited_batch_hooks`` relies on it: a hook shadowed with None is skipped, the others run."""
    import lightning as L

    from tests.helpers import TinyRegressor, loader

    calls = []

    class Counting(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            calls.append(batch_idx)

    callback = Counting()
    _compat.skip_inherited_batch_hooks(callback)
    assert callback.on_train_batch_start is None and callback.on_before_backward is None
    assert callback.on_train_batch_end is not None  # overridden: kept
    trainer = L.Trainer(
        max_steps=3, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(TinyRegressor(), loader())  # would raise "'NoneType' object is not callable" otherwise
    assert calls == [0, 1, 2]


def test_after_closure_calls_what_precision_has_now(monkeypatch):
    """Looked up on the class at every call: a patch (the step_cost benchmark's clock) is honoured, then gone."""
    calls = []
    monkeypatch.setattr(Precision, "_after_closure", lambda *args: calls.append("first"))
    _compat.after_closure(None, None, None)
    monkeypatch.setattr(Precision, "_after_closure", lambda *args: calls.append("second"))
    _compat.after_closure(None, None, None)
    assert calls == ["first", "second"]


def test_operation_schemas_name_the_arguments_an_operation_writes():
    a, b, out = torch.ones(2), torch.ones(2), torch.empty(2)
    assert _compat.written_tensors(torch.ops.aten.add_.Tensor, (a, b), {}) == [a]
    assert _compat.written_tensors(torch.ops.aten.add.out, (a, b), {"out": out}) == [out]
    assert _compat.written_tensors(torch.ops.aten._foreach_mul_.Scalar, ([a, b], 2.0), {}) == [a, b]
    assert _compat.written_tensors(torch.ops.aten.mul.Tensor, (a, b), {}) == []


def test_weight_averaging_asks_should_update_with_a_step_index():
    from lightning.pytorch.callbacks import WeightAveraging

    assert parameters(WeightAveraging.should_update) == ["self", "step_idx", "epoch_idx"]
    assert "self.should_update(step_idx=step_idx)" in inspect.getsource(WeightAveraging.on_train_batch_end)


def test_autograd_sequence_numbers_connect_a_backward_node_to_its_forward_operation():
    seen = {}

    class Watch(_compat.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            node = _compat.current_autograd_node()  # None in the forward
            if node is None and func is torch.ops.aten.mul.Tensor:
                seen["forward"] = _compat.autograd_sequence_nr() - 1  # in the mode its node exists already
            if node is not None and node.name().startswith("MulBackward"):
                seen["backward"] = _compat.node_sequence_nr(node)
            return func(*args, **(kwargs or {}))

    x = torch.ones(2, requires_grad=True)
    with Watch():
        (x * 3).sum().backward()
    assert seen["forward"] == seen["backward"]


def test_weak_identity_keys_and_version_counters_behave_as_the_replay_and_statistics_assume():
    table = _compat.WeakIdKeyDictionary()
    t = torch.zeros(2)
    table[t] = 1
    assert table[t] == 1
    before = _compat.tensor_version(t)
    t.add_(1)
    assert _compat.tensor_version(t) == before + 1
    with torch.inference_mode():
        assert _compat.tensor_version(torch.zeros(1)) is None
    view = t[:1]
    assert _compat.tensor_base(view) is t and _compat.tensor_base(t) is None
    del t, view
    assert len(table) == 0, "the key is held weakly"


def test_the_caller_frame_and_the_compiled_wrapper_check_read_what_they_say():
    import sys

    def inner():
        return _compat.caller_frame(1)

    assert inner() is sys._getframe()
    compiled = torch.compile(torch.nn.Linear(2, 2), backend="eager")
    assert _compat.is_compiled_wrapper(compiled) and not _compat.is_compiled_wrapper(torch.nn.Linear(2, 2))


def test_lightning_optimizer_counts_steps_through_the_methods_the_replay_mutes():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    for name in _compat.LIGHTNING_OPTIMIZER_COUNTERS:
        assert callable(getattr(LightningOptimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)), name))
    assert "self._on_before_step()" in inspect.getsource(LightningOptimizer.step)


def test_per_instance_changes_of_lightning_objects_are_undone():
    class Module:
        def log(self, *args):
            return "logged"

        def manual_backward(self, loss):
            return "real"

    module = Module()
    with _compat.muted_logging(module), _compat.redirected_manual_backward(module, lambda loss: "ours"):
        assert module.log("x", 1) is None and module.manual_backward(1) == "ours"
    assert module.log("x", 1) == "logged" and module.manual_backward(1) == "real"
    assert "log" not in vars(module) and "manual_backward" not in vars(module)

    class Strategy:
        def training_step(self, batch):
            return batch * 2

    strategy, calls = Strategy(), []
    _compat.wrap_training_step(strategy, lambda batch: calls.append(batch))
    assert strategy.training_step(3) == 6 and calls == [3]
    _compat.unwrap_training_step(strategy)
    assert "training_step" not in vars(strategy)


# The Trainer's own modules: the only ones that import lightning.pytorch (the command line imports it lazily).
TRAINER_SIDE = {"plugin.py", "fsdp.py", "schedulers.py", "callbacks.py", "checkpoint.py", "_compat.py"}


def test_only_the_trainer_shell_imports_lightning_pytorch_and_the_core_imports_no_lightning():
    """``import lightning.fabric`` itself runs ``lightning/__init__.py``, which imports ``lightning.pytorch``; so
    what the package can promise is that none of its own Fabric-side or core modules import it."""
    for path in PACKAGE.rglob("*.py"):
        imported = _module_level_imports_of_anything(path)
        if path.name not in TRAINER_SIDE and path.parent.name != "cli":
            assert not any(name.startswith("lightning.pytorch") for name in imported), path
        if path.parent.name in ("step", "scaling", "formats", "diagnosis", "fallback"):
            assert not any(name.split(".")[0] == "lightning" for name in imported), path


def _module_level_imports_of_anything(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found

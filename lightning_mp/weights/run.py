"""``RunWeights``: one run's weights and optimizers, for every format: the remedy applied to each optimizer (low-
precision weights), lost updates measured on sampled steps (every format: ~0 with fp32 weights), the care checks,
the training state's bytes, and what a checkpoint keeps of it all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_mp._grads import distributed
from lightning_mp.errors import ConfigError
from lightning_mp.formats.base import cast_own_tensors
from lightning_mp.weights.care import care_messages
from lightning_mp.weights.lost import LOST_LIMIT, PATIENCE, LostUpdates, module_names
from lightning_mp.weights.memory import training_state_bytes
from lightning_mp.weights.remedies import (
    LOW,
    MasterCopies,
    applies_remedy,
    enable,
    has_replacement,
    replacement,
    resolve_remedy,
)

__all__ = ["RunWeights", "losing_message", "to_low_precision"]


def to_low_precision(model: nn.Module, dtype: torch.dtype, keep: list[str]) -> None:
    """The floating parameters and buffers of ``model`` in ``dtype`` (fp64 left alone), in place: the same
    ``Parameter`` objects, so an optimizer built before keeps them. Modules in ``keep`` and their children are
    left in their dtype (fp32 islands: converting them down and back would round their weights)."""
    kept = tuple(f"{fqn}." for fqn in keep)
    for fqn, module in model.named_modules():
        if fqn not in keep and not (fqn + ".").startswith(kept):
            cast_own_tensors(module, dtype)


class RunWeights:
    """The run's weights and optimizers.

    Args:
        master_weights: the remedy asked for (``"auto"``, ``"fp32"``, ``"kahan"``, ``"stochastic"``, ``None``).
        warn: how to tell the user something.
    """

    def __init__(self, master_weights: Any, warn: Callable[[str], None]) -> None:
        self.requested, self.warn = master_weights, warn
        self.dtype: torch.dtype | None = None  # the weights' dtype (None: fp32 weights, nothing to remedy)
        self.model: nn.Module | None = None
        self.optimizers: list[Optimizer] = []
        self.remedies: list[Any] = []  # per optimizer: the remedy applied (None: none)
        self.masters: dict[int, MasterCopies] = {}  # id(optimizer) -> its fp32 masters
        self.lost = LostUpdates()
        self.memory: dict[str, Any] = {}
        self._promotions_seen = 0  # fp32 promotions whose weights' optimizer state was reconciled
        self._measured: list[Optimizer] = []  # optimizers whose first step the memory figures include
        self._names: Callable[[torch.Tensor], str | None] | None = None
        self._masters_by_param: dict[int, torch.Tensor] | None = None
        self._pending_state: dict[str, Any] | None = None  # loaded before the optimizers were known (Fabric)

    def setup(self, model: nn.Module, weights_dtype: torch.dtype | None) -> None:
        self.model, self.dtype = model, weights_dtype

    @property
    def remedy(self) -> Any:
        """The remedy in force (the first optimizer's; ``None`` without low-precision weights)."""
        return self.remedies[0] if self.remedies else (self.requested if self.dtype is not None else None)

    def knows(self, optimizer: Optimizer) -> bool:
        return any(optimizer is known for known in self.optimizers)

    # ------------------------------------------------------------------------------------- optimizers
    def adopt(self, optimizers: list[Optimizer], keep: str | None) -> list[Optimizer]:
        """Apply the remedy to each optimizer and check its settings; returns the optimizers to use. A torch
        optimizer may be replaced by the library one that applies the remedy unless ``keep`` says why not
        (Fabric hands the optimizer to the user before we see it; a scheduler cycles its momentum)."""
        replaceable = keep is None
        adopted = []
        for index, optimizer in enumerate(optimizers):
            if self.knows(optimizer):
                adopted.append(optimizer)
                continue
            remedy = None
            if self.dtype is not None and any(p.dtype in LOW for g in optimizer.param_groups for p in g["params"]):
                remedy = resolve_remedy(self.requested, optimizer, self.dtype, replaceable)
                if remedy == "stochastic" and self.dtype != torch.bfloat16:
                    raise ConfigError(
                        "AdaptiveMP(master_weights='stochastic') is invalid with precision='16-true': torchao rounds"
                        " stochastically into bf16 only. Use 'fp32' or 'kahan'."
                    )
                if remedy in ("stochastic", "kahan"):
                    if applies_remedy(optimizer, remedy):
                        enable(optimizer, remedy)
                    elif replaceable:
                        fresh = replacement(optimizer, remedy)
                        self.warn(
                            f"AdaptiveMP(master_weights={remedy!r}): {type(optimizer).__name__} is replaced by"
                            f" {type(fresh).__module__.split('.')[0]}'s {type(fresh).__name__} with the same param"
                            " groups and settings (the remedy lives in the optimizer's update)."
                        )
                        optimizer = fresh
                    else:
                        replacement(optimizer, remedy)  # raises the message naming what to build, if impossible
                        raise ConfigError(
                            f"AdaptiveMP(master_weights={remedy!r}) needs the optimizer to apply it and cannot"
                            f" replace {type(optimizer).__name__} ({keep}): build {_library_hint(remedy)} instead, or"
                            " use master_weights='fp32'."
                        )
                elif remedy == "fp32":
                    self.masters[id(optimizer)] = MasterCopies(optimizer)
                    if self.requested == "auto" and not replaceable and has_replacement(optimizer, "kahan"):
                        self.warn(
                            f"AdaptiveMP(master_weights='auto') keeps your {type(optimizer).__name__} with fp32 master"
                            f" copies (more bytes than fp32 training) because it cannot replace it ({keep}); build"
                            f" {_library_hint('kahan')} for Kahan summation at 62% of fp32's bytes."
                        )
            for message in care_messages(optimizer, remedied=remedy is not None, name=f"optimizer {index}"):
                self.warn(message)
            self.optimizers.append(optimizer)
            self.remedies.append(remedy)
            adopted.append(optimizer)
        self._names = self._masters_by_param = None
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
        return adopted

    @property
    def names(self) -> Callable[[torch.Tensor], str | None]:
        if self._names is None:
            stands_for = {k: v for copies in self.masters.values() for k, v in copies.stands_for.items()}
            self._names = module_names(self.model, stands_for)
        return self._names

    # -------------------------------------------------------------------------------------- the step
    def gather(self, optimizer: Optimizer) -> None:
        """Before the gradients are unscaled, guarded or clipped: the model's into the fp32 masters' (if any)."""
        copies = self.masters.get(id(optimizer))
        if copies is not None:
            copies.gather()

    def after_backward(self) -> None:
        """Each backward's gradients into the fp32 masters at once, so that micro-batches accumulate in fp32 (the
        weights' dtype would round each sum). Not under DDP: it reduces the gradients the model holds once per
        optimizer step (its no-sync micro-batches are local), so they must stay there until the step."""
        if self.masters and not distributed():
            for copies in self.masters.values():
                copies.gather()

    def grad_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """A model parameter's gradient where it is now: its fp32 master's once moved there (unscaled with it)."""
        if param.grad is not None:
            return param.grad
        master = self._master_of().get(id(param))
        return master.grad if master is not None else None

    def _master_of(self) -> dict[int, torch.Tensor]:
        if self._masters_by_param is None:
            self._masters_by_param = {id(p): m for copies in self.masters.values() for p, m in copies.pairs}
        return self._masters_by_param

    def around_step(self, optimizer: Optimizer) -> list[Any]:
        """For a step taken without the guard: fp32 masters gather just before ``optimizer.step`` and scatter just
        after it (optimizer step hooks; the caller removes the returned handles)."""
        copies = self.masters.get(id(optimizer))
        if copies is None:
            return []
        pre = optimizer.register_step_pre_hook(lambda *_: copies.gather())
        return [pre, optimizer.register_step_post_hook(lambda *_: copies.scatter())]

    def after_step(self, optimizer: Optimizer) -> None:
        """After the step (taken or skipped): the masters rounded into the model's weights."""
        copies = self.masters.get(id(optimizer))
        if copies is not None:
            copies.scatter()

    def follow_promotions(self, promotions: int) -> None:
        """``reconcile`` once the number of fp32 promotions changed (low-precision weights only)."""
        if self.dtype is not None and promotions != self._promotions_seen:
            self._promotions_seen = promotions
            self.reconcile()

    def reconcile(self) -> None:
        """After a promotion in a low-precision-weights format: a parameter now fp32 gets its optimizer state in
        fp32 too (upcast exactly, explicitly: torch's optimizers would otherwise mix dtypes), a compensation buffer
        is folded into it and dropped (fp32 needs none)."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    state = optimizer.state.get(p)
                    if p.dtype != torch.float32 or not state:
                        continue
                    with torch.no_grad():
                        for key, value in list(state.items()):
                            if key == "kahan_comp" and value is not None:
                                p.add_(value.float())
                                state[key] = None
                            elif isinstance(value, torch.Tensor) and value.dtype in LOW and value.dim() > 0:
                                state[key] = value.float()

    def arm(self, optimizer: Optimizer) -> None:
        """A sampled step: measure the lost updates of ``optimizer``'s coming step."""
        if self.model is not None and self.knows(optimizer):
            self.lost.arm([optimizer], self.names)

    def collect(self, step: int) -> None:
        """After a sampled step: fold its lost updates in; warn once about modules that keep losing them."""
        if not self.lost.armed and not self.lost.pending:
            return
        losing = self.lost.collect(step)
        if losing:
            self.warn(losing_message(losing, self.lost, self.remedy, self.dtype))

    def measure_memory(self, optimizer: Optimizer) -> None:
        """The training state's bytes, after each optimizer's first step (its state exists then; a GAN's second
        optimizer steps after the first): the gradients are the most held at any of those steps."""
        if self.model is None or any(optimizer is seen for seen in self._measured):
            return
        self._measured.append(optimizer)
        masters = [m for copies in self.masters.values() for _, m in copies.pairs]
        figures = training_state_bytes(self.model, self.optimizers, masters)
        gradients = max(figures["gradients"], self.memory.get("gradients", 0))
        figures["total"] += gradients - figures["gradients"]
        figures["fp32_total"] = max(figures["fp32_total"], self.memory.get("fp32_total", 0))
        figures["gradients"] = gradients
        figures["share_of_fp32"] = figures["total"] / figures["fp32_total"] if figures["fp32_total"] else 1.0
        self.memory = figures

    # ------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"lost_updates": self.lost.state_dict(), "memory": dict(self.memory)}
        if self.dtype is not None and self.model is not None:
            # fp32 islands' weights, exactly: a resumed run converts the model before it re-applies the run-time
            # promotions, which would round these once (fp32 -> bf16 -> fp32)
            state["fp32_weights"] = {
                name: p.detach().clone() for name, p in self.model.named_parameters() if p.dtype == torch.float32
            }
        masters = {i: self.masters[id(o)].state_dict() for i, o in enumerate(self.optimizers) if id(o) in self.masters}
        if masters:
            state["master_weights"] = masters
        if "stochastic" in self.remedies:  # the rounding's random draws continue where they were
            state["rng"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lost.load_state_dict(state.get("lost_updates", {}))
        if self.model is not None and state.get("fp32_weights"):
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, saved in state["fp32_weights"].items():
                    param = params.get(name)
                    if param is not None and param.dtype == torch.float32 and param.shape == saved.shape:
                        param.copy_(saved)  # promoted again just before this (core.load_state_dict)
        self.memory = dict(state.get("memory", {})) or self.memory
        masters = state.get("master_weights", {})
        if masters and not self.optimizers:
            self._pending_state = state  # applied when the optimizers are adopted
            return
        self._pending_state = None
        for index, saved in masters.items():
            optimizer = self.optimizers[int(index)] if int(index) < len(self.optimizers) else None
            if optimizer is None or id(optimizer) not in self.masters:
                self.warn("AdaptiveMP: the checkpoint has fp32 master weights this run does not keep; ignored.")
                continue
            self.masters[id(optimizer)].load_state_dict(saved)
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def _library_hint(remedy: str) -> str:
    if remedy == "stochastic":
        return "torchao.optim._AdamW(..., bf16_stochastic_round=True)"
    return "the optimi equivalent (optimi.AdamW, optimi.Adam, optimi.SGD, ...)"


def losing_message(modules: list[str], lost: LostUpdates, remedy: Any, dtype: torch.dtype | None) -> str:
    """The one warning about modules whose updates keep rounding away."""
    shown = ", ".join(f"{m} ({lost.latest[m].lost:.0%})" for m in modules[:5])
    more = f" and {len(modules) - 5} more" if len(modules) > 5 else ""
    where = f"{str(dtype)[6:]} weights" if dtype is not None else "its weights"
    fix = (
        "Use master_weights='auto' (or 'kahan', 'fp32', 'stochastic'), or a larger learning rate."
        if remedy is None
        else f"master_weights={remedy!r} is on: a larger learning rate, or master_weights='fp32', keeps them."
    )
    return (
        f"AdaptiveMP: {shown}{more} lose over {LOST_LIMIT:.0%} of each update to rounding in {where}, on"
        f" {PATIENCE} sampled steps in a row (the learning rate is cut by that much there). {fix}"
    )

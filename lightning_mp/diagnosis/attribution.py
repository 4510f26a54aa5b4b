"""Attribution: where did a bad step's non-finite value start?

The cost model
--------------
Checking every module's output on every step costs a reduction per module and step, and on a GPU reading
it is a host sync: far over the step-time budget (``python -m benchmarks.overhead`` measures the armed
probe, which does exactly that). Overflows that matter recur, and a promotion needs repeated blame anyway,
so attribution here is *lazy*:

* always on, per step: one float32 sum per floating tensor of the batch (inf and NaN propagate through
  it), kept on the device (no sync), and a reference to the loss. Both are read only after the step is
  already known to be bad.
* on a bad step: those two flags give the phase. ``input``: the batch was already non-finite. Loss
  non-finite with a finite batch: the forward pass (or the loss) made it; if the forward probe was armed
  this step it names the first module, in execution order, whose output became non-finite while its
  inputs were finite (``forward``), or finds all module outputs finite (``loss``); if not, the finding has
  ``module=None`` and the probe is armed for the next steps. Loss finite but gradients not: ``backward``,
  and the module is the one nearest the loss whose own parameter gradients are non-finite (read once, on
  the bad step only).

Every answer is a :class:`Finding`. Memory is O(number of modules): the probe keeps one flag per module call
of the current step, the execution order is a list of names.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from lightning_mp._compat import tree_leaves
from lightning_mp._grads import all_reduce, finite_sum
from lightning_mp.diagnosis.hooks import HookSet

__all__ = [
    "ExecutionOrder",
    "Finding",
    "ForwardProbe",
    "OverflowTracker",
    "floating",
    "is_kernel_error",
    "module_from_traceback",
    "nearest_nonfinite_grad",
    "nonfinite_code",
]

Phase = Literal["input", "forward", "loss", "backward"]
Kind = Literal["inf", "nan", "spike"]  # "spike": finite, but far above its recent history (core.py)
FINITE, INF, NAN = 0, 1, 2
KINDS: dict[int, Kind] = {INF: "inf", NAN: "nan"}


@dataclass(frozen=True)
class Finding:
    """Where a bad step's non-finite value started (before anyone decided what to do about it).

    ``module`` is the fully qualified name (``encoder.layers.3.attn``), or ``None`` when the phase has no
    module (``input``, ``loss``) or the forward pass was not localized yet. ``dtype`` is the dtype of the
    offending tensor (``"input"`` / ``"loss"`` / ``"unknown"`` where there is none to name).

    A replay of the step (``replay.py``) adds the operation that produced the first non-finite value
    (``"aten::mul"``) and the user's source line (``"model.py:67"``); ``reproduced`` is ``True`` when the
    replay went bad the same way, ``False`` when it ran and stayed finite (the other fields then come from
    the cheap attribution), ``None`` when no replay ran.
    """

    phase: Phase
    module: str | None
    kind: Kind
    dtype: str
    op: str | None = None
    source: str | None = None
    reproduced: bool | None = None

    @classmethod
    def spike(cls) -> Finding:
        """A finite loss far above its history after a promotion (the spike rule skips the step)."""
        return cls("loss", None, "spike", "float32")


def floating(values: Any) -> list[torch.Tensor]:
    """The floating-point tensors anywhere in ``values`` (tuples, dicts, dataclass-like model outputs).

    A tensor, or a flat tuple of tensors and ``None`` (what most layers of a Hugging Face model return,
    ``(hidden_states, None)``), skips the walk through the pytree: module hooks ask this of every output.
    """
    if isinstance(values, torch.Tensor):
        return [values] if values.is_floating_point() else []
    if type(values) is tuple and all(t is None or isinstance(t, torch.Tensor) for t in values):
        return [t for t in values if t is not None and t.is_floating_point()]
    return [t for t in tree_leaves(values) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def nonfinite_code(values: Any) -> torch.Tensor:
    """0-d float tensor on the tensors' device: 0 all finite, 1 inf, 2 NaN (or +inf and -inf together).

    One float32 sum per tensor, no host synchronisation. Non-tensors are ignored;
    with no floating tensor at all the code is 0 on the CPU.
    """
    tensors = floating(values)
    if not tensors:
        return torch.zeros(())
    # A float32 sum propagates inf and NaN in one streaming pass (the inf-norm takes a slow scalar path on CPU).
    total = finite_sum([t.detach() for t in tensors], tensors[0].device)
    return torch.where(torch.isnan(total), 2.0, torch.where(torch.isinf(total), 1.0, 0.0))


def _code(value: float) -> int:
    return NAN if math.isnan(value) else INF if math.isinf(value) else FINITE


def _shallow_copy(batch: Any) -> Any:
    """A new top-level container holding the same items (dicts and mappings such as Hugging Face's
    ``BatchEncoding`` become dicts, lists stay lists); anything else as it is."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, list):
        return list(batch)
    return batch


def _input_code(tensor: torch.Tensor) -> int:
    """An input tensor's non-finite code (a float32 sum propagates inf and NaN; one host read)."""
    return _code(tensor.detach().sum(dtype=torch.float32).item())


def _dtype_name(values: Any) -> str:
    tensors = floating(values)
    return str(tensors[0].dtype).removeprefix("torch.") if tensors else "unknown"


class ExecutionOrder:
    """Records, once, the order in which modules first run (forward pre-hooks, removed after one step)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._hooks = HookSet()

    def record(self, model: nn.Module) -> None:
        seen: set[str] = set()

        def make_hook(fqn: str):
            def pre_hook(module, args):
                if fqn not in seen:
                    seen.add(fqn)
                    self.names.append(fqn)

            return pre_hook

        self.names = []
        self._hooks.register(model, make_hook, "forward_pre")

    @property
    def recording(self) -> bool:
        return self._hooks.active

    def stop(self) -> None:
        self._hooks.remove()


class ForwardProbe:
    """Forward hooks that flag, per module call, "output non-finite while inputs finite". Armed on demand."""

    def __init__(self) -> None:
        self._hooks = HookSet()
        self._records: list[tuple[str, torch.Tensor, torch.Tensor, str]] = []
        self.armed_steps_left = 0

    @property
    def armed(self) -> bool:
        return self._hooks.active

    def arm(self, model: nn.Module, steps: int) -> None:
        self.armed_steps_left = steps
        if self.armed:
            return

        def make_hook(fqn: str):
            def forward_hook(module, args, kwargs, output):
                self._records.append((fqn, nonfinite_code((args, kwargs)), nonfinite_code(output), _dtype_name(output)))

            return forward_hook

        self._hooks.register(model, make_hook, "forward_with_kwargs")

    def disarm(self) -> None:
        self._hooks.remove()
        self._records = []
        self.armed_steps_left = 0

    def start_micro_step(self) -> None:
        """Forget the records of an earlier micro-batch: only the one that went bad is read."""
        self._records = []

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Keep this step's records as they are while the step is replayed (the hooks stay, their calls
        during the replay are dropped)."""
        records = self._records
        self._records = []
        try:
            yield
        finally:
            self._records = records

    def first_offender(self) -> Finding | None:
        """The first module call whose output went non-finite from finite inputs, as a forward finding."""
        if not self._records:
            return None
        codes = torch.stack([torch.stack([i.cpu(), o.cpu()]) for _, i, o, _ in self._records]).tolist()
        for (fqn, _, _, dtype), (code_in, code_out) in zip(self._records, codes):
            if code_out and not code_in:
                return Finding("forward", fqn, KINDS[int(code_out)], dtype)
        return None

    def end_step(self) -> None:
        """Forget this step's records; count down and disarm when the armed period is over."""
        self._records = []
        if self.armed:
            self.armed_steps_left -= 1
            if self.armed_steps_left <= 0:
                self.disarm()


def nearest_nonfinite_grad(model: nn.Module, order: Iterable[str]) -> Finding | None:
    """The module nearest the loss whose own parameter gradients are not finite, as a backward finding.

    ``order`` is the forward execution order; the backward visits it in reverse. Modules missing from it
    (never run, or the order was not recorded) are checked after, in registration order.
    """
    modules = dict(model.named_modules())
    names = list(order)
    names = list(reversed(names)) + [n for n in modules if n and n not in set(names)]
    candidates = []
    for fqn in names:
        grads = [p.grad for p in modules[fqn].parameters(recurse=False) if p.grad is not None]
        if grads:
            candidates.append((fqn, grads))
    if not candidates:
        return None
    codes = torch.stack([nonfinite_code(grads).cpu() for _, grads in candidates]).tolist()
    for (fqn, grads), code in zip(candidates, codes):
        if code:
            return Finding("backward", fqn, KINDS[int(code)], _dtype_name(grads))
    return None


_KERNEL_ERRORS = re.compile(
    r"could not create a primitive|not implemented for '(Half|BFloat16)'|CUBLAS_STATUS_NOT_SUPPORTED"
    r"|no kernel image is available|does not support (Half|BFloat16|float16|bfloat16)"
    # masked_fill(mask, -1e10) on an fp16 tensor (minGPT's attention mask): the constant does not fit fp16.
    r"|cannot be converted to type (c10::|at::)?(Half|BFloat16) without overflow"
)


def is_kernel_error(error: BaseException) -> bool:
    """Whether an exception looks like a low-precision kernel that does not exist or failed to build."""
    return isinstance(error, (RuntimeError, NotImplementedError)) and bool(_KERNEL_ERRORS.search(str(error)))


def module_from_traceback(error: BaseException, model: nn.Module) -> str | None:
    """The innermost submodule of ``model`` whose ``forward`` was running when ``error`` was raised."""
    names = {id(m): fqn for fqn, m in model.named_modules() if fqn}
    found = None
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def agree_replay(found: Finding | None) -> Finding | None:
    """Combine the ranks' replay findings: the lowest rank's reproduced finding, on every rank (a collective
    under DDP: each rank replayed its own batch, and only some went bad)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return found
    gathered: list[Finding | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, found)
    return next((f for f in gathered if f is not None), None)


def agree(model: nn.Module, phase: Phase, found: Finding | None) -> Finding | None:
    """Combine one rank's module finding across ranks: the lowest module index any rank found, with that
    rank's kind and dtype. Every rank gets the same answer, so every rank blames the same module."""
    names = [fqn for fqn, _ in model.named_modules()]
    mine = float(names.index(found.module)) if found is not None else float(len(names))
    (index,) = all_reduce([mine], "MIN")
    kind_code = float({"inf": INF, "nan": NAN}[found.kind]) if found is not None and mine == index else 0.0
    (kind_code,) = all_reduce([kind_code], "MAX")
    if int(index) >= len(names):
        return None
    dtype = found.dtype if found is not None and mine == index else "unknown"
    return Finding(phase, names[int(index)], KINDS[int(kind_code)] if kind_code else "nan", dtype)


# Runs a bad step again under the operation tracer: expected phase -> (a replay ran, its finding or None).
Replayer = Callable[[Phase], tuple[bool, "Finding | None"]]


class OverflowTracker:
    """The attribution state machine of one training run: cheap flags, the armed probe, the order.

    Args:
        watch_steps: how many optimizer steps the forward probe stays armed after an unlocalized event.
    """

    def __init__(self, watch_steps: int = 20) -> None:
        self.watch_steps = watch_steps
        self.order = ExecutionOrder()
        self.probe = ForwardProbe()
        self._batches: list[Any] = []  # the batches since the last step (references; tensors found when read)
        self._losses: list[torch.Tensor] = []  # one per micro-batch since the last optimizer step
        # The batch's finding, kept until the next batch: in manual optimization several optimizers step on
        # one forward/backward, and a bad batch is one event, not one per optimizer.
        self._batch_finding: Finding | None = None
        self._batch_optimizers: set[int] = set()  # ids of the optimizers that stepped on this batch

    # Per step, always on and free: references to the batch and the loss (a detached scalar), read only if the
    # step turns out bad (the replay keeps the batch for the same time anyway). The batch's floating tensors
    # are found when it is read, not every step. Its top-level container is copied (O(keys)): a training_step
    # that pops or replaces an entry (`x = batch.pop("x")`) must not hide a bad input from the check.
    def observe_input(self, batch: Any) -> None:
        self._batches.append(_shallow_copy(batch))

    def observe_loss(self, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    @property
    def losses(self) -> list[torch.Tensor]:
        """This step's losses (one per backward pass), detached and never read unless someone asks."""
        return list(self._losses)

    def start_micro_step(self) -> None:
        self.probe.start_micro_step()

    def forward_finite(self) -> bool:
        """Whether this step's inputs and losses are all finite (host reads; ask only about a bad step). With a
        finite forward, a non-finite gradient was born in the backward: in fp16, the loss scale."""
        return self._forward_codes() == (FINITE, FINITE)

    def _forward_codes(self) -> tuple[int, int]:
        """The non-finite codes of this step's inputs and of its losses, agreed across ranks (a collective)."""
        codes = [
            max((_input_code(t) for t in floating(self._batches)), default=FINITE),
            max((_code(loss.float().sum().item()) for loss in self._losses), default=FINITE),
        ]
        input_code, loss_code = (int(v) for v in all_reduce([float(c) for c in codes], "MAX"))
        return input_code, loss_code

    def forget_losses(self) -> None:
        """The step's forward/backward runs again (a rescue): its losses will be observed again."""
        self._losses = []

    def new_batch(self) -> None:
        """Forget the last batch's flags and finding: call when the first micro-batch of an optimizer step
        begins. Not at the end of a step: in manual optimization another optimizer may still step on it."""
        self._batches, self._losses, self._batch_finding, self._batch_optimizers = [], [], None, set()

    def note_optimizer(self, key: int) -> bool:
        """An optimizer is about to step on the current batch; True when another optimizer already found this
        batch bad (the same bad batch: one event). The same optimizer stepping again starts a new finding."""
        if key in self._batch_optimizers:
            self._batch_finding = None
        repeat = self._batch_finding is not None
        self._batch_optimizers.add(key)
        return repeat

    def end_step(self) -> None:
        self.order.stop()  # the first step has recorded the execution order
        self.probe.end_step()

    def stop(self) -> None:
        """Remove every hook and drop the last batch's references (teardown, or an interrupted run)."""
        self.order.stop()
        self.probe.disarm()
        self._batches, self._losses = [], []

    @property
    def hooked(self) -> bool:
        """Whether any attribution hook is on the model now."""
        return self.order.recording or self.probe.armed

    def attribute(self, model: nn.Module, replay: Replayer | None = None) -> Finding:
        """Classify a bad step. Call only after the step is known to be bad; collective under DDP.

        ``replay(expected_phase)`` runs the step again under the operation tracer when it can (``replay.py``):
        ``(a replay ran, its reproduced finding or None)``. A second call for the same batch (another optimizer
        of a manual-optimization step) returns the first answer.
        """
        if self._batch_finding is None:
            self._batch_finding = self._classify(model, replay)
        return self._batch_finding

    def _classify(self, model: nn.Module, replay: Replayer | None) -> Finding:
        input_code, loss_code = self._forward_codes()
        if input_code:
            return Finding("input", None, KINDS[input_code], "input")
        replayed, reproduced = self._replay(replay, "forward" if loss_code else "backward")
        if replayed is not None:
            return replayed
        if loss_code:
            return replace(self._attribute_forward(model, loss_code), reproduced=reproduced)
        # With sharded (FSDP2) gradients each rank sees only its shard: agree on one module.
        found = agree(model, "backward", nearest_nonfinite_grad(model, self.order.names))
        found = found if found is not None else Finding("backward", None, "nan", "unknown")
        return replace(found, reproduced=reproduced)

    def _replay(self, replay: Replayer | None, expected: Phase) -> tuple[Finding | None, bool | None]:
        """Replay the step when it can be: (its finding if it went bad in the expected phase, reproduced)."""
        if replay is None:
            return None, None
        with self.probe.paused():
            ran, found = replay(expected)
        if found is not None and (found.phase == "backward") != (expected == "backward"):
            found = None  # it went bad, but not the way the real step did
        found = agree_replay(found)
        if found is not None:
            return found, True
        return None, (False if ran else None)

    def _attribute_forward(self, model: nn.Module, loss_code: int) -> Finding:
        if not self.probe.armed:
            self.probe.arm(model, self.watch_steps)
            return Finding("forward", None, KINDS[loss_code], "unknown")
        found = agree(model, "forward", self.probe.first_offender())
        return found if found is not None else Finding("loss", None, KINDS[loss_code], "loss")

"""Replay: run a bad step again under a tracer and name the operation where its first non-finite value was born.

The cheap flags of ``attribution.py`` say *that* a step went bad and in which phase (input, forward or loss,
backward); forward hooks can say which module's output went bad, but only on later steps and only at module
boundaries. A user needs the first bad step understood, down to the line: "``blocks.1.attn``: ``aten::mul``
in float16 produced inf (model.py:67)". So a bad step is run a second time, eagerly, from the state it started
from, with every operation's output checked:

* **What is kept, per step, at no measurable cost**: a reference to the arguments of each micro-batch's
  ``training_step`` (the batch is alive anyway), and the RNG state at the start of the step (a 5 KB host copy,
  no device synchronisation). Floating buffers are already copied by ``buffers.BufferSnapshot``. Parameters
  need nothing: the step was skipped.
* **On a bad step only**: gradients are set aside, buffers and RNG go back to the start of the step, and the
  micro-batches run again under the same autocast and loss scale, with ``torch.compile`` forced eager, logging
  muted and optimizer steps never reached. Then gradients, buffers and RNG are put back as the real step left
  them, and so is everything the user's ``training_step`` changed while it ran again (``side_effects.py``:
  ``requires_grad`` flags and optimizer toggling, module attributes and their containers, ``train``/``eval``
  mode, hooks, parameters written in place such as an EMA teacher), so the run goes on exactly as it would
  have without the replay.
* **The tracer** (:class:`OpTracer`, a ``TorchDispatchMode``) sees every aten operation, forward and backward,
  including arithmetic written in a module's own ``forward`` that no hook can see. A non-finite output whose
  inputs were finite is a *birth*; an output computed from a non-finite input inherits that input's birth.
  The reported birth is the one the bad loss (forward) or the bad parameter gradient (backward) inherited:
  a ``-inf`` written on purpose into an attention mask is born too, but ``softmax`` turns it finite again and
  it reaches nothing. A constant (``float("nan")`` lifted to a tensor) is not a birth until an operation
  mixes it into data: that operation is where the user's line wrote it.
* **Naming**: the module is the innermost ``nn.Module`` whose call was running (a forward hook belongs to its
  module); code in the ``LightningModule``'s own ``training_step`` after the network ran is the ``loss`` phase.
  The source line is the innermost frame outside torch, Lightning and this package. A backward operation is
  named after the forward operation whose gradient it computes (autograd sequence numbers connect the two),
  or after the parameter whose gradient hook ran.

If the replay does not go bad in the same phase (a non-deterministic kernel, randomness drawn outside the
step), the result says ``reproduced=False`` and the caller falls back to the cheap attribution.
"""

from __future__ import annotations

import contextlib
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mp._compat import (
    TorchDispatchMode,
    WeakIdKeyDictionary,
    autograd_sequence_nr,
    caller_frame,
    current_autograd_node,
    node_sequence_nr,
    tensor_base,
)
from lightning_mp.diagnosis.attribution import Finding, Kind, Phase, floating
from lightning_mp.diagnosis.hooks import eager
from lightning_mp.step.side_effects import ModuleState, WriteWatch

__all__ = ["Birth", "OpTracer", "ReplayDone", "StepReplay"]


@dataclass(frozen=True)
class Birth:
    """One operation whose output became non-finite from finite (or no) data inputs."""

    phase: Phase  # "forward", "loss" or "backward"
    module: str | None  # innermost module running it; None for the LightningModule's own code
    op: str  # "aten::mul"
    dtype: str  # "float16"
    kind: Kind
    source: str | None  # "model.py:67", the user's line
    constant: bool  # a constant made non-finite (no floating data input): not yet written into data

    def finding(self) -> Finding:
        return Finding(self.phase, self.module, self.kind, self.dtype, self.op, self.source, True)


def _library_dirs() -> tuple[str, ...]:
    """Directories whose frames are never "the user's line": torch, Lightning, this package, the stdlib."""
    import lightning

    dirs = {os.path.dirname(torch.__file__), os.path.dirname(lightning.__file__), os.path.dirname(__file__)}
    try:
        import lightning_fabric

        dirs.add(os.path.dirname(lightning_fabric.__file__))
    except ImportError:
        pass
    dirs.add(sysconfig.get_paths()["stdlib"])
    return tuple(os.path.join(d, "") for d in dirs)


_LIBRARY_DIRS: tuple[str, ...] | None = None


class OpTracer(TorchDispatchMode):
    """Checks the output of every aten operation and records where non-finite values are born.

    Args:
        model: the module whose submodules name the births (fqns relative to it; the root itself is "no module").
        stop_frame: the frame that started the replay; frames at or above it are not the user's step.
    """

    def __init__(self, model: nn.Module, stop_frame: Any = None) -> None:
        super().__init__()
        global _LIBRARY_DIRS
        if _LIBRARY_DIRS is None:
            _LIBRARY_DIRS = _library_dirs()
        self._names = {id(m): fqn for fqn, m in model.named_modules()}
        self._param_owner = {id(p): fqn for fqn, m in model.named_modules() for p in m.parameters(recurse=False)}
        self._stop = stop_frame
        self.backward = False  # the phase of the operations now running (set through ``backward_pass``)
        self._backward_frame: Any = None  # the frame that called backward: user frames above it are not the line
        self.births: list[Birth] = []
        self._origin: WeakIdKeyDictionary = WeakIdKeyDictionary()  # non-finite tensor -> index into births
        self._made_by: dict[int, tuple[str | None, str | None, str]] = {}  # autograd seq nr -> (module, line, op)
        self._network_ran = False  # an operation ran inside a submodule: root-level code after it is the loss

    @contextlib.contextmanager
    def backward_pass(self) -> Iterator[None]:
        """Trace a backward pass started from the caller's frame (manual optimization calls it from the
        user's ``training_step``: that line is where backward was asked for, not where anything overflowed)."""
        self.backward, self._backward_frame = True, caller_frame(2)
        try:
            yield
        finally:
            self.backward, self._backward_frame = False, None

    # ----------------------------------------------------------------------------------------- tracing
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        seq = None if self.backward else autograd_sequence_nr() - 1  # the node this forward op just created
        node = current_autograd_node() if self.backward else None
        name = func.name()  # "aten::add_.Tensor", "aten::add.out"
        op = name.split(".")[0]
        # An operation that writes into its inputs (copy_, index_put_, out=): which of them were finite data
        # must be known before it runs.
        writes = op.endswith("_") or name.endswith(".out")
        finite_before = {id(t) for t in floating((args, kwargs)) if bool(torch.isfinite(t).all())} if writes else None
        out = func(*args, **kwargs)
        where: tuple[str | None, str | None] | None = None
        if seq is not None and seq not in self._made_by:
            where = self._where()
            self._made_by[seq] = (where[0], where[1], op)
            self._network_ran |= where[0] is not None
        outputs = floating(out)
        if outputs:
            finite = torch.stack([torch.isfinite(t).all() for t in outputs]).tolist()
            bad = [t for t, ok in zip(outputs, finite) if not ok]
            for t in outputs if all(finite) else ():
                self._origin.pop(t, None)  # an in-place op made it finite again
            if bad:
                self._record(op, args, kwargs, bad, node, where, finite_before)
        return out

    def _record(self, op, args, kwargs, bad, node, where, finite_before) -> None:
        inputs = floating((args, kwargs))
        origins = [self._origin[t] for t in inputs if t in self._origin]
        inherited = [i for i in origins if not self.births[i].constant]
        # Data: a finite input. A non-finite input no traced operation made (a scalar lifted to a tensor, a -inf
        # mask buffer) is a constant, and so is one made from constants only.
        data = [
            t
            for t in inputs
            if (id(t) in finite_before if finite_before is not None else bool(torch.isfinite(t).all()))
            and (t not in self._origin or finite_before is not None)
        ]
        if inherited:
            index = min(inherited)
        else:
            index = len(self.births)
            self.births.append(self._birth(op, bad[0], node, where, constant=not data))
        for t in bad:
            self._origin[t] = index
            base = tensor_base(t)
            if base is not None:  # an in-place write through a view made its base non-finite too
                self._origin[base] = index

    def _birth(self, op: str, tensor: Tensor, node: Any, where: Any, constant: bool) -> Birth:
        kind: Kind = "nan" if bool(torch.isnan(tensor).any()) else "inf"
        dtype = str(tensor.dtype).removeprefix("torch.")
        if not self.backward:
            module, source = where if where is not None else self._where()
            phase: Phase = "forward" if module is not None or not self._network_ran else "loss"
            return Birth(phase, module, op, dtype, kind, source, constant)
        module, source = self._node_origin(node)
        frame_source = self._where()[1]  # a gradient hook or autograd.Function the user wrote, run by backward
        return Birth("backward", module, op, dtype, kind, frame_source or source, constant)

    def _node_origin(self, node: Any) -> tuple[str | None, str | None]:
        """(module, forward line) of the autograd node running a backward operation.

        The gradient of a dtype cast is charged to whoever produced the cast's input: an fp32 island casts its
        fp16 input up, and that cast's backward is where the gradient flowing into the fp16 module before it
        overflows; autocast's cast of a weight goes to the module owning the weight.
        """
        while node is not None and node.name().startswith("ToCopyBackward") and node.next_functions:
            producer = node.next_functions[0][0]
            if producer is None:
                break
            node = producer
        if node is None:
            return None, None
        variable = getattr(node, "variable", None)  # AccumulateGrad: the parameter itself
        if variable is not None:
            return self._param_owner.get(id(variable)), None
        module, source, _ = self._made_by.get(node_sequence_nr(node), (None, None, None))
        return module, source

    def _where(self) -> tuple[str | None, str | None]:
        """(innermost submodule being called, the user's source line) from the Python stack."""
        module: str | None = None
        source: str | None = None
        frame = caller_frame(2)
        stop = self._backward_frame if self.backward and self._backward_frame is not None else self._stop
        while frame is not None and frame is not stop:
            code = frame.f_code
            if module is None and code.co_name == "_call_impl":
                fqn = self._names.get(id(frame.f_locals.get("self")))
                if fqn:  # "" is the root: not a submodule
                    module = fqn
            if source is None and not code.co_filename.startswith(_LIBRARY_DIRS) and "<" not in code.co_filename:
                source = f"{os.path.basename(code.co_filename)}:{frame.f_lineno}"
            if module is not None and source is not None:
                break
            frame = frame.f_back
        return module, source

    # ----------------------------------------------------------------------------------------- reading
    def origin_of(self, tensors: list[Tensor], backward: bool) -> Birth | None:
        """The earliest birth any of ``tensors`` inherited; else the first non-constant birth of the phase
        (forward, or ``backward``)."""
        indices = [self._origin[t] for t in tensors if t in self._origin]
        if indices:
            written = [i for i in indices if not self.births[i].constant]
            return self.births[min(written or indices)]
        return next((b for b in self.births if not b.constant and (b.phase == "backward") == backward), None)


class ReplayDone(Exception):
    """Raised inside the replayed step once it has gone bad (or done all the backward passes it needs)."""


class StepReplay:
    """What a replay needs from the current optimizer step, and the replay itself.

    The shell registers each micro-batch as a callable that runs it again: ``keep(run)``, where
    ``run(backward)`` recomputes the micro-batch's loss and passes it to ``backward`` exactly where the real
    step called backward (automatic optimization: once, with Lightning's normalisation; manual: from
    ``manual_backward``).
    """

    def __init__(self, enabled: bool = True, save_rng: bool = False) -> None:
        self.enabled = enabled
        self._runs: list[Callable[[Callable[[Tensor], None]], None]] = []
        self._rng: tuple[Tensor, Tensor | None] | None = None
        self.active = False  # a replay is running: the shell must not step optimizers or count anything
        self.save_rng = save_rng  # keep the batch's RNG state even with replays off (a rescue re-run needs it)
        self.written: list[str] = []  # parameters the last replay's user code wrote in place (then put back)
        # Manual optimization toggles requires_grad between its optimizers' turns (toggle_optimizer): a replay
        # must start from the flags the step began with, or it replays the generator with the discriminator's
        # flags. Kept per batch only for the parameters given to track_flags (one bool each).
        self._flag_params: list[Tensor] = []
        self._flags: list[bool] = []

    def track_flags(self, model: nn.Module | None) -> None:
        """Keep the ``requires_grad`` flags of ``model``'s parameters at the start of every batch (manual
        optimization: its steps toggle them); ``None`` stops."""
        self._flag_params = list(model.parameters()) if model is not None else []
        self._flags = []

    def begin_batch(self, device: str | None) -> None:
        """Before the first micro-batch of an optimizer step: forget the last one, keep the RNG state."""
        self._runs = []
        if self.enabled and self._flag_params:
            self._flags = [p.requires_grad for p in self._flag_params]
        if self.enabled or self.save_rng:
            cuda = torch.cuda.get_rng_state() if device == "cuda" and torch.cuda.is_available() else None
            self._rng = (torch.get_rng_state(), cuda)

    def keep(self, run: Callable[[Callable[[Tensor], None]], None]) -> None:
        if (self.enabled or self.save_rng) and not self.active:  # a rescue re-runs kept micro-batches too
            self._runs.append(run)

    @property
    def kept(self) -> list[Callable[[Callable[[Tensor], None]], None]]:
        """How to run each micro-batch of this step again, in order."""
        return list(self._runs)

    def clear(self) -> None:
        self._runs, self._rng = [], None

    def restart_batch(self, keep_runs: bool = False) -> None:
        """The step's forward/backward is about to run again (a rescue): put the RNG back where the batch
        began, so dropout draws the same masks, and forget the kept micro-batches unless ``keep_runs`` (a re-run
        through Lightning's closure keeps its own)."""
        if not keep_runs:
            self._runs = []
        if self._rng is not None:
            torch.set_rng_state(self._rng[0])
            if self._rng[1] is not None:
                torch.cuda.set_rng_state(self._rng[1])

    @property
    def ready(self) -> bool:
        return self.enabled and bool(self._runs) and self._rng is not None

    def replayer(
        self,
        model: nn.Module,
        restore_buffers: Callable[[], None],
        autocast: Callable[[], contextlib.AbstractContextManager],
        scale: float | None,
        backward_passes: int,
        warn: Callable[[str], None],
    ) -> Callable[[Phase], tuple[bool, Finding | None]] | None:
        """How attribution replays this bad step (``OverflowTracker.attribute``), or ``None`` when it cannot be:
        no micro-batch kept, no backward yet, or sharded parameters (FSDP2 / tensor parallel: a replayed
        forward/backward would run the strategy's collectives again). A replay that raises is reported and
        attribution falls back to the cheap flags: a replay must never break training."""
        if (
            not self.ready
            or backward_passes == 0
            or any(callable(getattr(p, "to_local", None)) for p in model.parameters())
        ):
            return None

        def replay(expected: Phase) -> tuple[bool, Finding | None]:
            try:
                return True, self.replay(model, restore_buffers, autocast(), scale, backward_passes)
            except Exception as error:
                text = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                warn(f"AdaptiveMP: could not replay the bad step to locate it ({text}).")
                return True, None

        return replay

    def replay(
        self,
        model: nn.Module,
        restore_buffers: Callable[[], None],
        autocast: contextlib.AbstractContextManager,
        scale: float | None,
        backward_passes: int,
    ) -> Finding | None:
        """Run the kept micro-batches again under an :class:`OpTracer`; the first birth that reaches the bad
        loss or gradient, as a reproduced finding, or ``None`` when the replay stays finite.

        ``backward_passes`` is how many backward passes the real step made before it went bad (manual
        optimization may step between two): the replay stops after as many.
        """
        params = [p for p in model.parameters()]
        grads = [p.grad for p in params]
        buffers = [b.detach().clone() for b in model.buffers()]
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if self._rng and self._rng[1] is not None else None)
        tracer = OpTracer(model, stop_frame=caller_frame(0))
        state = ModuleState(model.modules())  # what the user's training_step may change: put back after
        watch = WriteWatch(model.named_parameters())
        result: list[Finding] = []
        passes = 0

        def backward(loss: Tensor) -> None:
            nonlocal passes
            losses = floating(loss)
            if not all(bool(torch.isfinite(t).all()) for t in losses):
                birth = tracer.origin_of(losses, backward=False)
                if birth is not None:
                    result.append(birth.finding())
                raise ReplayDone
            with tracer.backward_pass():
                (loss * scale if scale is not None else loss).backward()
            passes += 1
            bad = [p.grad for p in params if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            if bad:
                birth = tracer.origin_of(bad, backward=True)
                if birth is not None:
                    result.append(birth.finding())
                raise ReplayDone
            if passes >= backward_passes:
                raise ReplayDone

        self.active = True
        try:
            for p in params:
                p.grad = None
            for p, flag in zip(self._flag_params, self._flags):
                p.requires_grad_(flag)  # as the step began (``state`` puts the real step's flags back)
            restore_buffers()
            torch.set_rng_state(self._rng[0])
            if self._rng[1] is not None:
                torch.cuda.set_rng_state(self._rng[1])
            with eager(), autocast, watch, tracer:
                for run in self._runs:
                    run(backward)
        except ReplayDone:
            pass
        finally:
            self.active = False
            state.restore()
            watch.restore()
            self.written = watch.written
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.grad = g
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1])
        return result[0] if result else None

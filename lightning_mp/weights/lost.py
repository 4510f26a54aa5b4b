"""Lost updates: how much of what the optimizer asks for never reaches the stored weights.

A weight stored in bf16 has 8 significant bits: an update smaller than half a unit in its last place (a relative
change under 2^-9, about 0.2%) rounds back to the same value. With a small learning rate, or late in a cosine
schedule, most updates are that small and the weights stop moving while the loss curve looks merely flat.

On a sampled step, before the real ``optimizer.step()``, the same optimizer class takes the same step on fp32
copies of the weights, gradients and state (``shadow_step``): that is the *intended* update ``u``. After the
real step, the stored weights' change ``d`` is compared with it, per module:

- ``unchanged``: the share of elements with ``u != 0`` whose stored weight did not move at all;
- ``lost``: the share of the update's magnitude that did not arrive, ``1 - <d, u> / <u, u>`` clipped to [0, 1]:
  1 when nothing moved, 0 when the weights moved as asked. It is what the learning rate is effectively cut by,
  and it is the figure that is judged.

What a remedy keeps is not lost: with a Kahan buffer (optimi's ``kahan_comp``) the weight judged is the stored one
plus its buffer. Stochastic rounding moves an element by a whole unit in the last place with probability
``|u| / ulp``: few elements move on one step (``unchanged`` stays high) and one step's draw is noise, but its
expected change is ``u`` by construction, so ``lost`` is taken on the expected change for the parameters it rounds
(0, unless a parameter escapes it: an fp32 one, or an optimizer that does not round).

Weights kept in fp32 (autocast, or an fp32 master copy: the weights the optimizer updates are the stored ones)
read ~0 on both, the check that the measure is right.

The optimizer's own state loses updates the same way when it is kept in bf16: Adam's second moment moves by
``(1 - beta2) = 0.1%`` of itself per step, under half a bf16 unit in the last place (0.2-0.4%), so it rounds back
and stops tracking the gradients. The fp32 step's state is compared with the stored state after the step on the
same sampled steps, per state key (``state_latest``; ``state_history`` and ``state_mean`` take the worst key; per
run, not per module): torchao's stochastic rounding rounds the weights, not its bf16 moments.

``LOST_LIMIT = 0.5`` for ``PATIENCE = 2`` samples in a row makes a module *losing updates*, with one warning
that names them: half of the step lost is the learning rate halved in that module without anyone choosing it,
and it does not recover by itself (the schedule only lowers the learning rate further). A module whose
gradients or intended update are not finite is not judged on that step (the guard deals with that step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_mp._grads import all_reduce

__all__ = ["LOST_LIMIT", "PATIENCE", "LostUpdates", "UpdateSample", "shadow_step"]

LOST_LIMIT = 0.5
PATIENCE = 2

# Keys of a param group that describe a kernel choice, not the update: the fp32 copy runs the plain kernel.
_KERNEL_KEYS = {"fused": None, "foreach": None, "capturable": False, "kahan_sum": False, "gradient_release": False}


@dataclass
class UpdateSample:
    """One module's lost updates on one sampled step."""

    unchanged: float  # share of elements with a non-zero intended update that did not move
    lost: float  # share of the intended update's magnitude that did not arrive
    elements: int  # elements with a non-zero intended update


def _fp32_copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().float().clone() if value.is_floating_point() else value.detach().clone()
    return value


def effective_weight(optimizer: Optimizer, param: Tensor) -> Tensor:
    """The weight a parameter stands for, in fp32: the stored value plus its Kahan compensation buffer (optimi's
    ``kahan_comp``: what rounding kept back for the next step is not lost)."""
    weight = param.detach().float()
    compensation = optimizer.state.get(param, {}).get("kahan_comp")
    return weight + compensation.float() if isinstance(compensation, Tensor) else weight.clone()


def rounds_stochastically(optimizer: Optimizer, param: Tensor) -> bool:
    """The optimizer rounds ``param``'s update stochastically (torchao's ``bf16_stochastic_round``)."""
    return bool(getattr(optimizer, "bf16_stochastic_round", False)) and param.dtype == torch.bfloat16


def shadow_step(
    optimizer: Optimizer, params: list[Tensor], intended_state: dict[Tensor, dict[str, Tensor]] | None = None
) -> dict[Tensor, Tensor] | None:
    """The step ``optimizer`` is about to take, taken on fp32 copies of ``params``, their gradients and their
    state: ``{param: intended fp32 weight after the step}``. ``None`` when the optimizer cannot be copied (a
    class whose step needs more than its param groups and state: it is then not measured).

    The copy is built without the class's ``__init__`` (whose arguments we do not know) from its param groups and
    defaults, with the simple attributes ``__init__`` set (``bf16_stochastic_round`` ...); its kernel keys are
    reset so that the fp32 step is the plain one, and the class's own ``step`` is called (an LR scheduler's
    patch of the instance's ``step`` must not count this step).
    """
    wanted = {id(p) for p in params}
    intended_state = {} if intended_state is None else intended_state
    grad_scale = getattr(optimizer, "grad_scale", None)
    copies: dict[Tensor, Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        members = [p for p in group["params"] if id(p) in wanted and p.grad is not None]
        if not members:
            continue
        shadow_params = []
        for p in members:
            copy = effective_weight(optimizer, p)
            copy.grad = p.grad.detach().float().clone()
            if grad_scale is not None:  # a fused optimizer unscales inside its step (GradScaler's fused path)
                copy.grad.div_(grad_scale.to(copy.grad.device))
            copies[p] = copy
            shadow_params.append(copy)
        settings = {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in group.items() if k != "params"}
        settings.update({k: v for k, v in _KERNEL_KEYS.items() if k in settings})
        groups.append({**settings, "params": shadow_params})
    if not groups:
        return {}
    kind = type(optimizer)
    try:
        shadow = kind.__new__(kind)
        Optimizer.__init__(shadow, groups, dict(optimizer.defaults))
        for name, value in vars(optimizer).items():
            if isinstance(value, (bool, int, float, str)) and name not in vars(shadow):
                setattr(shadow, name, value)
        for p, copy in copies.items():
            state = optimizer.state.get(p)
            if state:
                # no compensation buffer for fp32 weights (optimi keeps the key, as None, for them)
                shadow.state[copy] = {k: None if k == "kahan_comp" else _fp32_copy(v) for k, v in state.items()}
        with torch.no_grad():
            kind.step(shadow)
    except torch.OutOfMemoryError:
        raise  # not "unmeasurable": the fp32 copies did not fit, which the user must hear about
    except Exception:  # noqa: BLE001 - an optimizer we cannot copy is not measured, never a failed step
        return None
    for p, copy in copies.items():  # the state the step intends, for the state's own lost updates
        intended_state[p] = {k: v for k, v in shadow.state.get(copy, {}).items() if _moment(v, p)}
    return copies


def _moment(value: Any, param: Tensor) -> bool:
    """A state tensor kept per element of its parameter (Adam's moments, SGD's momentum), not a counter."""
    return isinstance(value, Tensor) and value.is_floating_point() and value.shape == param.shape


class LostUpdates:
    """Per-module lost updates on sampled steps, and the modules that keep losing them.

    ``arm(optimizer, model)`` on a sampled step, before the step: optimizer step hooks take the fp32 step and
    snapshot the weights before the real step, and measure after it. ``collect()`` then folds the step's figures
    in and returns the modules that crossed ``LOST_LIMIT`` for ``PATIENCE`` samples in a row (each once).

    """

    def __init__(self) -> None:
        self.latest: dict[str, UpdateSample] = {}
        self.worst: dict[str, float] = {}  # module -> highest lost share seen
        self.losing: list[str] = []  # modules that crossed the limit for PATIENCE samples, in order
        self.samples = 0
        self.retry = False  # the last armed step measured nothing: arm the next one too
        self.history: list[tuple[int, float]] = []  # (optimizer step, overall lost share) per sample
        self._streak: dict[str, int] = {}
        self._handles: list[Any] = []
        self._pending: dict[str, list[float]] = {}  # module -> [unchanged elements, elements, <d,u>, <u,u>]
        self._pending_state: dict[str, list[float]] = {}  # module -> [<d,u>, <u,u>] of its optimizer state
        self.state_history: list[tuple[int, float]] = []  # (optimizer step, the worst state tensor's share) per sample
        self.state_latest: dict[str, float] = {}  # state key (exp_avg, exp_avg_sq, ...) -> its lost share, last sample
        self._unmeasurable: set[str] = set()
        self._shards: tuple[list[str], list[str]] | None = None  # FSDP2: (modules, state keys) summed over ranks

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    @property
    def pending(self) -> bool:
        """A measured step waits to be folded in."""
        return bool(self._pending)

    def arm(self, optimizers: Iterable[Optimizer], names: Callable[[Tensor], str | None]) -> None:
        """Measure the next ``step()`` of each optimizer. ``names(param)``: the module a parameter belongs to
        (``None``: not measured)."""
        if self._handles:
            return
        optimizers = list(optimizers)
        params = [p for optimizer in optimizers for g in optimizer.param_groups for p in g["params"]]
        if any(hasattr(p, "full_tensor") for p in params):  # what every rank sums in collect, agreed up front
            keys = {k for o in optimizers for p in o.state for k, v in o.state[p].items() if _moment(v, p)}
            self._shards = (sorted({m for p in params if (m := names(p))}), sorted(keys))
        for optimizer in optimizers:
            before: dict[Tensor, tuple[Tensor, Tensor]] = {}  # param -> (stored weight, effective weight)
            intended: dict[Tensor, Tensor] = {}
            states: dict[Tensor, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}  # param -> (before, intended)

            def pre(opt: Optimizer, args: Any, kwargs: Any, before=before, intended=intended, states=states) -> None:
                params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None and names(p)]
                intended_state: dict[Tensor, dict[str, Tensor]] = {}
                copies = shadow_step(opt, params, intended_state)
                if copies is None:
                    self._unmeasurable.add(type(opt).__name__)
                    return
                for p, after in copies.items():
                    before[p] = (p.detach().clone(), effective_weight(opt, p))
                    intended[p] = after
                    start = {k: v.detach().float().clone() for k, v in opt.state.get(p, {}).items() if _moment(v, p)}
                    states[p] = (start, intended_state.get(p, {}))

            def post(opt: Optimizer, args: Any, kwargs: Any, before=before, intended=intended, states=states) -> None:
                with torch.no_grad():
                    for p, (stored, start) in before.items():
                        moved = p.detach() != stored
                        effective = effective_weight(opt, p)
                        self._measure(names(p), start, intended[p], effective, moved, rounds_stochastically(opt, p))
                        self._measure_state(names(p), *states.get(p, ({}, {})), opt.state.get(p, {}))
                before.clear()
                intended.clear()
                states.clear()

            self._handles += [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]

    def _measure(
        self, module: str | None, start: Tensor, intended: Tensor, effective: Tensor, moved: Tensor, unbiased: bool
    ) -> None:
        """Fold one parameter in: ``start`` / ``intended`` / ``effective`` are the weight before, as the fp32 step
        would make it, and as stored after (plus its compensation); ``moved`` where the stored weight changed."""
        if hasattr(intended, "to_local"):  # a DTensor shard: this rank's elements (summed over ranks in collect)
            start, intended, effective, moved = (t.to_local() for t in (start, intended, effective, moved))
        u, d = intended - start, effective - start
        if module is None or not (torch.isfinite(u).all() and torch.isfinite(d).all()):
            return
        asked = u != 0
        figures = self._pending.setdefault(module, [0.0, 0.0, 0.0, 0.0])
        figures[0] += float((asked & ~moved).sum())
        figures[1] += float(asked.sum())
        # Stochastic rounding's expected change is the intended one (that is its definition); one step's draw
        # moves a few elements by a whole unit in the last place, which says nothing about the bias being judged.
        expected = u if unbiased else d
        figures[2] += float((expected.double() * u.double()).sum())
        figures[3] += float((u.double() * u.double()).sum())

    def _measure_state(
        self, module: str | None, start: dict[str, Tensor], intended: dict[str, Tensor], stored: dict[str, Any]
    ) -> None:
        """The optimizer state's own lost updates (Adam's moments kept in bf16 round their small changes away too):
        ``<d, u> / <u, u>`` per state key (``exp_avg``, ``exp_avg_sq``: their updates differ by orders of
        magnitude, so each is judged on its own), summed over the parameters."""
        for key, first in start.items():
            after, wanted = stored.get(key), intended.get(key)
            if module is None or not isinstance(after, Tensor) or wanted is None or first.numel() == 0:
                continue
            after, wanted, first = (t.to_local() if hasattr(t, "to_local") else t for t in (after, wanted, first))
            u, d = wanted - first, after.float() - first
            if not (torch.isfinite(u).all() and torch.isfinite(d).all()):
                continue
            figures = self._pending_state.setdefault(key, [0.0, 0.0])  # per state tensor: m and v differ 1e4x
            figures[0] += float((d.double() * u.double()).sum())
            figures[1] += float((u.double() * u.double()).sum())

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def collect(self, step: int = 0) -> list[str]:
        """Fold the sampled step in; the modules losing updates for ``PATIENCE`` samples in a row, new ones only."""
        self.disarm()
        pending, self._pending = self._pending, {}
        state, self._pending_state = self._pending_state, {}
        if self._shards is not None:  # FSDP2: each rank measured its own shards; sum them, the same on every rank
            modules, keys = self._shards
            flat = [v for m in modules for v in pending.get(m, [0.0] * 4)]
            flat += [v for k in keys for v in state.get(k, [0.0] * 2)]
            summed = all_reduce(flat, op="SUM")  # every rank calls it, with the same length (fixed at arm)
            pending = {m: summed[4 * i : 4 * i + 4] for i, m in enumerate(modules) if summed[4 * i + 1] > 0}
            offset = 4 * len(modules)
            state = {k: summed[offset + 2 * j : offset + 2 * j + 2] for j, k in enumerate(keys)}
            self._shards = None
        if not any(asked > 0 and uu > 0 for _, asked, _, uu in pending.values()):
            self.retry = True  # nothing asked to move (a warm-up at lr 0, a skipped step): measure the next step
            return []
        self.retry = False
        shares = {k: 1.0 - min(max(du / uu, 0.0), 1.0) for k, (du, uu) in state.items() if uu > 0}
        if shares:
            self.state_latest = shares
            self.state_history.append((step, max(shares.values())))
        self.samples += 1
        new = []  # (latest keeps each module's last sample: a batch's optimizers each fold their modules in)
        for module, (unchanged, asked, du, uu) in pending.items():
            if asked == 0 or uu == 0:
                continue
            lost = 1.0 - min(max(du / uu, 0.0), 1.0)
            self.latest[module] = UpdateSample(unchanged / asked, lost, int(asked))
            self.worst[module] = max(self.worst.get(module, 0.0), lost)
            self._streak[module] = self._streak.get(module, 0) + 1 if lost > LOST_LIMIT else 0
            if self._streak[module] >= PATIENCE and module not in self.losing:
                self.losing.append(module)
                new.append(module)
        overall = self.overall()
        if overall is not None:
            self.history.append((step, overall))
        return new

    def mean(self) -> float | None:
        """The overall lost share averaged over every sample of the run."""
        return sum(v for _, v in self.history) / len(self.history) if self.history else None

    def state_mean(self) -> float | None:
        """The optimizer state's lost share (its per-element tensors: Adam's moments), averaged over the run."""
        history = self.state_history
        return sum(v for _, v in history) / len(history) if history else None

    @property
    def unmeasurable(self) -> list[str]:
        """Optimizer classes whose step could not be copied (their modules have no figures)."""
        return sorted(self._unmeasurable)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per module: the latest sample's ``unchanged`` and ``lost`` shares, and the worst ``lost`` seen."""
        return {
            m: {"unchanged": s.unchanged, "lost": s.lost, "worst_lost": self.worst[m], "elements": s.elements}
            for m, s in self.latest.items()
        }

    def overall(self) -> float | None:
        """The latest sample's lost share over every measured element, weighted by elements."""
        if not self.latest:
            return None
        total = sum(s.elements for s in self.latest.values())
        return sum(s.lost * s.elements for s in self.latest.values()) / total if total else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "losing": list(self.losing),
            "worst": dict(self.worst),
            "samples": self.samples,
            "history": list(self.history),
            "state_history": list(self.state_history),
            "state_latest": dict(self.state_latest),
            "streak": dict(self._streak),
            "latest": {m: vars(s).copy() for m, s in self.latest.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [tuple(point) for point in state.get("history", [])]
        self.state_latest = dict(state.get("state_latest", {}))
        self._streak = dict(state.get("streak", {}))
        self.latest = {m: UpdateSample(**s) for m, s in state.get("latest", {}).items()}
        self.state_history = [tuple(point) for point in state.get("state_history", [])]
        self.losing = list(state.get("losing", []))
        self.worst = dict(state.get("worst", {}))
        self.samples = int(state.get("samples", 0))


def module_names(model: nn.Module, stored_for: dict[int, Tensor] | None = None) -> Callable[[Tensor], str | None]:
    """``names(param)``: the module owning a parameter of ``model`` (``""``: the root), also for an fp32 master
    copy standing for it (``stored_for``: id(master) -> model parameter)."""
    owner: dict[int, str] = {}
    for fqn, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), fqn or type(model).__name__)

    def names(param: Tensor) -> str | None:
        target = stored_for.get(id(param), param) if stored_for else param
        return owner.get(id(target))

    return names

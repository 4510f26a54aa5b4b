"""Remedies for lost updates (``master_weights=``), each applied to the user's optimizer.

- ``"fp32"``: an fp32 master copy of every low-precision weight; the optimizer updates the masters (its state is
  then fp32 too) and the model's weights are rounded from them after each step: the classic recipe
  (Micikevicius et al., 2018). Works with any optimizer: its param groups are pointed at the masters in place
  (``MasterCopies``). It keeps every update, and saves no weight + gradient + optimizer bytes (it adds 4 bytes
  per parameter to fp32's 16 with Adam); what it saves is the forward's and backward's memory and time. On one
  process each backward's gradients move into the masters at once, so gradient accumulation sums in fp32 (the
  option the format offers for that); under DDP they move at the step (DDP reduces them once, in bf16).
- ``"kahan"``: a compensation buffer in the weights' dtype holds what rounding took from each update and gives it
  back on the next (Kahan summation, as the ``optimi`` optimizers do). +2 bytes per parameter in bf16. The default
  (``"auto"``) where optimi has the optimizer.
- ``"stochastic"``: the update is rounded up or down at random with the probability that makes it exact on
  average (torchao's ``_AdamW(bf16_stochastic_round=True)``). bf16 weights only. No extra bytes; its moments stay
  in bf16 and lose their own small updates (``lost.py``), which is why it is not the default.

Kahan summation and stochastic rounding live inside the optimizer's update kernel, so they need an optimizer that
does them: a torchao or optimi optimizer the user built is used as it is (the remedy turned on); in the Trainer,
``torch.optim`` Adam, AdamW and SGD are replaced at setup by the equivalent one with the same param groups and
hyperparameters (``replacement``); anything else gets one message saying what to use. With Fabric, which hands
the optimizer to the user before the plugin sees it, the user builds the library's optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_mp.errors import ConfigError

__all__ = ["MASTER_WEIGHTS", "MasterCopies", "applies_remedy", "has_replacement", "replacement", "resolve_remedy"]

MASTER_WEIGHTS: tuple[Any, ...] = ("auto", "fp32", "kahan", "stochastic", None)
LOW = (torch.bfloat16, torch.float16)

# torch.optim param-group keys that choose a kernel (dropped when replacing) and the ones that change the update
# (refused when set: the replacement has no such option).
_KERNEL = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay")


def _is_torchao_adamw(optimizer: Optimizer) -> bool:
    return type(optimizer).__module__.startswith("torchao.optim") and hasattr(optimizer, "bf16_stochastic_round")


def _is_optimi(optimizer: Optimizer) -> bool:
    return type(optimizer).__module__.startswith("optimi") and "kahan_sum" in optimizer.defaults


def applies_remedy(optimizer: Optimizer, remedy: str) -> bool:
    """Whether ``optimizer`` is a library optimizer that can apply ``remedy`` itself (turned on by ``enable``)."""
    if remedy == "stochastic":
        return _is_torchao_adamw(optimizer)
    if remedy == "kahan":
        return _is_optimi(optimizer)
    return False


def enable(optimizer: Optimizer, remedy: str) -> None:
    """Turn the remedy on in a library optimizer that has it (``applies_remedy``)."""
    if remedy == "stochastic":
        optimizer.bf16_stochastic_round = True
    elif remedy == "kahan":
        optimizer.defaults["kahan_sum"] = True
        for group in optimizer.param_groups:
            group["kahan_sum"] = True


def _groups(optimizer: Optimizer, rename: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> list[dict]:
    groups = []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k not in _KERNEL and k not in drop}
        for old, new in (rename or {}).items():
            if old in settings:
                value = settings.pop(old)
                settings.update(new(value) if callable(new) else {new: value})
        groups.append(settings)
    return groups


def _refuse(remedy: str, optimizer: Optimizer, why: str) -> ConfigError:
    use = {
        "stochastic": "torchao.optim._AdamW(..., bf16_stochastic_round=True)",
        "kahan": "an optimi optimizer (optimi.AdamW, optimi.SGD, optimi.Lion, ...: pip install torch-optimi)",
    }[remedy]
    return ConfigError(
        f"AdaptiveMP(master_weights={remedy!r}) is invalid with {type(optimizer).__name__}: {why}. Build the"
        f" optimizer as {use}, or use master_weights='fp32' (an fp32 master copy works with any optimizer)."
    )


def replacement(optimizer: Optimizer, remedy: str) -> Optimizer:
    """The library optimizer that applies ``remedy`` with ``optimizer``'s param groups and hyperparameters (its
    state is carried over too). Raises ``ConfigError`` naming what to use when there is none."""
    kind = type(optimizer)
    flags = {k for g in optimizer.param_groups for k in ("maximize", "differentiable") if g.get(k)}
    if flags:
        raise _refuse(remedy, optimizer, f"{sorted(flags)} have no equivalent")
    decoupled = kind is torch.optim.AdamW or optimizer.defaults.get("decoupled_weight_decay", False)
    if remedy == "stochastic":
        from lightning_mp._compat import torchao_adamw

        no_decay = all(g.get("weight_decay", 0) == 0 for g in optimizer.param_groups)
        if kind not in (torch.optim.Adam, torch.optim.AdamW) or not (decoupled or no_decay):
            raise _refuse(remedy, optimizer, "torchao rounds stochastically in AdamW only (Adam without weight decay)")
        new = torchao_adamw()(_groups(optimizer), lr=optimizer.defaults["lr"], bf16_stochastic_round=True)
    else:
        import optimi

        if kind in (torch.optim.Adam, torch.optim.AdamW):
            if any(g.get("amsgrad") for g in optimizer.param_groups):
                raise _refuse(remedy, optimizer, "optimi has no amsgrad")
            betas = {"betas": lambda b: {"beta1": b[0], "beta2": b[1]}}
            cls = optimi.AdamW if decoupled else optimi.Adam
            new = cls(_groups(optimizer, betas, drop=("amsgrad",)), lr=optimizer.defaults["lr"], kahan_sum=True)
        elif kind is torch.optim.SGD:
            if any(g.get("nesterov") or g.get("dampening") for g in optimizer.param_groups):
                raise _refuse(remedy, optimizer, "optimi's SGD has no nesterov or dampening")
            groups = _groups(optimizer, drop=("nesterov", "dampening"))
            new = optimi.SGD(groups, lr=optimizer.defaults["lr"], torch_init=True, kahan_sum=True)
        else:
            raise _refuse(remedy, optimizer, "no optimi equivalent is known for it")
    for old, fresh in zip(_params(optimizer), _params(new)):
        if optimizer.state.get(old):
            new.state[fresh] = dict(optimizer.state[old])
    return new


def _params(optimizer: Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def resolve_remedy(requested: Any, optimizer: Optimizer, weights_dtype: torch.dtype, replaceable: bool) -> Any:
    """What ``master_weights="auto"`` means for this optimizer, from the measurements (RESULTS.md, "Low-precision
    weights"): Kahan summation where optimi has the optimizer (within noise of fp32 on the NLP recipe at 62% of its
    weight + gradient + optimizer bytes), else fp32 master copies (within noise, any optimizer, no bytes saved).
    Stochastic rounding is not chosen for you: at 50% of the bytes it was worse than fp32 by 0.023 accuracy there
    (its Adam moments stay in bf16 and round their updates away). fp16 weights get fp32 masters (the gradients are
    then unscaled in fp32). An explicit choice is returned as it is."""
    if isinstance(optimizer, torch.optim.LBFGS):  # it keeps its own list of parameters and steps inside step()
        if requested not in ("auto", None):
            raise ConfigError(
                f"AdaptiveMP(master_weights={requested!r}) is invalid with LBFGS: it keeps its own list of the"
                " parameters and re-evaluates its closure inside step(), so no remedy can stand between; use"
                " master_weights=None."
            )
        return None
    if requested != "auto":
        return requested
    if weights_dtype == torch.float16:
        return "fp32"
    if applies_remedy(optimizer, "kahan"):
        return "kahan"
    if applies_remedy(optimizer, "stochastic"):
        return "stochastic"  # the user built torchao's rounding optimizer: theirs to keep
    return "kahan" if replaceable and has_replacement(optimizer, "kahan") else "fp32"


def has_replacement(optimizer: Optimizer, remedy: str) -> bool:
    """A library optimizer can apply ``remedy`` in place of ``optimizer`` (``replacement`` would build it)."""
    try:
        replacement(optimizer, remedy)
    except (ConfigError, ImportError):
        return False
    return True


def _upcast(value: Any, param: Tensor) -> Any:
    """A per-element state tensor of a low-precision weight, in fp32 (exactly) for its fp32 master."""
    if isinstance(value, Tensor) and value.dtype in LOW and value.shape == param.shape:
        return value.float()
    return value


class MasterCopies:
    """fp32 master copies of one optimizer's low-precision parameters.

    The optimizer's param groups are pointed at the masters (in place: the user's optimizer object, its LR
    scheduler and Lightning's wrapper stay the same). ``gather()`` moves the model's gradients into the masters'
    (fp32) before they are unscaled, guarded or clipped, and frees the low-precision ones; ``scatter()`` rounds the
    updated masters into the model's weights after the step.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.pairs: list[tuple[Tensor, Tensor]] = []  # (model parameter, its fp32 master)
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if p.dtype in LOW:
                    master = p.detach().float().requires_grad_(p.requires_grad)
                    self.pairs.append((p, master))
                    if p in optimizer.state:  # (Fabric: loaded before the first step, cast to the bf16 weight)
                        state = optimizer.state.pop(p)
                        optimizer.state[master] = {k: _upcast(v, p) for k, v in state.items()}
                    params.append(master)
                else:
                    params.append(p)
            group["params"] = params

    @property
    def stands_for(self) -> dict[int, Tensor]:
        """id(master) -> the model parameter it is the master of."""
        return {id(m): p for p, m in self.pairs}

    def gather(self) -> None:
        """The model's gradients, added into the masters' in fp32, then freed."""
        with torch.no_grad():
            for p, master in self.pairs:
                if p.grad is None:
                    continue
                if master.grad is None:
                    master.grad = p.grad.float()
                else:
                    master.grad.add_(p.grad)
                p.grad = None

    def scatter(self) -> None:
        """Round the masters into the model's weights (an fp32 module promoted mid-run takes them exactly)."""
        with torch.no_grad():
            for p, master in self.pairs:
                p.copy_(master)

    def state_dict(self) -> list[Tensor]:
        return [m.detach().clone() for _, m in self.pairs]

    def load_state_dict(self, masters: list[Tensor]) -> None:
        if len(masters) != len(self.pairs):
            raise ConfigError(
                f"AdaptiveMP: the checkpoint has {len(masters)} fp32 master weights for an optimizer with"
                f" {len(self.pairs)} low-precision parameters: it was saved from another model or optimizer."
            )
        with torch.no_grad():
            for (p, master), saved in zip(self.pairs, masters):
                master.copy_(saved)
                p.copy_(master)

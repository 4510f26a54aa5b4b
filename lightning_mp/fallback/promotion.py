"""Promotions: which modules run in fp32 and why, when blame turns into a promotion, and the spike rule after one.

``FallbackManager`` applies the static selection and the format's defaults at setup, decides what a bad step's
evidence promotes (``promote_blamed``) and records every promotion. ``PromotionRule`` turns repeated blame into
a promotion (``promote_after`` blames within ``promote_window`` optimizer steps), the same on every rank that
feeds it the same combined evidence. ``SpikeRule`` is the sanity rule after a promotion.

What is promoted is what the evidence names, never chosen by size: the module running the operation that
overflowed. A leaf holds the operation and runs in fp32 whole; a module with submodules ran it in its own code,
so only that code does (an own-code island, ``islands.py``). Bad batches and bad losses are never blamed, and a
backward overflow only when a lower loss scale cannot help.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass
from enum import Enum
from statistics import median
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mp._grads import distributed
from lightning_mp.errors import ConfigError
from lightning_mp.fallback.filters import by_type, fp32_filter, pattern_misses, prefixed_suggestions
from lightning_mp.fallback.islands import Scope, apply_fp32

__all__ = ["SPIKE_FACTOR", "FallbackManager", "Promotion", "PromotionRule", "Reason", "SpikeRule"]


class Reason(str, Enum):
    """Why a module runs in fp32."""

    STATIC = "static"  # listed in fp32_modules
    DEFAULT = "default"  # the format's fp32_defaults
    OVERFLOW = "overflow"  # blamed for repeated overflows
    KERNEL_ERROR = "kernel error"  # its low-precision kernel raised
    ESCALATION = "escalation"  # the escalation ladder's PROMOTE (or LEAVE_LOW_BIT) rung
    QUANTIZATION = "quantization"  # a low-bit layer's measurements crossed a threshold (``lowbit.layers``)

    def __str__(self) -> str:
        return self.value


RUN_TIME = (Reason.OVERFLOW, Reason.KERNEL_ERROR, Reason.ESCALATION, Reason.QUANTIZATION)


@dataclass(frozen=True)
class Promotion:
    """One module running in fp32 and why; ``scope="low_bit"``: a low-bit (fp8/int8) layer moved back to the
    autocast dtype (bf16), not to fp32."""

    module: str
    reason: Reason
    step: int | None = None
    detail: str = ""
    scope: str = "module"  # "module": the whole module in fp32; "own_code": its own operations; "low_bit": bf16


class PromotionRule:
    """Decides when blame turns into promotion: ``promote_after`` blames within ``window`` optimizer steps.

    Pure bookkeeping over fqns and step numbers, so every rank that feeds it the same combined evidence
    reaches the same decision.
    """

    def __init__(self, promote_after: int = 2, window: int = 100) -> None:
        if not isinstance(promote_after, int) or isinstance(promote_after, bool) or promote_after < 1:
            raise ValueError(f"promote_after={promote_after!r} is invalid: must be an integer >= 1.")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"promote_window={window!r} is invalid: must be an integer >= 1.")
        self.promote_after = promote_after
        self.window = window
        self._blames: dict[str, deque[int]] = {}

    def blame(self, fqn: str, step: int) -> bool:
        """Record one blame; True when the module should be promoted now."""
        history = self._blames.setdefault(fqn, deque())
        history.append(step)
        while history and history[0] <= step - self.window:
            history.popleft()
        if len(history) >= self.promote_after:
            del self._blames[fqn]
            return True
        return False


class FallbackManager:
    """Which modules run in fp32 and why: static selection, per-precision defaults, run-time promotions.

    Args:
        fp32_modules: classes, fqn glob patterns or filters (see ``fp32_filter``) that always run in fp32.
        defaults: also run the format's ``fp32_defaults`` in fp32.
        promote_after: blames within ``promote_window`` optimizer steps that promote a module.
        promote_window: see ``promote_after``.
    """

    def __init__(
        self, fp32_modules: Any = (), defaults: bool = True, promote_after: int = 2, promote_window: int = 100
    ):
        self.spec = fp32_modules
        self.filter = fp32_filter(fp32_modules) if fp32_modules else None
        self.defaults = defaults
        self.rule = PromotionRule(promote_after, promote_window)
        self.promotions: dict[str, Promotion] = {}
        self.low_bit: Any = None  # the run's LowBitLayers: a low-bit layer is promoted to bf16 first
        self.low_dtype: torch.dtype | None = None  # low-precision weights: islands keep fp32 weights
        self.refused: list[str] = []  # blamed, but not promoted (low-precision weights under DDP / FSDP2)

    def setup(
        self,
        model: nn.Module,
        default_types: tuple[type[nn.Module], ...],
        device_type: str,
        low_dtype: torch.dtype | None = None,
    ) -> None:
        """Apply the static selection and the defaults. Raises if a glob pattern matches nothing."""
        self.low_dtype = low_dtype
        if self.spec:
            misses = pattern_misses(self.spec, model)
            if misses:
                names = [fqn for fqn, _ in model.named_modules() if fqn]
                shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
                hints = [hint for miss in misses for hint in prefixed_suggestions(miss, model)]
                hint = f" Did you mean {', '.join(hints)}? " if hints else " "
                raise ConfigError(
                    f"AdaptiveMP(fp32_modules=...) pattern(s) {misses} match no module of"
                    f" {type(model).__name__}.{hint}Names are relative to the model given to the plugin (the"
                    f" LightningModule); its modules are: {shown}."
                )
            for fqn in apply_fp32(model, self.filter, device_type, low_dtype=low_dtype):
                self.promotions[fqn] = Promotion(fqn, Reason.STATIC)
        if self.defaults and default_types:
            for fqn in apply_fp32(model, by_type(*default_types), device_type, low_dtype=low_dtype):
                self.promotions[fqn] = Promotion(fqn, Reason.DEFAULT)

    def selected(self, model: nn.Module, default_types: tuple[type[nn.Module], ...]) -> list[str]:
        """What ``setup`` will make fp32 islands (before it does: low-precision weights leave them in fp32)."""
        rules = [rule for rule in (self.filter, by_type(*default_types) if self.defaults and default_types else None)]
        return [fqn for fqn, module in model.named_modules() if fqn and any(r and r(module, fqn) for r in rules)]

    def promote(
        self,
        model: nn.Module,
        fqn: str,
        reason: Reason,
        device_type: str,
        step: int | None = None,
        detail: str = "",
        scope: Scope = "module",
    ) -> bool:
        """Make ``fqn`` an fp32 island of ``scope`` now (a low-bit layer: move it back to bf16); False if it
        already was one."""
        if self.low_bit is not None and self.low_bit.is_low_bit(fqn):
            return self.low_bit.move_back(fqn, Promotion(fqn, Reason(reason), step, detail, "low_bit"))
        if self.low_bit is not None and scope == "module":  # a block whole in fp32: its low-bit layers too
            for inner in [name for name in self.low_bit.layers if name.startswith(f"{fqn}.")]:
                self.low_bit.move_back(inner, Promotion(inner, Reason(reason), step, f"inside {fqn}", "low_bit"))
        if self.low_dtype is not None and distributed() and fqn not in self.promotions:
            # DDP's buckets and FSDP2's shards were built for the weights' dtype: an fp32 island made now would
            # change a parameter's dtype under them. Static fp32_modules (converted before wrapping) are fine.
            if fqn not in self.refused:
                self.refused.append(fqn)
                warnings.warn(
                    f"AdaptiveMP: {fqn} was blamed enough to run in fp32, but with low-precision weights under a"
                    " distributed strategy its weights cannot change dtype mid-run; it stays in the weights' dtype."
                    f" Name it in fp32_modules to run it in fp32 from the start.",
                    stacklevel=2,
                )
            return False
        if fqn in self.promotions or not apply_fp32(model, [fqn], device_type, scope, self.low_dtype):
            return False
        self.promotions[fqn] = Promotion(fqn, Reason(reason), step, detail, scope)
        return True

    def promote_blamed(
        self, model: nn.Module, finding: Any, step: int, device_type: str, scaling_can_help: bool
    ) -> Promotion | None:
        """Blame the module a bad step's evidence names; the promotion when the blame repeats, else ``None``.

        Layers are blamed, never bad batches or bad losses; a backward overflow only when scaling cannot help.
        """
        if finding.module is None or finding.phase in ("input", "loss"):
            return None
        if finding.phase == "backward" and scaling_can_help:
            return None
        if not self.rule.blame(finding.module, step):
            return None
        scope: Scope = "own_code" if _has_children(model, finding.module) else "module"
        if not self.promote(model, finding.module, Reason.OVERFLOW, device_type, step, finding.phase, scope):
            return None
        return self.latest(finding.module)

    def latest(self, fqn: str) -> Promotion:
        """The promotion just made of ``fqn`` (to fp32, or a low-bit layer's back to bf16)."""
        if fqn in self.promotions:
            return self.promotions[fqn]
        return self.low_bit.moved[fqn]

    @property
    def all_promotions(self) -> list[Promotion]:
        """fp32 promotions, then low-bit layers moved back to bf16."""
        moved = [p for p in self.low_bit.moved.values() if p is not None] if self.low_bit is not None else []
        return [*self.promotions.values(), *moved]

    def state_dict(self) -> list[dict[str, Any]]:
        return [{**vars(p), "reason": p.reason.value} for p in self.promotions.values() if p.reason in RUN_TIME]

    def load_state_dict(self, model: nn.Module, promotions: list[dict[str, Any]], device_type: str) -> None:
        """Re-apply run-time promotions from a checkpoint, so a resumed run does not repeat their overflows."""
        names = {fqn for fqn, _ in model.named_modules()}
        for entry in promotions:
            if entry["module"] in names:
                fqn, reason, step, detail = entry["module"], entry["reason"], entry.get("step"), entry.get("detail", "")
                self.promote(model, fqn, reason, device_type, step, detail, entry.get("scope", "module"))


def _has_children(model: nn.Module, fqn: str) -> bool:
    try:
        module = model.get_submodule(fqn)
    except AttributeError:  # a name from another model (a resumed checkpoint)
        return False
    return next(module.children(), None) is not None


def promotion_message(promotion: Promotion, finding: Any, low: str) -> str:
    """The warning of a promotion for repeated overflows, with where they were born when a replay said so."""
    where = f" at {finding.op}" + (f" ({finding.source})" if finding.source else "") if finding.op else ""
    if promotion.scope == "low_bit":
        return (
            f"AdaptiveMP: {promotion.module} multiplies in bf16 from now on (was {low}): repeated {finding.phase}"
            f" overflows{where}."
        )
    if promotion.scope == "module":
        return f"AdaptiveMP: {promotion.module} runs in fp32 from now on: repeated {finding.phase} overflows{where}."
    return (
        f"AdaptiveMP: {promotion.module}'s own code runs in fp32 from now on (its submodules keep {low}): repeated"
        f" {finding.phase} overflows{where} in its forward. To narrow it to the lines that overflow, run them"
        " with `with lightning_mp.fp32(): ...` (cast their inputs with .float()) instead."
    )


# The sanity rule after a promotion. A module promoted to fp32 turns an overflow into a finite value; if the
# harm itself recurs (a bad batch, a diverging layer), the next such step is finite but huge, and applying it
# would wreck the weights the skip protected. So for ``promote_window`` steps after a promotion, a step whose
# loss (mean magnitude over its backward passes) exceeds SPIKE_FACTOR times the median of the last SPIKE_HISTORY
# clean steps' losses before the promotion is skipped as a "spike". It reads the loss on the host once per step,
# only in that window (a clean run never pays it).
SPIKE_FACTOR = 100.0
SPIKE_HISTORY = 16


class SpikeRule:
    """After a promotion, skip a step whose loss is finite but SPIKE_FACTOR times the recent clean losses.

    Args:
        window: optimizer steps the rule watches after a promotion (``promote_window``).
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._clean: deque[list[Tensor]] = deque(maxlen=SPIKE_HISTORY)  # references; read after a promotion
        self._until = 0  # last optimizer step of the window (0: no window open)
        self._reference: float | None = None  # median recent loss magnitude before the promotion

    def clean_step(self, losses: list[Tensor]) -> None:
        """A step was taken: its losses (references, never read unless a promotion follows) join the history."""
        self._clean.append(losses)

    def open(self, step: int) -> None:
        """A module was just promoted at ``step``: judge the next ``window`` steps' losses against the recent."""
        losses = [v for v in (_loss_magnitude(s) for s in self._clean if s) if math.isfinite(v)]
        if losses:  # nothing to compare with on the first steps
            self._reference = median(losses)
            self._until = step + self.window

    def ratio(self, step: int, losses: list[Tensor]) -> float | None:
        """In the window: this step's loss over the reference when finite and above SPIKE_FACTOR times it."""
        if step > self._until or self._reference is None or not losses:
            return None
        value = _loss_magnitude(losses)  # the one host read
        reference = max(self._reference, 1e-12)
        return value / reference if math.isfinite(value) and value > SPIKE_FACTOR * reference else None

    def clear(self) -> None:
        self._clean.clear()


def _loss_magnitude(losses: list[Tensor]) -> float:
    """Mean magnitude of a step's losses (one per backward pass), read on the host."""
    return float(torch.stack([t.float().abs().mean() for t in losses]).mean())

"""``Decisions``: what a step's outcome leads to, in order: count it, put back what a skip must not keep, promote
the module the evidence names (on repeated blame), climb the escalation ladder when skipping gets nowhere, and
record the event. Also the two decisions taken before a step: the spike rule after a promotion, and the promotion
of a module whose low-precision kernel raised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lightning_mp.diagnosis.attribution import Finding, OverflowTracker, is_kernel_error, module_from_traceback
from lightning_mp.fallback.escalation import Escalation, EscalationLadder, Rung, give_up_message
from lightning_mp.fallback.promotion import FallbackManager, Promotion, Reason, SpikeRule, promotion_message
from lightning_mp.formats import resolve_auto_precision
from lightning_mp.lowbit.layers import LowBitLayers
from lightning_mp.options import PluginOptions
from lightning_mp.reporting.ledger import RunLedger
from lightning_mp.scaling import LossScaleFloorError
from lightning_mp.scaling.rescue import Rescue
from lightning_mp.step.batch import Batch
from lightning_mp.step.precision import RunPrecision

__all__ = ["Decisions", "first_line"]


class Decisions:
    """The decisions of one run, taken after (and just before) each optimizer step.

    Args:
        options: ``auto_fallback`` and the promotion / escalation knobs.
        precision: the format in force (a promotion's message names it; the ladder may switch it).
        batch: the step's batch (whether another optimizer already stepped on it).
        tracker: this step's losses (the spike rule, the clean-loss history).
        rescue: whether the step was rescued, or stayed non-finite without scaling.
        warn: how to tell the user.
    """

    def __init__(
        self,
        options: PluginOptions,
        precision: RunPrecision,
        batch: Batch,
        tracker: OverflowTracker,
        rescue: Rescue,
        warn: Callable[[str], None],
    ) -> None:
        self.options, self.precision, self.batch, self.tracker, self.rescue = options, precision, batch, tracker, rescue
        self.warn = warn
        self.fallback = FallbackManager(
            options.fp32_modules, options.fp32_defaults, options.promote_after, options.promote_window
        )
        self.low_bit = LowBitLayers(
            options.low_bit_recipe, options.low_bit_modules, options.bf16_modules, options.auto_fallback
        )
        self.fallback.low_bit = self.low_bit
        self.spikes = SpikeRule(options.promote_window)
        self.ladder = EscalationLadder(options.max_consecutive_skips)
        self.ledger = RunLedger(options.max_events)
        self.model: nn.Module | None = None
        self._last_skipped: dict[int | None, bool] = {}  # id(optimizer) (None: any) -> its last step skipped
        self._floor_pending = False  # the scale reached its floor on a step whose event was already recorded

    def step_was_skipped(self, optimizer: Optimizer | None = None) -> bool:
        """Whether the last step of ``optimizer`` (``None``: of any optimizer) was skipped."""
        return self._last_skipped.get(id(optimizer) if optimizer is not None else None, False)

    # ------------------------------------------------------------------------------- before the step
    def spike(self, optimizer: Optimizer) -> float | None:
        """After a promotion: this step's loss over the recent clean losses when it is a spike, else ``None``."""
        if not self.precision.stepper.can_skip_before_step(optimizer):
            return None
        return self.spikes.ratio(self.ledger.optimizer_steps, self.tracker.losses)

    def promote_after_kernel_error(self, error: BaseException) -> bool:
        """Promote the module whose low-precision kernel raised ``error``; False when that is not the case."""
        model = self.model
        if not (self.options.auto_fallback and self.precision.low_precision and is_kernel_error(error)):
            return False
        fqn = module_from_traceback(error, model) if model is not None else None
        if fqn is None:
            return False
        # The error was raised in the innermost running module's own code: a leaf whole, a container's own code.
        scope = "own_code" if next(model.get_submodule(fqn).children(), None) is not None else "module"
        detail, step, device = first_line(error), self.ledger.optimizer_steps, self.precision.device
        if not self.fallback.promote(model, fqn, Reason.KERNEL_ERROR, device, step, detail, scope):
            return False
        if self.fallback.latest(fqn).scope == "low_bit":
            self.warn(
                f"AdaptiveMP: {fqn} multiplies in bf16 from now on: its {self.low_bit.kind} kernel failed ({detail})."
            )
            return True
        what = f"{fqn}'s own code" if scope == "own_code" else fqn
        self.warn(f"AdaptiveMP: {what} runs in fp32 from now on: its {self.precision.name} kernel failed ({detail}).")
        return True

    def move_low_bit(self, moves: list[tuple[str, str]]) -> None:
        """Move back to bf16 the low-bit layers whose measurements said so (``LowBitLayers.collect``)."""
        step = self.ledger.optimizer_steps
        for fqn, why in moves:
            promotion = Promotion(fqn, Reason.QUANTIZATION, step, why, "low_bit")
            if self.low_bit.move_back(fqn, promotion):
                self.warn(f"AdaptiveMP: {fqn} multiplies in bf16 from now on (was {self.low_bit.kind}): {why}.")

    # -------------------------------------------------------------------------------- after the step
    def after_step(
        self,
        optimizer: Optimizer,
        finding: Finding | None,
        repeat: bool,
        *,
        skipped: bool,
        scale: float | None,
        spike: float | None = None,
    ) -> None:
        """Count the step, promote a repeatedly blamed module, climb the ladder if due, record the event.

        ``repeat``: the batch was already attributed for another optimizer (manual optimization); its step is
        skipped too, but the bad batch is one event, already recorded. ``skipped`` without a ``finding``: a fused
        optimizer's own skip, found after the fact (counted, not attributed).
        """
        self._last_skipped[id(optimizer)] = self._last_skipped[None] = skipped
        self.ledger.step_ended(skipped, self.rescue.rescued)
        if not skipped:
            self.batch.stepped = True
            self.spikes.clean_step(self.tracker.losses)
        elif not self.batch.stepped:
            # "Skipped" means nothing changed, BatchNorm statistics included. Once another optimizer has stepped
            # cleanly on this batch (a GAN's generator), its forward's buffer updates stay with that step.
            self.batch.buffers.restore()
        stepper = self.precision.stepper
        at_floor = stepper.at_floor
        if repeat:
            self._floor_pending |= at_floor  # climbed with the next recorded event
            return
        at_floor, self._floor_pending = at_floor or self._floor_pending, False
        why = self.ladder.observe(skipped, at_floor)
        if finding is None:
            return
        promotion = self._promote_blamed(finding)
        action = stepper.last_action  # before a switch to bf16 drops the scaler
        escalation = self._escalate(why, finding.module or self.ledger.last_blamed_module()) if why else None
        if promotion is not None or (escalation is not None and escalation.rung is Rung.PROMOTE):
            self.spikes.open(self.ledger.optimizer_steps)
        self.ledger.record(finding, scale, action, promotion, escalation, spike)
        if escalation is not None and escalation.rung is Rung.GIVE_UP:
            raise LossScaleFloorError(give_up_message(escalation.reason, self.ledger.events[-5:]))

    def _promote_blamed(self, finding: Finding) -> Promotion | None:
        if not self.options.auto_fallback or self.model is None:
            return None
        can_help = self.precision.stepper.can_help() and not self.rescue.nonfinite_unscaled
        step, device = self.ledger.optimizer_steps, self.precision.device
        promotion = self.fallback.promote_blamed(self.model, finding, step, device, can_help)
        if promotion is not None:
            self.warn(promotion_message(promotion, finding, self.precision.format.short))
        return promotion

    def _escalate(self, why: str, blamed: str | None) -> Escalation:
        """Take the first rung of the ladder that applies (``GIVE_UP`` is raised by the caller)."""
        self.precision.stepper.acknowledge_floor()
        names = [fqn for fqn, _ in self.model.named_modules() if fqn] if self.model is not None else []
        device = self.precision.device
        can_switch = self.precision.format.scaled and resolve_auto_precision(device) == "bf16-mixed"
        low_bit_left = bool(self.low_bit.layers)
        for candidate in self.ladder.candidates(why, blamed, self.fallback.promotions, names, can_switch, low_bit_left):
            if candidate.rung is Rung.PROMOTE:
                step = self.ledger.optimizer_steps
                if self.fallback.promote(self.model, candidate.module, Reason.ESCALATION, device, step, why):
                    now = (
                        "multiplies in bf16"
                        if self.fallback.latest(candidate.module).scope == "low_bit"
                        else "runs in fp32"
                    )
                    self.warn(f"AdaptiveMP escalation: {why}; {candidate.module} {now} from now on.")
                    return candidate
                continue
            if candidate.rung is Rung.LEAVE_LOW_BIT:
                step = self.ledger.optimizer_steps
                layers = list(self.low_bit.layers)
                for fqn in layers:
                    self.low_bit.move_back(fqn, Promotion(fqn, Reason.ESCALATION, step, why, "low_bit"))
                kind = self.low_bit.kind
                self.warn(f"AdaptiveMP escalation: {why}; {len(layers)} {kind} layer(s) multiply in bf16 from now on.")
            if candidate.rung is Rung.SWITCH_TO_BF16:
                self.warn(f"AdaptiveMP escalation: {why}; switching from fp16 to bf16 (same range as fp32).")
                self.precision.switch_to_bf16()
            return candidate
        raise AssertionError("the ladder always ends with GIVE_UP")

    # ----------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "promotions": self.fallback.state_dict(),
            "low_bit": self.low_bit.state_dict(),
            "ladder": self.ladder.state_dict(),
            **self.ledger.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state)
        self.ladder.load_state_dict(state.get("ladder", {}))
        if self.model is not None:
            # Low-bit moves first: a layer moved to bf16 and later promoted to fp32 is re-promoted from bf16.
            self.low_bit.load_state_dict(state.get("low_bit", {}), _promotion_from)
            self.fallback.load_state_dict(self.model, state.get("promotions", ()), self.precision.device)


def _promotion_from(entry: dict[str, Any]) -> Promotion:
    keys = ("module", "reason", "step", "detail", "scope")
    return Promotion(**{k: (Reason(v) if k == "reason" else v) for k, v in entry.items() if k in keys})


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__

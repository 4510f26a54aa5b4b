"""``OverflowEvent``: one skipped step, where it went non-finite, and what was done about it (typed fields)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from lightning_mp.diagnosis.attribution import Kind, Phase
from lightning_mp.fallback.escalation import Rung
from lightning_mp.fallback.promotion import SPIKE_FACTOR
from lightning_mp.scaling import ScaleAction

__all__ = ["OverflowEvent"]


@dataclass(frozen=True)
class OverflowEvent:
    """One skipped step, attributed to where its non-finite value started, and what was done about it.

    ``module`` is the fully qualified name of the module (``encoder.layers.3.attn``), or ``None`` when the
    phase has no module (``input``, ``loss``) or the forward pass was not localized yet. ``action`` is the
    display text of the typed fields after it (``"skipped; scale backed off"``), built from them.
    """

    step: int
    phase: Phase
    module: str | None
    kind: Kind
    dtype: str
    scale: float | None
    action: str = ""
    seq: int = 0  # this event's number in the run, from 1; never reused
    scaler_action: ScaleAction | None = None  # what the loss scaler did on this step (fp16)
    promoted: str | None = None  # the module promoted to fp32 for repeated blame at this event
    promoted_scope: str | None = None  # "module" (all of it) or "own_code" (its own operations only)
    spike_ratio: float | None = None  # a loss spike: this step's loss over the median before the last promotion
    escalation: Rung | None = None  # the escalation rung taken at this event
    escalated_module: str | None = None  # the module the PROMOTE rung put in fp32
    op: str | None = None  # the operation that produced the first non-finite value ("aten::softmax"), from a replay
    source: str | None = None  # the user's line that ran it ("model.py:67"), from a replay
    reproduced: bool | None = None  # the replay went bad the same way (None: no replay ran)

    def __post_init__(self) -> None:
        if not self.action:
            object.__setattr__(self, "action", self._describe())

    def _describe(self) -> str:
        if self.spike_ratio is not None:
            return (
                f"skipped as a loss spike: finite, but {self.spike_ratio:.3g}x the median loss before the last"
                f" promotion (more than {SPIKE_FACTOR:g}x within promote_window steps of a promotion)"
            )
        words = ["skipped"]
        if self.scaler_action is not None and self.scaler_action.text:
            words.append(self.scaler_action.text)
        if self.promoted is not None:
            own = "'s own code" if self.promoted_scope == "own_code" else ""
            words.append(f"promoted {self.promoted}{own} to fp32")
        if self.escalation is Rung.PROMOTE:
            words.append(f"escalation: promoted {self.escalated_module} to fp32")
        elif self.escalation is Rung.SWITCH_TO_BF16:
            words.append("escalation: switched fp16 to bf16")
        return "; ".join(words)

    @property
    def where(self) -> str:
        """Where it went non-finite, in one line: ``"blocks.1.attn: aten::softmax in float16 produced inf
        (model.py:67)"``; without a replay, what the cheap attribution knows (``"forward (inf, float16)"``)."""
        place = self.module or {"loss": "the loss", "input": "the batch"}.get(self.phase, f"{self.phase} pass")
        if self.op is None:
            return f"{place}: {self.phase} value {self.kind} ({self.dtype})"
        backward = " in backward" if self.phase == "backward" else ""
        line = f" ({self.source})" if self.source else ""
        return f"{place}: {self.op}{backward} in {self.dtype} produced {self.kind}{line}"

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (enums as their strings): JSON and ``torch.load(weights_only=True)`` safe."""
        return {k: v.value if isinstance(v, Enum) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OverflowEvent:
        """The inverse of ``to_dict``."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("scaler_action") is not None:
            values["scaler_action"] = ScaleAction(values["scaler_action"])
        if values.get("escalation") is not None:
            values["escalation"] = Rung(values["escalation"])
        return cls(**values)

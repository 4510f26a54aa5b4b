"""``LowBitLayers``: one run's fp8/int8 layers: converted at setup, watched on sampled steps, moved back to bf16.

A layer moves back to bf16 (a plain ``nn.Linear`` with the same ``Parameter`` objects: the optimizer state is
untouched; autocast then runs it in bf16) when:

- the step's replay blames it for a non-finite value ``promote_after`` times within ``promote_window`` steps, as
  for fp16 (``FallbackManager.promote`` routes a low-bit layer here; a second round of blame then promotes the
  bf16 layer to fp32 as usual), or its low-bit kernel raises;
- on ``PATIENCE`` sampled steps in a row its measurements cross a threshold (``judge``);
- the escalation ladder's ``LEAVE_LOW_BIT`` rung moves every remaining one (steps keep being skipped).

Each move is a ``Promotion`` with ``scope="low_bit"``, its reason and step, recorded in the ledger and the report.
Decisions from measurements are combined across ranks (a layer moves on every rank or on none).

The thresholds, and why:

- ``SNR_FLOOR_DB = 10``: the GEMM's median-row error energy is over a tenth of its signal. Healthy layers
  measure 25-30 dB in fp8 e4m3 (3 mantissa bits: about 2^-4 relative rounding per operand) and 35-45 dB in
  row-wise int8; 10 dB is far below both, so that noise alone never moves a layer;
- ``UNDERFLOW_LIMIT = 0.25``: a quarter of an operand's non-zero values quantize to zero. The dynamic scale puts
  an operand's largest value at the top of the range, and the format reaches down about 17.8 binades below it in
  e4m3 (448 down to the smallest subnormal, 2^-9), 31.8 in e5m2 and 7 in int8 (127 steps per row): healthy
  layers lose under 2%. A quarter lost means one huge value squeezes the rest out, the failure the SNR alone can
  miss when the rest is small in energy;
- ``SATURATION_LIMIT = 0.01``: a hundredth of the values clipped at the format's largest value;
- ``PATIENCE = 2``: two sampled steps in a row, so one odd batch does not move a layer.

A sample whose operands or output are not finite is not judged (the step's guard and attribution deal with it):
one inf in an input would otherwise read as "everything else quantizes to zero".
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_mp._grads import all_reduce
from lightning_mp.lowbit.convert import convert, require_torchao, revert, select
from lightning_mp.lowbit.watch import LayerSample, LowBitWatch

__all__ = ["PATIENCE", "SATURATION_LIMIT", "SNR_FLOOR_DB", "UNDERFLOW_LIMIT", "LowBitLayers"]

SNR_FLOOR_DB = 10.0
UNDERFLOW_LIMIT = 0.25
SATURATION_LIMIT = 0.01
PATIENCE = 2


# Models converted once, and their layers: a later fit or validate adopts them as they are (a layer moved back
# in an earlier fit stays in bf16) instead of converting the model again.
_CONVERTED: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()


def _converted_types() -> tuple[type[nn.Module], ...]:
    from torchao.float8.float8_linear import Float8Linear
    from torchao.prototype.quantized_training import Int8MixedPrecisionTrainingLinear

    return Float8Linear, Int8MixedPrecisionTrainingLinear


class LowBitLayers:
    """The low-bit layers of a run (nothing when the format has none).

    Args:
        recipe: the fp8 recipe (``"tensorwise"``, ``"rowwise"``, ``"rowwise_with_gw_hp"``).
        low_bit_modules: the user's choice of layers, or ``None`` for the default (``convert.py``).
        bf16_modules: layers never converted.
        fallback: move layers back when the watch says so (``auto_fallback``).
    """

    def __init__(self, recipe: str, low_bit_modules: Any, bf16_modules: Any, fallback: bool = True) -> None:
        self.recipe, self.low_bit_modules, self.bf16_modules, self.fallback = (
            recipe,
            low_bit_modules,
            bf16_modules,
            fallback,
        )
        self.kind: str | None = None
        self.model: nn.Module | None = None
        self.converted: list[str] = []  # every layer converted at setup, in model order
        self.moved: dict[str, Any] = {}  # fqn -> Promotion (scope "low_bit"): back in bf16 (None: in an earlier fit)
        self.latest: dict[str, LayerSample] = {}
        self.worst: dict[str, dict[str, float]] = {}  # fqn -> lowest snr_db, highest underflow / saturation seen
        self._streak: dict[str, int] = {}
        self.watch: LowBitWatch | None = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, model: nn.Module, kind: str | None, precision: str, fp32: set[str], device_type: str) -> None:
        """Convert the chosen layers (a model converted by an earlier fit keeps its layers)."""
        if kind is None:
            self.model = model
            return
        if self.model is model and self.watch is not None:
            return  # validate / test after fit, with the same plugin: nothing changes
        self.model = model
        require_torchao(precision)
        self.kind = kind
        if model in _CONVERTED:
            self.converted = list(_CONVERTED[model])
            types = _converted_types()
            for fqn in self.converted:  # a layer moved back by an earlier fit stays in bf16, recorded as such
                if not isinstance(model.get_submodule(fqn), types):
                    self.moved.setdefault(fqn, None)
        else:
            self.converted = select(model, self.low_bit_modules, self.bf16_modules, fp32)
            convert(model, kind, self.recipe, self.converted, device_type)
            _CONVERTED[model] = list(self.converted)
        self.watch = LowBitWatch(kind)

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The layers multiplying in the low-bit format now."""
        if self.model is None:
            return {}
        return {fqn: self.model.get_submodule(fqn) for fqn in self.converted if fqn not in self.moved}

    @property
    def armed(self) -> bool:
        """The watch's hooks are on (a sampled step): compiled code runs eagerly then (``hooks.eager``)."""
        return self.watch is not None and self.watch.armed

    def is_low_bit(self, fqn: str) -> bool:
        return fqn in self.converted and fqn not in self.moved

    # ------------------------------------------------------------------------------------ watching
    def arm(self, step: int) -> None:
        """A sampled step begins: observe every low-bit layer once."""
        if self.watch is not None and not self.watch.armed:
            layers = self.layers
            if layers:
                self.watch.arm(layers, step)

    def collect(self) -> list[tuple[str, str]]:
        """Read a sampled step's measurements; the layers to move back now, each with why."""
        if self.watch is None or not self.watch.armed:
            return []
        samples = {fqn: s for fqn, s in self.watch.collect().items() if s.finite}
        for fqn, sample in samples.items():
            self.latest[fqn] = sample
            worst = self.worst.setdefault(fqn, {"snr_db": sample.snr_db, "underflow": 0.0, "saturation": 0.0})
            worst["snr_db"] = min(worst["snr_db"], sample.snr_db)
            worst["underflow"] = max(worst["underflow"], sample.underflow)
            worst["saturation"] = max(worst["saturation"], sample.saturation)
        names = list(self.layers)
        verdicts = [judge(samples[n]) if n in samples else None for n in names]
        flags = all_reduce([1.0 if v else 0.0 for v in verdicts], "MAX") if names else []
        moves = []
        for name, flag, why in zip(names, flags, verdicts):
            self._streak[name] = self._streak.get(name, 0) + 1 if flag else 0
            if self.fallback and self._streak[name] >= PATIENCE:
                moves.append((name, why or "another rank's measurements crossed a threshold"))
        return moves

    def move_back(self, fqn: str, promotion: Any) -> bool:
        """Run ``fqn`` in bf16 from now on, recording ``promotion``; False if it is not a low-bit layer now."""
        if self.model is None or not self.is_low_bit(fqn):
            return False
        if self.watch is not None:
            self.watch.disarm()  # its hook is on the module being replaced; re-armed at the next sampled step
        revert(self.model, fqn)
        self.moved[fqn] = promotion
        self._streak.pop(fqn, None)
        return True

    def disarm(self) -> None:
        if self.watch is not None:
            self.watch.disarm()

    # ----------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        moved = [_promotion_dict(p) for p in self.moved.values() if p is not None]
        return {"converted": list(self.converted), "moved": moved}

    def load_state_dict(self, state: dict[str, Any], make_promotion: Callable[[dict[str, Any]], Any]) -> None:
        """Move back the layers a checkpointed run had moved back, so a resumed run keeps them in bf16."""
        for entry in state.get("moved", ()):
            if self.is_low_bit(entry["module"]):
                self.move_back(entry["module"], make_promotion(entry))


def judge(sample: LayerSample) -> str | None:
    """Why one sample is bad (every threshold it crosses), or ``None`` (see the module docstring)."""
    why = []
    if sample.snr_db < SNR_FLOOR_DB:
        why.append(f"GEMM signal-to-noise {sample.snr_db:.1f} dB < {SNR_FLOOR_DB:g} dB against bf16")
    if sample.underflow > UNDERFLOW_LIMIT:
        why.append(f"{sample.underflow:.0%} of an operand's non-zero values quantize to zero (> {UNDERFLOW_LIMIT:.0%})")
    if sample.saturation > SATURATION_LIMIT:
        why.append(f"{sample.saturation:.1%} of the values saturate (> {SATURATION_LIMIT:.0%})")
    return "; ".join(why) or None


def _promotion_dict(promotion: Any) -> dict[str, Any]:
    return {**vars(promotion), "reason": str(promotion.reason)}

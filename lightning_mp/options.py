"""``PluginOptions``: every knob of ``AdaptiveMP``, declared once with what it does, validated at construction.

The declaration is the one place a knob is written: the Trainer and Fabric shells take their keyword arguments
from it (their signatures are pinned to it by ``tests/unit/test_options.py``), their docstrings' ``Args`` are
built from the ``doc`` of each field (``args_doc``), and the CLI's help and the ``conf/precision`` defaults are
checked against it. Each error names the field, the value and what is allowed, in the form the CLI prints as its
one line: ``AdaptiveMP(stats='most') is invalid: must be one of ('off', 'cheap', 'full').``
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from lightning_mp.diagnosis.statistics import LEVELS
from lightning_mp.errors import ConfigError
from lightning_mp.formats import PRECISIONS
from lightning_mp.lowbit.convert import FP8_RECIPES, require_torchao
from lightning_mp.scaling import AdaptiveLossScaler
from lightning_mp.weights.remedies import MASTER_WEIGHTS

__all__ = ["FABRIC_KNOBS", "GRADSCALER_RULE", "KNOBS", "TRAINER_ONLY", "PluginOptions", "args_doc"]

_FLAGS = ("auto_fallback", "fp32_defaults", "guard_nonfinite", "attach_callbacks", "sharded_gradients", "replay")
_COUNTS = ("promote_after", "promote_window", "watch_steps", "max_consecutive_skips", "max_events", "stats_every")


def _knob(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": " ".join(doc.split())})


def _invalid(field_name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"AdaptiveMP({field_name}={value!r}) is invalid: {allowed}")


@dataclass(frozen=True, eq=False)
class PluginOptions:
    """The arguments of :class:`~lightning_mp.AdaptiveMP`, each with its documentation."""

    precision: str = _knob(
        "auto",
        """``"auto"`` (resolved at setup: bf16 where the device runs it natively, else fp16 on CUDA, else fp32),
        ``"16-mixed"``, ``"bf16-mixed"``, ``"32-true"``, or ``"fp8-mixed"`` / ``"int8-mixed"`` (bf16 autocast, and
        eligible ``Linear`` layers multiply in fp8 / int8 through torchao, each watched and moved back to bf16 when
        the format hurts it; needs ``pip install "lightning-mp[fp8]"``), or ``"bf16-true"`` / ``"16-true"`` (the
        weights, inputs and every operation in bf16 / fp16, as Lightning's; ``"16-true"`` scales the loss).""",
    )
    device: str | None = _knob(None, "device type for autocast; ``None`` takes it from the model at setup.")
    scaler: Any = _knob(
        None,
        """the :class:`AdaptiveLossScaler` for ``"16-mixed"``, or a dict of its arguments (built for the device at
        setup; what a YAML config gives), or a plain ``torch.amp.GradScaler`` (what ``MixedPrecision(scaler=...)``
        took: its settings and state carry over into an ``AdaptiveLossScaler`` under GradScaler's own rule,
        ``policy="dynamic", hysteresis=1``, with a warning saying so); ``None`` builds a default one. Must be
        ``None`` for ``"bf16-mixed"`` and ``"32-true"``.""",
    )
    fp32_modules: Any = _knob(
        (),
        """modules that always run in fp32: classes, fqn glob patterns (``"encoder.*.norm"``) or
        ``(module, fqn) -> bool`` filters. A pattern that matches nothing is an error at setup.""",
    )
    auto_fallback: bool = _knob(
        True,
        """promote a module to fp32 when it is blamed for ``promote_after`` overflows within ``promote_window``
        steps (a leaf whole, a module with submodules its own code only), or when its low-precision kernel
        raises (the step is then retried).""",
    )
    fp32_defaults: bool = _knob(
        True,
        """also run the format's defaults in fp32 (``LayerNorm`` and ``LogSoftmax`` in fp16, whose CPU fp16 kernels
        keep running sums in fp16; nothing in bf16).""",
    )
    guard_nonfinite: bool = _knob(
        True,
        """skip bf16/fp32 steps whose gradients are not finite (fp16 is always guarded by the scaler). Costs one
        reduction over the gradients per step; on a GPU it also reads one flag.""",
    )
    promote_after: int = _knob(2, "see ``auto_fallback``.")
    promote_window: int = _knob(100, "see ``auto_fallback``; also the spike rule's window after a promotion.")
    watch_steps: int = _knob(
        20, "optimizer steps the forward probe stays armed after an overflow it could not localize."
    )
    max_consecutive_skips: int = _knob(
        50, "skipped steps in a row that trigger the next rung of the escalation ladder."
    )
    max_events: int = _knob(
        10_000, "overflow events kept in memory (oldest dropped; ``overflow_counts`` keeps the totals)."
    )
    stats: str = _knob(
        "cheap",
        """per-module headroom/underflow statistics: ``"off"``, ``"cheap"`` (module outputs and parameter
        gradients) or ``"full"`` (also the gradients flowing into every module output).""",
    )
    stats_every: int | None = _knob(
        None,
        """sample the statistics on one optimizer step out of this many. ``None``: the format's own (25 in fp16,
        whose predictive scaler reads the samples; 100 in bf16 and fp32, fp32's range), and the first step too, so
        that a short run's report has figures.""",
    )
    attach_callbacks: bool = _knob(
        True,
        """add ``LossScaleMonitor``, ``OverflowDiagnostics`` and ``PrecisionReport`` to the Trainer at setup
        unless it already has them (Trainer only).""",
    )
    sharded_gradients: bool = _knob(
        False,
        """each rank holds only a shard of plain-tensor gradients (FSDP1's flat parameters; ``AdaptiveFSDPMP`` sets
        it): every non-finite flag is combined across ranks before a step is taken (Trainer only).""",
    )
    replay: bool = _knob(
        True,
        """run a bad step again under an operation tracer to name the operation and source line where its first
        non-finite value was born (bad steps only; off with ``sharded_gradients``; Trainer only: Fabric has no
        ``training_step`` to run again).""",
    )
    rescue: bool | None = _knob(
        None,
        """fp16: when a step overflows in the backward because of the loss scale (inputs and loss finite, scale
        above its floor), lower the scale and run the step's forward/backward again on the same batch instead of
        skipping it: no batch is lost, the step count and LR schedule are unchanged, at the cost of one extra
        forward/backward (what a skipped step wastes). Automatic optimization only, every micro-batch of an
        accumulated step included (not across ranks); the re-run's ``self.log`` calls are muted. ``None``: on with
        the predictive scaler policy, off with ``policy="dynamic"`` (which then reproduces GradScaler). Trainer
        only.""",
    )

    low_bit_recipe: str = _knob(
        "tensorwise",
        """fp8 only: torchao's scaling recipe, ``"tensorwise"`` (one scale per tensor, the fastest),
        ``"rowwise"`` (one per row: robust to a few huge rows) or ``"rowwise_with_gw_hp"`` (rowwise, and the weight
        gradient's GEMM in bf16).""",
    )
    low_bit_modules: Any = _knob(
        None,
        """fp8/int8: the ``Linear`` layers that multiply in the low-bit format, with the grammar of ``fp32_modules``;
        ``None``: every eligible one (both dimensions divisible by 16) except the first and the last ``Linear`` and
        layers under 64 x 64 weights. Naming a layer that cannot be converted is an error.""",
    )
    bf16_modules: Any = _knob(
        (),
        """fp8/int8: layers never converted (they run in bf16), with the grammar of ``fp32_modules``.""",
    )

    master_weights: Any = _knob(
        "auto",
        """``"bf16-true"`` / ``"16-true"``: how updates smaller than the weights' resolution are kept. ``"fp32"``
        (an fp32 master copy the optimizer updates: any optimizer, no memory saved on weights + optimizer state;
        on one process gradients then accumulate in fp32), ``"kahan"`` (a compensation buffer in the weights' dtype,
        through an optimi optimizer), ``"stochastic"`` (stochastic rounding, through torchao's AdamW; bf16 only) or
        ``None`` (updates round to nearest, and are measured). ``"auto"``: Kahan where optimi has the optimizer,
        else fp32 masters (fp32 masters for ``"16-true"``), as measured in RESULTS.md. In the Trainer a
        ``torch.optim`` Adam / AdamW / SGD is replaced by the library's equivalent, with a warning; with Fabric
        build that optimizer yourself.""",
    )

    def __post_init__(self) -> None:
        precision, device, scaler = self.precision, self.device, self.scaler
        if precision not in PRECISIONS:
            raise _invalid("precision", precision, f"precision must be one of {PRECISIONS}.")
        if device is not None and not isinstance(device, str):
            raise _invalid("device", device, "device must be None or a device type string such as 'cuda' or 'cpu'.")
        if scaler is not None and not isinstance(scaler, (torch.amp.GradScaler, Mapping)):
            raise _invalid(
                "scaler",
                scaler,
                "scaler must be None, an AdaptiveLossScaler, a torch.amp.GradScaler (its settings and state carry"
                " over) or a dict of AdaptiveLossScaler's arguments.",
            )
        if _is_plain_gradscaler(scaler):
            warnings.warn(
                f"AdaptiveMP(scaler={type(scaler).__name__}(...)): its settings and state carry over into an"
                " AdaptiveLossScaler(policy='dynamic', hysteresis=1, min_scale=None, max_scale=None), which is"
                " GradScaler's own rule (the same scales, step for step) with overflow attribution added; pass"
                " scaler=None for the adaptive policy.",
                stacklevel=4,
            )
        if isinstance(scaler, Mapping):
            if "device" in scaler:
                raise ConfigError("AdaptiveMP(scaler={'device': ...}) is invalid: the device is taken from AdaptiveMP.")
            AdaptiveLossScaler("cpu", **scaler)  # validate every knob now, naming the bad one
        if scaler is not None and precision in ("bf16-mixed", "32-true", "bf16-true"):
            raise ConfigError(
                f"AdaptiveMP(precision={precision!r}, scaler=...) is invalid: a loss scaler is only used with"
                " precision='16-mixed' or '16-true' (or 'auto'); pass scaler=None."
            )
        low_bit = precision in ("fp8-mixed", "int8-mixed")
        if self.low_bit_recipe not in FP8_RECIPES:
            raise _invalid("low_bit_recipe", self.low_bit_recipe, f"must be one of {FP8_RECIPES}.")
        for name in ("low_bit_modules", "bf16_modules"):
            if getattr(self, name) and not low_bit:
                raise _invalid(
                    name, getattr(self, name), "only fp8-mixed and int8-mixed convert layers; leave it empty."
                )
        if low_bit:
            require_torchao(precision)
        if self.master_weights not in MASTER_WEIGHTS:
            raise _invalid("master_weights", self.master_weights, f"must be one of {MASTER_WEIGHTS}.")
        if self.master_weights != "auto" and precision not in ("bf16-true", "16-true"):
            raise _invalid(
                "master_weights",
                self.master_weights,
                f"precision={precision!r} keeps fp32 weights: only 'bf16-true' and '16-true' have low-precision weights"
                " to remedy; leave it 'auto'.",
            )
        if self.master_weights == "stochastic" and precision == "16-true":
            raise _invalid(
                "master_weights",
                "stochastic",
                "torchao rounds stochastically into bf16 only; with precision='16-true' use 'fp32', 'kahan' or None.",
            )
        if self.master_weights in ("kahan", "stochastic") and precision in ("bf16-true", "16-true"):
            _require(self.master_weights)
        if self.stats not in LEVELS:
            raise _invalid("stats", self.stats, f"must be one of {LEVELS}.")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, getattr(self, name), "must be True or False.")
        if self.rescue is not None and not isinstance(self.rescue, bool):
            raise _invalid("rescue", self.rescue, "must be None (on with the predictive scaler), True or False.")
        for name in _COUNTS:
            value = getattr(self, name)
            if name == "stats_every" and value is None:
                continue  # the format's default
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                allowed = "None (the default for the precision) or " if name == "stats_every" else ""
                raise _invalid(name, value, f"must be {allowed}an integer >= 1.")

    @property
    def device_type(self) -> str | None:
        """``"cuda"`` for ``"cuda:1"``; ``None`` until known."""
        return self.device.split(":")[0] if self.device else None

    @property
    def scaler_knobs(self) -> dict[str, Any]:
        """The arguments the scaler is built from at setup, for the model's device: a YAML config's dict, or a
        plain ``torch.amp.GradScaler``'s settings under its own rule."""
        if isinstance(self.scaler, Mapping):
            return dict(self.scaler)
        if _is_plain_gradscaler(self.scaler):
            return {
                "init_scale": self.scaler.get_scale(),
                "growth_factor": self.scaler.get_growth_factor(),
                "backoff_factor": self.scaler.get_backoff_factor(),
                "growth_interval": self.scaler.get_growth_interval(),
                "enabled": self.scaler.is_enabled(),
                **GRADSCALER_RULE,
            }
        return {}

    @property
    def scaler_state(self) -> dict[str, Any] | None:
        """A plain ``torch.amp.GradScaler``'s state, which the scaler built from it continues from."""
        return self.scaler.state_dict() if _is_plain_gradscaler(self.scaler) else None


# Every knob, in declaration order; those that only the Trainer has (Fabric has no callbacks, no FSDP1, no
# training_step to run again).
KNOBS: tuple[str, ...] = tuple(f.name for f in fields(PluginOptions))
TRAINER_ONLY: tuple[str, ...] = ("attach_callbacks", "sharded_gradients", "replay", "rescue")
FABRIC_KNOBS: tuple[str, ...] = tuple(k for k in KNOBS if k not in TRAINER_ONLY)

# AdaptiveLossScaler's knobs that make it torch.amp.GradScaler's rule exactly.
GRADSCALER_RULE: dict[str, Any] = {"policy": "dynamic", "hysteresis": 1, "min_scale": None, "max_scale": None}


def args_doc(knobs: tuple[str, ...] = KNOBS, indent: int = 4) -> str:
    """The ``Args:`` section of a shell's docstring, built from the declaration."""
    docs = {f.name: f.metadata["doc"] for f in fields(PluginOptions)}
    lines = ["Args:"]
    for name in knobs:
        lines += textwrap.wrap(f"{name}: {docs[name]}", 112, initial_indent="    ", subsequent_indent="        ")
    return textwrap.indent("\n".join(lines), " " * indent)


def _require(remedy: str) -> None:
    """The library a remedy rounds through must be installed: say which, when the plugin is built."""
    module, package = ("torchao", "torchao") if remedy == "stochastic" else ("optimi", "torch-optimi")
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(
            f'AdaptiveMP(master_weights={remedy!r}) needs {package}: pip install "lightning-mp[weights]".'
        ) from None


def _is_plain_gradscaler(scaler: Any) -> bool:
    return isinstance(scaler, torch.amp.GradScaler) and not isinstance(scaler, AdaptiveLossScaler)

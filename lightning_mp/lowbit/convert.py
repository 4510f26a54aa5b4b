"""Which ``Linear`` layers multiply in fp8 or int8, converting them with torchao, and moving one back.

The conversion is torchao's own (``convert_to_float8_training`` for fp8, ``quantize_`` with
``Int8MixedPrecisionTrainingConfig(module_swap=True)`` for int8): nothing here casts or multiplies. Both keep the
layer's ``weight`` and ``bias`` ``Parameter`` objects, so the optimizer's references and state, the
``state_dict`` keys and dtypes, and a checkpoint are the same as without conversion. int8 uses torchao's module
swap rather than its weight tensor subclass for that reason: the subclass replaces the ``Parameter``.

Which layers, by default (``low_bit_modules=None``):

- **eligible by shape**: plain ``nn.Linear`` whose ``in_features`` and ``out_features`` are both divisible by 16:
  the fp8 GEMM (PyTorch's ``_scaled_mm``) requires it on GPUs, and it is torchao's own rule
  (``_auto_filter_for_recipe``); int8's GEMM (``_int_mm``) needs multiples of 8, and the same rule keeps one
  grammar for both formats;
- **not the first and not the last** ``Linear`` of the model (in registration order): the input projection
  sees the raw inputs and the last one produces the logits the loss reads, the two places where the format's
  rounding hurts most and the GEMMs are smallest; torchtitan leaves its ``output`` head in bf16, and the
  fp8-training literature (e.g. the DeepSeek-V3 and "FP8-LM" reports) keeps embeddings and the output head out;
- **not tiny**: weights of at least 64 x 64 = 4096 elements. Below that the casts cost more than the GEMM saves
  and a layer's quantization error is a larger share of the network. (torchao's auto filter uses far larger,
  H100-tuned thresholds, e.g. tensorwise K > 4096 or N > 1024; pass ``low_bit_modules=`` to choose your own.)

``low_bit_modules=`` replaces the default choice (classes, fqn globs or ``(module, fqn) -> bool`` filters, the
grammar of ``fp32_modules``; the shape rule still applies: a class or a filter takes the eligible layers it
selects, and naming an ineligible layer by its fqn is an error);
``bf16_modules=`` removes layers from it. Modules in ``fp32_modules``, and the layers inside them, are never
converted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_mp.errors import ConfigError
from lightning_mp.fallback.filters import _entries, by_name, fp32_filter, pattern_misses

__all__ = [
    "DIVISOR",
    "FP8_RECIPES",
    "MIN_ELEMENTS",
    "convert",
    "default_selection",
    "fp8_config",
    "ineligible",
    "require_torchao",
    "revert",
    "select",
]

DIVISOR = 16
MIN_ELEMENTS = 64 * 64
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
_HOOK_DICTS = (
    "_is_full_backward_hook",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    """torchao logs one line per CUDA-only extension it cannot load (every import on a CPU machine), and its
    import makes torch log a deprecation of its own registration: not news to a user of this package."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def require_torchao(precision: str) -> Any:
    """The ``torchao`` module, or a one-line error naming the extra to install."""
    try:
        with _quiet_torchao():
            import torchao
    except ImportError:
        raise ConfigError(
            f'AdaptiveMP(precision={precision!r}) needs torchao: pip install "lightning-mp[fp8]" (torchao>=0.18).'
        ) from None
    return torchao


def ineligible(module: nn.Module) -> str | None:
    """Why ``module`` cannot multiply in a low-bit format, or ``None`` when it can (the shape rule)."""
    if type(module) is not nn.Linear:
        return f"a {type(module).__name__}, not a plain nn.Linear"
    out_features, in_features = module.weight.shape
    if in_features % DIVISOR or out_features % DIVISOR:
        return f"its weight is {out_features} x {in_features}: both dimensions must be divisible by {DIVISOR}"
    return None


def _sharded_by_fsdp2(module: nn.Module) -> bool:
    """``fully_shard`` gives a module a dynamic class (``FSDPLinear``) or leaves it holding DTensor shards."""
    return type(module).__name__.startswith("FSDP") or any(
        type(p).__name__ == "DTensor" for p in module.parameters(recurse=False)
    )


def default_selection(model: nn.Module) -> list[str]:
    """The default choice: eligible, not the first or last ``Linear``, not tiny (see the module docstring)."""
    linears = [fqn for fqn, module in model.named_modules() if type(module) is nn.Linear]
    inner = linears[1:-1]
    return [
        fqn
        for fqn in inner
        if ineligible(model.get_submodule(fqn)) is None and model.get_submodule(fqn).weight.numel() >= MIN_ELEMENTS
    ]


def select(model: nn.Module, low_bit_modules: Any, bf16_modules: Any, fp32: set[str]) -> list[str]:
    """The layers to convert: the default choice or the user's, minus ``bf16_modules`` and the fp32 modules.

    Raises:
        ConfigError: a pattern matches no module, or ``low_bit_modules`` names a layer that cannot be converted.
    """
    sharded = [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and _sharded_by_fsdp2(m)]
    if sharded:
        raise ConfigError(
            f"AdaptiveMP(precision=fp8/int8) cannot convert {sharded[0]}: it is already sharded by fully_shard"
            " (FSDP2), and torchao converts layers before sharding. Convert them yourself in configure_model"
            " before fully_shard (torchao.float8.convert_to_float8_training) and train with bf16-mixed."
        )
    for knob, spec in (("low_bit_modules", low_bit_modules), ("bf16_modules", bf16_modules)):
        misses = pattern_misses(spec, model) if spec else []
        if misses:
            raise ConfigError(
                f"AdaptiveMP({knob}=...) pattern(s) {misses} match no module of {type(model).__name__}; names are"
                " relative to the model given to the plugin (the LightningModule)."
            )
    if low_bit_modules:
        chosen_filter = fp32_filter(low_bit_modules, knob="low_bit_modules")
        named = by_name(*[e for e in _entries(low_bit_modules) if isinstance(e, str)]) if low_bit_modules else None
        chosen = []
        for fqn, module in model.named_modules():
            if not fqn or not chosen_filter(module, fqn) or not isinstance(module, nn.Linear):
                continue
            why = ineligible(module)
            if why is None:
                chosen.append(fqn)
            elif named is not None and named(module, fqn):  # a class or a filter takes the eligible ones only
                raise ConfigError(
                    f"AdaptiveMP(low_bit_modules=...) names {fqn}, which cannot be converted: {why}. Leave it"
                    " out of low_bit_modules (or use bf16_modules to exclude it)."
                )
    else:
        chosen = default_selection(model)
    excluded = fp32_filter(bf16_modules, knob="bf16_modules") if bf16_modules else None
    in_fp32 = lambda fqn: any(fqn == name or fqn.startswith(f"{name}.") for name in fp32)  # noqa: E731
    return [
        fqn
        for fqn in chosen
        if not in_fp32(fqn) and not (excluded is not None and excluded(model.get_submodule(fqn), fqn))
    ]


def fp8_config(recipe: str, device_type: str) -> Any:
    """torchao's ``Float8LinearConfig`` for ``recipe``; on a CPU in torchao's emulation mode (see ``convert``)."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=True) if device_type == "cpu" else config


def convert(model: nn.Module, kind: str, recipe: str, names: list[str], device_type: str = "cuda") -> None:
    """Convert the ``names`` layers of ``model`` in place with torchao (``kind`` ``"fp8"`` or ``"int8"``).

    On a CPU, fp8 layers run in torchao's emulation mode (``Float8LinearConfig(emulate=True)``): the same fp8
    casts and scales, the GEMM itself in fp32, its output rounded to bf16. No CPU multiplies fp8, and the CPU
    ``_scaled_mm`` kernel is a reference implementation: 2.7 s against emulation's 0.033 s for one step of a
    64-128-64 MLP on 1536 tokens here (bf16: 0.001 s), with outputs one bf16 rounding step apart. int8 runs
    torchao's own CPU path (PyTorch's ``_int_mm``)."""
    if not names:
        return
    wanted = set(names)
    hooks = {fqn: _hooks(model.get_submodule(fqn)) for fqn in names}  # torchao's swap drops them
    with _quiet_torchao():
        if kind == "fp8":
            from torchao.float8 import convert_to_float8_training

            config = fp8_config(recipe, device_type)
            convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn in wanted, config=config)
        else:
            from torchao.prototype.quantized_training import Int8MixedPrecisionTrainingConfig
            from torchao.quantization import quantize_

            config = Int8MixedPrecisionTrainingConfig(module_swap=True)
            quantize_(model, config, filter_fn=lambda m, fqn: fqn in wanted)
    for fqn, kept in hooks.items():
        _restore_hooks(model.get_submodule(fqn), kept)


def _hooks(module: nn.Module) -> dict[str, Any]:
    """The module's hook tables (and whether its backward hooks are full ones), by attribute name."""
    return {name: getattr(module, name) for name in _HOOK_DICTS if hasattr(module, name)}


def _restore_hooks(module: nn.Module, hooks: dict[str, Any]) -> None:
    """A user's hooks on a layer move with it when it is swapped: the same dictionaries, so the handles they
    hold still remove them."""
    for name, entries in hooks.items():
        setattr(module, name, entries)


def revert(model: nn.Module, fqn: str) -> nn.Linear:
    """Replace the converted layer ``fqn`` by a plain ``nn.Linear`` holding the same ``Parameter`` objects (the
    optimizer's state is untouched), the same hooks and the same train/eval mode; returns it."""
    old = model.get_submodule(fqn)
    with torch.device("meta"):
        new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    new.weight = old.weight
    new.bias = old.bias
    new.train(old.training)
    _restore_hooks(new, _hooks(old))
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)
    return new

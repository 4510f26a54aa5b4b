"""Optimizer care: settings that break, or silently do nothing, with low-precision weights or state, found at
setup from the optimizer's own param groups, each told in one line that names the setting, its value and the fix.

Each check comes from what users hit (the issues are cited in RESULTS.md and the README):

- ``eps`` that is 0 in the optimizer state's dtype: Adam's ``eps=1e-8`` is below fp16's smallest subnormal
  (6e-8) and rounds to 0, so an element whose second moment underflows to 0 divides 0 by 0 and its weight turns
  NaN on the first step (pytorch/pytorch#8860, google-deepmind/optax#1754). An error: the run cannot train.
- a learning rate below half a unit in the last place of most weights (Adam-style optimizers, whose per-element
  step is about ``lr``): the first updates are rounded away (``lost.LOST_LIMIT`` of the weights or more). A
  warmup's first learning rate is the one checked, since a scheduler sets it at construction (kyegomez/SingLoRA#6:
  "ramp up steps cause vanishing updates in bf16").
- decoupled weight decay whose per-step shrink ``lr * weight_decay`` is below half a unit in the last place
  relative to every weight (2^-9 in bf16, 2^-12 in fp16): weight decay does nothing at all.
- clipping fp16 gradients by norm: ``torch.nn.utils.clip_grad_norm_`` takes each gradient's norm in its own
  dtype, so a norm over 65504 is inf and every gradient is multiplied by 0: the step silently does nothing
  (facebookresearch/fairscale#263, tracel-ai/burn#5699; reproduced with torch 2.13). Not a message: the Trainer
  plugin clips such gradients with the norm taken in fp32 (``clip_norm_in_fp32``).
- LBFGS with fp16 weights: refused, as Lightning refuses LBFGS with fp16 autocast (its line search compares losses
  that a loss scale changes between evaluations).

Checks that are remedied (``master_weights`` set: the optimizer updates fp32 masters or compensates) are not told.
"""

from __future__ import annotations

import torch
from torch.optim import LBFGS, Optimizer

from lightning_mp.errors import ConfigError
from lightning_mp.weights.lost import LOST_LIMIT

__all__ = ["care_messages", "clip_norm_in_fp32", "half_ulp_share"]


def half_ulp_share(weights: torch.Tensor, step: float) -> float:
    """The share of ``weights`` (in their own dtype) for which an update of size ``step`` is below half a unit in
    the last place, i.e. rounds back to the same value."""
    w = weights.detach().abs()
    ulp = torch.nextafter(w, torch.full_like(w, float("inf"))) - w
    return float((ulp.float() / 2 > step).float().mean())


def _state_dtype(optimizer: Optimizer, param: torch.Tensor) -> torch.dtype:
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
            return value.dtype
    return param.dtype  # torch's optimizers create their state like the parameter


def care_messages(optimizer: Optimizer, remedied: bool, name: str = "optimizer") -> list[str]:
    """What to tell about ``optimizer``'s settings with the weights it holds; raises ``ConfigError`` for those
    that cannot train (an ``eps`` that is 0 in the state's dtype, LBFGS with fp16 weights)."""
    kind = type(optimizer).__name__
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if isinstance(optimizer, LBFGS) and any(p.dtype == torch.float16 for p in params):
        raise ConfigError(
            "AdaptiveMP(precision='16-true') is invalid with LBFGS: its line search compares losses that the loss"
            " scale changes between evaluations (Lightning refuses LBFGS with fp16 too). Use 'bf16-true' or fp32."
        )
    messages = []
    for index, group in enumerate(optimizer.param_groups):
        low = [p for p in group["params"] if p.dtype in (torch.bfloat16, torch.float16)]
        where = f"{name} {kind}" + (f" param group {index}" if len(optimizer.param_groups) > 1 else "")
        eps = group.get("eps")
        if isinstance(eps, float) and eps > 0:
            for p in group["params"]:
                dtype = _state_dtype(optimizer, p)
                if dtype in (torch.bfloat16, torch.float16) and torch.tensor(eps, dtype=dtype).item() == 0:
                    raise ConfigError(
                        f"AdaptiveMP: {where} has eps={eps:g}, which is 0 in {str(dtype)[6:]} (its state's dtype):"
                        " an element whose second moment underflows to 0 turns NaN on the first step. Use"
                        f" eps>={torch.finfo(dtype).smallest_normal:.1e} (1e-4 is usual for fp16 state), or"
                        " master_weights='fp32' (fp32 state)."
                    )
        if remedied or not low:
            continue
        dtype = low[0].dtype
        lr, lr_name = float(group.get("lr", 0.0)), "lr"
        if lr == 0 and group.get("initial_lr"):  # a warm-up from 0 (Hugging Face's schedules): its peak rate
            lr, lr_name = float(group["initial_lr"]), "initial_lr (the schedule's peak; it warms up from 0)"
        adaptive = "betas" in group or "beta1" in group  # Adam-style: a per-element step of about lr
        if adaptive and lr > 0:
            weights = torch.cat([p.detach().flatten() for p in low])
            share = half_ulp_share(weights, lr)
            if share >= LOST_LIMIT:
                messages.append(
                    f"AdaptiveMP: {where} has {lr_name}={lr:g}, below half a unit in the last place of {share:.0%}"
                    f" of its {str(dtype)[6:]} weights: its first updates round away. Use master_weights='auto' (or"
                    " 'kahan', 'fp32', 'stochastic'), or a larger lr (a warm-up's first rates are the smallest)."
                )
        decay = float(group.get("weight_decay", 0.0))
        decoupled = kind == "AdamW" or group.get("decoupled_weight_decay") or group.get("decouple_wd")
        relative = torch.finfo(dtype).eps / 4  # half an ulp relative to a weight, at its smallest (2^-9 in bf16)
        if decoupled and decay > 0 and 0 < lr * decay < relative:
            messages.append(
                f"AdaptiveMP: {where} has weight_decay={decay:g} with lr={lr:g}: each step shrinks a weight by"
                f" {lr * decay:.1e} of itself, below {str(dtype)[6:]}'s resolution ({relative:.1e}), so weight"
                " decay does nothing. Use master_weights='auto' (or 'kahan', 'fp32', 'stochastic')."
            )
    return messages


def clip_norm_in_fp32(optimizer: Optimizer, max_norm: float) -> bool:
    """Clip ``optimizer``'s gradients to ``max_norm`` with their total norm accumulated in fp32, when any of them
    is fp16 (whose own norm overflows at 65504); False (nothing done) otherwise."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not any(p.grad.dtype == torch.float16 for p in params):
        return False
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params]
    total = torch.linalg.vector_norm(torch.stack(norms))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return True

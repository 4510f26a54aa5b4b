"""What a run's training state weighs, counted from the tensors in their real dtypes: the model's weights, the
gradients held at the step, the optimizer's state, fp32 master copies and compensation buffers, and the same
model's fp32 figure (4 bytes per weight, per gradient and per element of the same optimizer state), so that a
precision's saving is read as one ratio."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["training_state_bytes"]


def _bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def training_state_bytes(
    model: nn.Module, optimizers: Iterable[Optimizer], masters: Iterable[Tensor] = ()
) -> dict[str, int | float]:
    """Bytes of ``weights``, ``gradients``, ``optimizer_state``, ``master_copies``, ``compensation`` and their
    ``total``; ``fp32_total`` (the same training state in fp32) and ``share_of_fp32`` = total / fp32_total.

    Call it between the backward and ``zero_grad`` (the gradients are then held). Masters stand in for their
    model weights in the optimizer: their gradients count as gradients, their state as optimizer state.
    """
    masters = list(masters)
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    figures = {"weights": sum(_bytes(p) for p in params), "gradients": 0, "optimizer_state": 0}
    figures["master_copies"] = sum(_bytes(m) for m in masters)
    figures["compensation"] = 0
    grads = [p.grad for p in params if p.grad is not None] + [m.grad for m in masters if m.grad is not None]
    figures["gradients"] = sum(_bytes(g) for g in grads)
    state_elements = 0
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for key, value in state.items():
                if not isinstance(value, Tensor) or value.dim() == 0:
                    continue  # step counters
                if key == "kahan_comp":
                    figures["compensation"] += _bytes(value)
                else:
                    figures["optimizer_state"] += _bytes(value)
                    state_elements += value.numel()
    total = sum(figures.values())
    fp32 = 4 * (sum(p.numel() for p in params) + sum(p.numel() for p in trained) + state_elements)
    figures["total"] = total
    figures["fp32_total"] = fp32
    figures["share_of_fp32"] = total / fp32 if fp32 else 1.0
    return figures

"""``BufferSnapshot``: a skipped step leaves the model's buffers as they were before it.

Skipping the optimizer step keeps the parameters, but the forward pass of the bad step has already run:
BatchNorm updated its running statistics from the bad batch (and any module may update a buffer of its own in
forward). One NaN row in one batch then makes ``running_mean`` NaN, and every evaluation after it NaN too, while
the plugin reports the step as skipped. "Skipped" has to mean that nothing changed.

So before the first forward of every optimizer step the model's buffers are copied, as one concatenation per
device and dtype: a fixed two or three kernel launches whatever the number of modules, no host
synchronisation, memory the size of the buffers (BatchNorm's are two vectors per layer). A skipped step copies
them back; a clean step just overwrites the copy at the next snapshot. A module that assigns a new tensor to
a buffer attribute (instead of updating it in place, as BatchNorm does) is not followed after setup.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

__all__ = ["BufferSnapshot"]


class BufferSnapshot:
    """The model's buffers at the start of the current optimizer step, to put back if the step is skipped."""

    def __init__(self) -> None:
        self._groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        self._views: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}  # flat views, made once
        self._saved: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._strided: set[tuple[torch.device, torch.dtype]] = set()  # groups holding a non-contiguous buffer

    def watch(self, model: nn.Module) -> None:
        """Remember which buffers to copy. Once, at setup: walking the modules and building the flat views
        every step would cost more Python time than the copy itself."""
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for buffer in model.buffers():
            if buffer.numel():
                groups[(buffer.device, buffer.dtype)].append(buffer.detach())
        self._groups = dict(groups)
        # A flat view of a contiguous buffer follows its in-place updates (BatchNorm's); for another buffer a
        # flat reshape would be a copy, frozen at setup, so those groups are reshaped at each take instead.
        self._views = {key: [b.view(-1) if b.is_contiguous() else b for b in group] for key, group in groups.items()}
        self._strided = {key for key, group in groups.items() if not all(b.is_contiguous() for b in group)}
        self._saved = {
            key: torch.empty(sum(b.numel() for b in group), dtype=key[1], device=key[0])
            for key, group in groups.items()
        }
        self.take()  # never hold uninitialised memory: a restore before the first take puts back these values

    def take(self) -> None:
        """Copy the buffers now: one concatenation per device and dtype into memory kept between steps."""
        for key, views in self._views.items():
            if key in self._strided:
                views = [v.reshape(-1) for v in views]
            torch.cat(views, out=self._saved[key])

    def restore(self) -> None:
        """Put the copied values back into the same buffer tensors (modules keep their references)."""
        with torch.no_grad():
            for key, saved in self._saved.items():
                group = self._groups[key]
                for buffer, value in zip(group, saved.split([b.numel() for b in group])):
                    buffer.copy_(value.view_as(buffer))

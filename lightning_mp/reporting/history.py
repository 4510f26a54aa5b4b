"""``ScaleHistory``: the loss scale over a run, bounded in memory with an even resolution."""

from __future__ import annotations

from typing import Any

__all__ = ["ScaleHistory"]


class ScaleHistory:
    """A bounded ``(step, scale)`` history of the loss scale, for the report's plot.

    Args:
        max_points: the most points kept. The history starts with every optimizer step; when it would exceed
            this, every other point is dropped and from then on only every second (fourth, ...) step is
            recorded, so memory stays bounded on any run length with an even resolution over the whole run.
            ``points()`` always ends with the latest step.
    """

    def __init__(self, max_points: int = 4096) -> None:
        self.kept: list[tuple[int, float]] = []
        self._stride = 1
        self._latest: tuple[int, float] | None = None
        self.resize(max_points)

    def resize(self, max_points: int) -> None:
        """Keep at most ``max_points`` from now on (thinning what is kept if it holds more)."""
        if not isinstance(max_points, int) or isinstance(max_points, bool) or max_points < 2:
            raise ValueError(f"max_points={max_points!r} is invalid: must be an integer >= 2.")
        self.max_points = max_points
        while len(self.kept) > self.max_points:
            self._stride *= 2
            self.kept = [p for p in self.kept if p[0] % self._stride == 0]

    def record(self, step: int, scale: float) -> None:
        self._latest = (step, scale)
        if step % self._stride:
            return
        self.kept.append((step, scale))
        if len(self.kept) > self.max_points:
            self._stride *= 2
            self.kept = [p for p in self.kept if p[0] % self._stride == 0]

    def points(self) -> list[tuple[int, float]]:
        """The kept points, ending with the latest step recorded."""
        if self._latest is not None and (not self.kept or self.kept[-1] != self._latest):
            return [*self.kept, self._latest]
        return list(self.kept)

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale_history": [list(p) for p in self.kept],
            "stride": self._stride,
            "latest": list(self._latest) if self._latest is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = [tuple(p) for p in state.get("scale_history", [])]
        self._stride = state.get("stride", 1)
        latest = state.get("latest")
        self._latest = tuple(latest) if latest is not None else None

"""``compare.png``: what a comparison measured, as a picture.

Top: the learning curves, held-out loss and accuracy at every validation, the mean over seeds per precision
with a band of one standard deviation. Bottom: time per optimizer step (hatched where this device only
emulates the format) and memory: the bytes of weights, gradients and optimizer state stacked, the peak of the
run's process written above.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

__all__ = ["plot_comparison"]


def _curve(runs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float], list[float]]:
    """Epochs, mean and standard deviation of ``key`` over the runs at every epoch all of them validated."""
    by_epoch: dict[float, list[float]] = {}
    for run in runs:
        for point in run.get("history") or []:
            if point.get(key) is not None:
                by_epoch.setdefault(point["epoch"], []).append(point[key])
    epochs = [e for e in sorted(by_epoch) if len(by_epoch[e]) == len(runs)]
    means = [statistics.fmean(by_epoch[e]) for e in epochs]
    sds = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
    return epochs, means, sds


def _mean_sd(values: list[float | None]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def plot_comparison(groups: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Draw the comparison of ``groups`` (precision -> its runs, ``result.json`` each) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (ax_loss, ax_acc), (ax_time, ax_memory) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(groups)
    for index, (name, runs) in enumerate(groups.items()):
        colour = colours[index % len(colours)]
        for ax, key in ((ax_loss, "val_loss"), (ax_acc, "val_acc")):
            epochs, means, sds = _curve(runs, key)
            if not epochs:
                continue
            ax.plot(epochs, means, marker="o", color=colour, label=f"{name} ({len(runs)} seeds)")
            low, high = [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)]
            ax.fill_between(epochs, low, high, color=colour, alpha=0.2)
    ax_loss.set(title="held-out loss", xlabel="epoch", ylabel="val loss (mean +- sd)")
    ax_acc.set(title="held-out accuracy", xlabel="epoch", ylabel="val acc (mean +- sd)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    positions = range(len(names))
    times = [_mean_sd([r.get("ms_per_step") for r in groups[n]]) for n in names]
    emulated = [any(r.get("speed_emulated") for r in groups[n]) for n in names]
    bars = ax_time.bar(positions, [t[0] for t in times], yerr=[t[1] for t in times], capsize=4,
                       color=[colours[i % len(colours)] for i in positions])  # fmt: skip
    for bar, fake in zip(bars, emulated):
        if fake:
            bar.set_hatch("//")
    ax_time.set(title="time per optimizer step (hatched: format emulated on this device)", ylabel="ms")

    parts = (
        ("weights", "weights"),
        ("gradients", "gradients"),
        ("optimizer_state", "optimizer state"),
        ("master_copies", "fp32 masters"),
        ("compensation", "compensation"),
    )
    bottom = [0.0] * len(names)
    for (part, label), shade in zip(parts, ("0.2", "0.4", "0.6", "0.75", "0.9")):  # greys: not a precision's colour
        heights = [_mean_sd([(r.get("state_bytes") or {}).get(part) for r in groups[n]])[0] / 2**20 for n in names]
        ax_memory.bar(positions, heights, bottom=bottom, label=label, color=shade)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for x, top, name in zip(positions, bottom, names):
        peak = _mean_sd([r.get("peak_memory_mb") for r in groups[name]])[0]
        ax_memory.annotate(f"peak {peak:.0f} MB", (x, top), ha="center", va="bottom", fontsize=8)
    ax_memory.set(title="training state (peak of the run's process above)", ylabel="MB")
    ax_memory.legend(fontsize=8)
    for ax in (ax_time, ax_memory):
        ax.set_xticks(list(positions), names)
        ax.grid(axis="y", alpha=0.3)

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

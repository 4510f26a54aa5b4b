"""The verdict of a comparison: is a precision within noise of fp32, worse, or better, metric by metric.

Four metrics are judged: the final and the best validation accuracy, and the final and the best held-out loss
(accuracy saturates near a task's ceiling; the loss keeps moving). For each, the difference of the means is
set against the smallest difference the runs could have detected at their spread (``VERDICT_RULE``). A
comparison's seeds pair its runs (seed ``s`` of every precision trains on the same data from the same
initial weights), so the spread that matters is the spread of the per-seed differences; runs that do not pair
up are compared as independent samples.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

__all__ = ["METRICS", "VERDICT_RULE", "Judgement", "Metric", "judge", "summary", "verdict"]


@dataclass(frozen=True)
class Metric:
    """A judged metric: its ``result.json`` key, its label, which way is better, the smallest difference it
    ever calls real (``floor``; a fraction of fp32's mean when ``relative``)."""

    key: str
    label: str
    higher_is_better: bool
    floor: float
    relative: bool = False


METRICS = (
    Metric("val_acc", "final val acc", higher_is_better=True, floor=0.005),
    Metric("best_val_acc", "best val acc", higher_is_better=True, floor=0.005),
    Metric("val_loss", "final val loss", higher_is_better=False, floor=0.01, relative=True),
    Metric("best_val_loss", "best val loss", higher_is_better=False, floor=0.01, relative=True),
)

VERDICT_RULE = (
    "verdict: per metric (final and best validation accuracy, final and best held-out loss), a precision"
    " differs from fp32 when |mean difference| > its detectable difference, max(2 x the standard error of the"
    " difference, a floor of 0.005 in accuracy or 1% of fp32's loss). Runs of the same seed are paired (same"
    " data, same initial weights): the standard error is sd(per-seed differences) / sqrt(seeds); unpaired runs"
    " use sqrt(s^2/n + s_fp32^2/n_fp32). Worse on any metric makes the precision worse (the metric furthest"
    " beyond its detectable difference decides); within noise needs every metric within. One seed: no verdict."
)


@dataclass(frozen=True)
class Judgement:
    """One metric of one precision against fp32: the difference of the means (``None``: not measured), the
    smallest difference these runs could detect (``None``: one seed, no spread), and the outcome."""

    metric: Metric
    difference: float | None
    detectable: float | None
    paired: bool

    @property
    def outcome(self) -> str:
        """``"within noise"``, ``"worse"``, ``"better"``, or ``"no verdict"``."""
        if self.difference is None or self.detectable is None:
            return "no verdict"
        if abs(self.difference) <= self.detectable:
            return "within noise"
        better = (self.difference > 0) == self.metric.higher_is_better
        return "better" if better else "worse"

    @property
    def excess(self) -> float:
        """How many detectable differences the difference is (what picks the deciding metric)."""
        if self.difference is None or not self.detectable:
            return 0.0
        return abs(self.difference) / self.detectable


def _values(runs: list[dict[str, Any]], key: str) -> dict[int | None, float]:
    return {r.get("seed"): float(r[key]) for r in runs if r.get(key) is not None}


def judge(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> list[Judgement]:
    """Each metric of ``runs`` (one precision, its seeds) against ``reference`` (fp32's runs)."""
    judgements = []
    for metric in METRICS:
        ours, theirs = _values(runs, metric.key), _values(reference, metric.key)
        if not ours or not theirs:
            judgements.append(Judgement(metric, None, None, paired=False))
            continue
        difference = statistics.fmean(ours.values()) - statistics.fmean(theirs.values())
        floor = metric.floor * abs(statistics.fmean(theirs.values())) if metric.relative else metric.floor
        shared = [seed for seed in ours if seed in theirs]
        paired = None not in shared and len(shared) == len(ours) == len(theirs) and len(shared) > 1
        if paired:
            deltas = [ours[seed] - theirs[seed] for seed in shared]
            error = statistics.stdev(deltas) / math.sqrt(len(deltas))
        elif len(ours) > 1 and len(theirs) > 1:
            a, b = list(ours.values()), list(theirs.values())
            error = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
        else:
            judgements.append(Judgement(metric, difference, None, paired=False))
            continue
        judgements.append(Judgement(metric, difference, max(2 * error, floor), paired))
    return judgements


def summary(judgements: list[Judgement], against: str = "fp32") -> tuple[str, str]:
    """The verdict and the metric that decided it: worse on any metric decides first, then better; within
    noise needs every measured metric within. ``against`` names the reference in the text."""
    measured = [j for j in judgements if j.outcome != "no verdict"]
    if not measured:
        return "one seed: no verdict (use seeds=3)", "-"
    for outcome in ("worse", "better"):
        beyond = [j for j in measured if j.outcome == outcome]
        if beyond:
            decider = max(beyond, key=lambda j: j.excess)
            text = f"{outcome} than {against}: {decider.metric.label} {decider.difference:+.3f}"
            return f"{text} (detectable {decider.detectable:.3f})", decider.metric.label
    return f"within noise of {against}", f"all {len(measured)} metrics within"


def verdict(runs: list[dict[str, Any]], reference: list[dict[str, Any]], against: str = "fp32") -> str:
    """The verdict of ``runs`` against ``reference`` (named ``against``) as one line (see ``VERDICT_RULE``)."""
    if runs is reference:
        return "reference"
    return summary(judge(runs, reference), against)[0]

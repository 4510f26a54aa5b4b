"""A run's precision report: one JSON document, rendered as markdown, a PNG plot and a rich console table.

Schema (``schema: "lightning-mp/precision-report/1"``):

``run``
    ``precision``, ``device``, ``optimizer_steps``, ``skipped_steps``, ``rescued_steps`` (fp16 re-runs instead
    of skips), ``overflow_counts`` (events per phase), ``scaler`` (``policy``, ``final_scale``, ``stats``
    counters; ``null`` without a scaler), ``versions``.
``scale_history``
    ``[[step, scale], ...]`` after every optimizer step (at most ``MAX_POINTS``, evenly thinned); empty
    without a scaler.
``events``
    every kept ``OverflowEvent`` as a dict: ``step, phase, module, kind, dtype, scale, action``.
``promotions``
    ``[{module, reason, step, detail, scope}]`` for every module running in fp32 at the end, with why, and whether
    all of it (``"module"``) or only its own operations (``"own_code"``) run in fp32.
``low_bit``
    fp8/int8 runs (else ``null``): ``format``, ``recipe`` and ``layers``: ``{fqn: {now, moved, latest, worst}}``,
    ``now`` the format the layer multiplies in at the end, ``moved`` its move back to bf16 (``{reason, step,
    detail}``) or ``null``, ``latest`` its last sample (``lowbit.LayerSample``: amax of input, weight and output
    gradient, underflow and saturation shares, GEMM signal-to-noise in dB against bf16) and ``worst`` the lowest
    signal-to-noise and highest underflow and saturation it showed.
``weights``
    ``weights_dtype`` (``null``: fp32 weights), ``master_weights`` (the remedy in force), ``memory`` (bytes of
    weights, gradients, optimizer state, master copies and compensation buffers in their real dtypes, their
    ``total``, the same state's ``fp32_total`` and ``share_of_fp32``), ``lost_updates``: ``{module: {unchanged,
    lost, worst_lost, elements}}`` at the last sample (``lightning_mp.weights.lost``), ``lost_update_share`` over
    every measured element (the last sample; ``lost_update_mean``: over the run's samples;
    ``state_lost_update_mean``: the optimizer state's, over the run), and ``losing``: the
    modules warned about.
``modules``
    ``{fqn: {activation_amax, activation_headroom_bits, grad_amax, grad_headroom_bits, underflow_fraction,
    samples}}`` from the sampled statistics; headroom is in bits below the low-precision format's max
    (``grad_amax`` includes the loss scale, as the fp16 backward saw it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA = "lightning-mp/precision-report/1"
MAX_POINTS = 2000

__all__ = [
    "SCHEMA",
    "build_report",
    "headroom_metrics",
    "low_bit_metrics",
    "lost_update_metrics",
    "sampled_metrics",
    "low_bit_summary",
    "run_metrics",
    "render_markdown",
    "render_png",
    "render_table",
    "write_report",
]


def _finite_or_none(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def build_report(plugin: Any, scale_history: list[tuple[int, float]]) -> dict[str, Any]:
    """Collect everything an ``AdaptiveMP`` decided and measured into the report document."""
    import lightning
    import torch

    import lightning_mp

    if len(scale_history) > MAX_POINTS:
        stride = math.ceil(len(scale_history) / MAX_POINTS)
        scale_history = scale_history[::stride] + [scale_history[-1]]
    modules = {
        fqn: {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in stats.items()}
        for fqn, stats in plugin.statistics.summary(plugin.stats_dtype).items()
    }
    scaler = plugin.scaler
    return {
        "schema": SCHEMA,
        "run": {
            "precision": plugin.precision,
            "device": plugin.device,
            "optimizer_steps": plugin.optimizer_steps,
            "skipped_steps": plugin.skipped_steps,
            "rescued_steps": plugin.rescued_steps,
            "overflow_counts": dict(plugin.overflow_counts),
            "scaler": None
            if scaler is None
            else {"policy": scaler.config.policy, "final_scale": scaler.get_scale(), "stats": scaler.counters},
            "versions": {
                "lightning_mp": lightning_mp.__version__,
                "torch": torch.__version__,
                "lightning": lightning.__version__,
            },
        },
        "scale_history": [[int(step), float(scale)] for step, scale in scale_history],
        "events": [e.to_dict() for e in plugin.overflow_events],
        "promotions": [vars(p).copy() for p in plugin.promotions if p.scope != "low_bit"],
        "low_bit": _low_bit_section(plugin),
        "weights": _weights_section(plugin),
        "modules": modules,
    }


def _weights_section(plugin: Any) -> dict[str, Any]:
    weights = plugin.core.weights
    return {
        "weights_dtype": None if weights.dtype is None else str(weights.dtype).removeprefix("torch."),
        "master_weights": weights.remedy,
        "memory": dict(weights.memory),
        "lost_updates": weights.lost.summary(),
        "lost_update_share": weights.lost.overall(),
        "lost_update_mean": weights.lost.mean(),
        "state_lost_update_mean": weights.lost.state_mean(),
        "losing": list(weights.lost.losing),
    }


def sampled_metrics(plugin: Any, top_k: int) -> dict[str, float]:
    """What a sampled step adds to the logs: headroom and underflow of the ``top_k`` modules with the least
    headroom (once statistics were sampled), fp8/int8 layers' figures, and lost updates."""
    metrics = {}
    if plugin.statistics.samples_taken:
        metrics.update(headroom_metrics(plugin.statistics.summary(plugin.stats_dtype), top_k))
    metrics.update(lost_update_metrics(plugin, top_k))
    metrics.update(low_bit_metrics(plugin))  # fp8/int8: each layer's latest signal-to-noise and underflow
    return metrics


def lost_update_metrics(plugin: Any, top_k: int) -> dict[str, float]:
    """``precision/lost_updates`` (the last sample's share of the update lost to rounding, over every measured
    element) and ``precision/lost_updates/<module>`` for the ``top_k`` modules losing the most."""
    lost = plugin.core.weights.lost
    overall = lost.overall()
    if overall is None:
        return {}
    metrics = {"precision/lost_updates": overall}
    for module, sample in sorted(lost.latest.items(), key=lambda item: -item[1].lost)[:top_k]:
        metrics[f"precision/lost_updates/{module}"] = sample.lost
    return metrics


def _low_bit_section(plugin: Any) -> dict[str, Any] | None:
    low_bit = getattr(plugin, "low_bit", None)
    if low_bit is None or low_bit.kind is None:
        return None
    layers = {}
    for fqn in low_bit.converted:
        moved = low_bit.moved.get(fqn)
        latest = low_bit.latest.get(fqn)
        layers[fqn] = {
            "now": "bf16" if fqn in low_bit.moved else low_bit.kind,
            "moved": None
            if moved is None
            else {"reason": str(moved.reason), "step": moved.step, "detail": moved.detail},
            "latest": None if latest is None else {k: _finite_or_none(v) for k, v in vars(latest).items()},
            "worst": {k: _finite_or_none(v) for k, v in low_bit.worst.get(fqn, {}).items()},
        }
    recipe = low_bit.recipe if low_bit.kind == "fp8" else "rowwise"
    return {"format": low_bit.kind, "recipe": recipe, "layers": layers}


def _moved(promotion: Any) -> dict[str, Any]:
    return {"reason": str(promotion.reason), "step": promotion.step, "detail": promotion.detail}


def low_bit_metrics(plugin: Any) -> dict[str, float]:
    """``precision/low_bit/snr_db/<fqn>`` and ``precision/low_bit/underflow/<fqn>`` of each fp8/int8 layer's
    latest sample (empty for the other precisions)."""
    low_bit = getattr(plugin, "low_bit", None)
    if low_bit is None:
        return {}
    metrics = {}
    for fqn in low_bit.layers:
        sample = low_bit.latest.get(fqn)
        if sample is not None:
            metrics[f"precision/low_bit/snr_db/{fqn}"] = sample.snr_db
            metrics[f"precision/low_bit/underflow/{fqn}"] = sample.underflow
    return {k: v for k, v in metrics.items() if v == v and abs(v) != float("inf")}


def run_metrics(plugin: Any) -> dict[str, float]:
    """The run's figures under their logged names: ``precision/skipped_steps``, ``precision/overflow_events``,
    ``precision/fp32_modules`` and, with a scaler, ``precision/loss_scale`` (a host float: no device sync)."""
    metrics = {
        "precision/skipped_steps": plugin.skipped_steps,
        "precision/rescued_steps": plugin.rescued_steps,
        "precision/overflow_events": sum(plugin.overflow_counts.values()),
        "precision/fp32_modules": len(plugin.fp32_modules),
    }
    if getattr(plugin, "low_bit", None) is not None and plugin.low_bit.kind is not None:
        metrics["precision/low_bit_layers"] = len(plugin.low_bit_layers)
    if plugin.scaler is not None:
        metrics["precision/loss_scale"] = plugin.scaler.get_scale()
    return metrics


def headroom_metrics(summary: dict[str, dict[str, float]], top_k: int) -> dict[str, float]:
    """``precision/headroom_bits/<fqn>`` (lowest of activation and gradient) and ``precision/underflow/<fqn>``
    for the ``top_k`` modules with the least headroom in a statistics ``summary``; finite values only."""

    metrics = {}
    for fqn, stats in sorted(summary.items(), key=lambda item: _lowest(item[1]))[:top_k]:
        metrics[f"precision/headroom_bits/{fqn}"] = _lowest(stats)
        metrics[f"precision/underflow/{fqn}"] = stats["underflow_fraction"]  # None outside fp16: not logged
    return {k: v for k, v in metrics.items() if v is not None and v == v and abs(v) != float("inf")}


def _lowest_headroom(report: dict[str, Any], limit: int) -> list[tuple[str, dict[str, Any]]]:
    return sorted(report["modules"].items(), key=lambda item: _lowest(item[1]))[:limit]


def render_markdown(report: dict[str, Any], limit: int = 10) -> str:
    run = report["run"]
    lines = [
        "# Precision report",
        "",
        f"- precision: `{run['precision']}` on `{run['device']}`",
        f"- optimizer steps: {run['optimizer_steps']}, skipped: {run['skipped_steps']},"
        f" rescued: {run.get('rescued_steps', 0)}",
        f"- overflow events by phase: {run['overflow_counts'] or 'none'}",
    ]
    if run["scaler"]:
        stats = run["scaler"]["stats"]
        lines.append(
            f"- loss scale: `{run['scaler']['policy']}` policy, final {run['scaler']['final_scale']:g},"
            f" {stats['backoffs']} back-offs, {stats['growths']} growths"
        )
    lines += ["", "## Modules in fp32", ""]
    if report["promotions"]:
        lines += ["| module | reason | scope | step | detail |", "|---|---|---|---|---|"]
        lines += [
            f"| `{p['module']}` | {p['reason']} | {p.get('scope', 'module')} |"
            f" {p['step'] if p['step'] is not None else ''} | {p['detail']} |"
            for p in sorted(report["promotions"], key=lambda p: p["reason"] not in RUN_TIME_REASONS)
        ]
    else:
        lines.append("none")
    lines += _low_bit_markdown(report.get("low_bit"))
    lines += _weights_markdown(report.get("weights"), limit)
    lines += ["", "## Overflow events", ""]
    if report["events"]:
        lines += [
            "| step | phase | module | operation | source | kind | dtype | scale | action |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in report["events"][-limit:]:
            scale = f"{e['scale']:g}" if e["scale"] is not None else ""
            op = f"`{e['op']}`" if e.get("op") else ("not reproduced" if e.get("reproduced") is False else "")
            lines.append(
                f"| {e['step']} | {e['phase']} | `{e['module'] or '-'}` | {op} | {e.get('source') or ''} | {e['kind']}"
                f" | {e['dtype']} | {scale} | {e['action']} |"
            )
        if len(report["events"]) > limit:
            lines.append(f"\n(last {limit} of {len(report['events'])} kept events)")
    else:
        lines.append("none")
    lines += ["", f"## Lowest headroom (bits below the {run['precision']} format's max)", ""]
    if report["modules"]:
        lines += ["| module | activation bits | gradient bits | underflow | samples |", "|---|---|---|---|---|"]
        for fqn, s in _lowest_headroom(report, limit):
            act, grad = s["activation_headroom_bits"], s["grad_headroom_bits"]
            lines.append(
                f"| `{fqn}` | {_fmt(act)} | {_fmt(grad)} | {_percent(s['underflow_fraction'])} | {s['samples']} |"
            )
    else:
        lines.append("no statistics sampled")
    return "\n".join(lines) + "\n"


def _low_bit_markdown(section: dict[str, Any] | None) -> list[str]:
    if not section:
        return []
    kind = section["format"]
    lines = ["", f"## {kind} layers ({section['recipe']} scaling)", ""]
    if not section["layers"]:
        return [*lines, f"no layer was converted to {kind} (see the default selection in lightning_mp.lowbit)"]
    lines += [
        "| layer | now | input amax | weight amax | grad amax | underflow (worst) | saturation | SNR dB (worst) |"
        " moved back |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fqn, layer in section["layers"].items():
        s, w, moved = layer["latest"] or {}, layer["worst"], layer["moved"]
        under = f"{_percent(_max_underflow(s))} ({_percent(w.get('underflow'))})"
        snr = f"{_num(s.get('snr_db'), '{:.1f}')} ({_num(w.get('snr_db'), '{:.1f}')})"
        back = f"step {moved['step']}: {moved['reason']}, {moved['detail']}" if moved else ""
        lines.append(
            f"| `{fqn}` | {layer['now']} | {_num(s.get('input_amax'))} | {_num(s.get('weight_amax'))} |"
            f" {_num(s.get('grad_amax'))} | {under} | {_percent(s.get('saturation'))} | {snr} | {back} |"
        )
    return lines


def _weights_markdown(section: dict[str, Any] | None, limit: int) -> list[str]:
    if not section:
        return []
    dtype = section["weights_dtype"] or "float32"
    lines = ["", f"## Weights ({dtype}) and their updates", ""]
    if section["weights_dtype"] is not None:
        lines.append(f"- remedy for lost updates: `master_weights={section['master_weights']!r}`")
    memory = section["memory"]
    if memory:
        parts = ("weights", "gradients", "optimizer_state", "master_copies", "compensation")
        lines.append(
            "- training state: "
            + ", ".join(f"{part.replace('_', ' ')} {_bytes(memory.get(part, 0))}" for part in parts)
            + f"; total {_bytes(memory['total'])}, {memory['share_of_fp32']:.0%} of the same state in fp32"
        )
    lost = section["lost_updates"]
    if not lost:
        return [*lines, "- lost updates: not sampled"]
    lines.append(
        f"- lost updates (share of the intended update rounded away): {section['lost_update_share']:.1%} at the last"
        f" sample, {section.get('lost_update_mean') or 0:.1%} over the run"
    )
    if section.get("state_lost_update_mean") is not None:
        lines.append(
            f"- optimizer state's lost updates (its moments), over the run: {section['state_lost_update_mean']:.1%}"
        )
    if section["losing"]:
        lines.append(f"- modules losing over half of their updates: {', '.join(section['losing'])}")
    lines += ["", "| module | lost (worst) | elements unchanged |", "|---|---|---|"]
    for module, s in sorted(lost.items(), key=lambda item: -item[1]["lost"])[:limit]:
        lines.append(f"| `{module}` | {s['lost']:.1%} ({s['worst_lost']:.1%}) | {s['unchanged']:.1%} |")
    return lines


def _bytes(value: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _max_underflow(sample: dict[str, Any]) -> float | None:
    values = [sample.get(k) for k in ("input_underflow", "weight_underflow", "grad_underflow")]
    return max((v for v in values if v is not None), default=None)


def _num(value: float | None, fmt: str = "{:.3g}") -> str:
    return "-" if value is None else fmt.format(value)


def low_bit_summary(section: dict[str, Any] | None) -> str | None:
    """``"12 in fp8, 1 moved back to bf16: blocks.0.mlp.fc1 (quantization)"``, or ``None`` without low-bit."""
    if not section:
        return None
    layers = section["layers"]
    moved = [f"{fqn} ({layer['moved']['reason']})" for fqn, layer in layers.items() if layer["moved"]]
    text = f"{len(layers) - len(moved)} in {section['format']}"
    return text + (f", {len(moved)} moved back to bf16: {', '.join(moved)}" if moved else "")


# Headroom below this many bits (within 256x of the format's largest value) is worth a user's attention.
RISKY_HEADROOM_BITS = 8.0


# Promotions decided during the run say more than the configured ones: they come first in every summary.
RUN_TIME_REASONS = ("overflow", "kernel error", "escalation")


def promotion_summary(promotions: list[dict[str, Any]], limit: int = 8) -> str:
    """``"net.2 (overflow, own code), conv_in (kernel error), ln_f (default) (+12 more)"``: run-time promotions
    first, then the static and default ones, at most ``limit`` shown."""
    ordered = sorted(promotions, key=lambda p: p["reason"] not in RUN_TIME_REASONS)  # stable within each kind
    shown = [f"{p['module']} ({p['reason']}{', own code' if p.get('scope') == 'own_code' else ''})" for p in ordered]
    text = ", ".join(shown[:limit]) or "none"
    return text + (f" (+{len(shown) - limit} more)" if len(shown) > limit else "")


def _lowest(stats: dict[str, Any]) -> float:
    values = [stats.get("activation_headroom_bits"), stats.get("grad_headroom_bits")]
    return min((v for v in values if v is not None), default=float("inf"))


def _fmt(bits: float | None) -> str:
    return "-" if bits is None else f"{bits:.1f}"


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.2%}"


def render_png(report: dict[str, Any], path: Path, limit: int = 15) -> Path:
    """Loss scale over steps with overflow events marked, and per-module headroom bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    history = report["scale_history"]
    precision = report["run"]["precision"]
    phases = sorted({e["phase"] for e in report["events"]})
    # A bf16 / fp32 run without a skipped step has no scale and no event to draw: its figure is the headroom
    # panel alone, headed by the step count, rather than an empty axis.
    if history or phases:
        fig, (ax_scale, ax_head) = plt.subplots(1, 2, figsize=(13, 4.5))
    else:
        fig, ax_head = plt.subplots(1, 1, figsize=(7, 4.5))
        ax_scale = None
    if history:  # fp16: the loss scale over steps, events marked at the scale they happened at
        steps, scales = zip(*history)
        ax_scale.step(steps, scales, where="post", label="loss scale")
        ax_scale.set_yscale("log", base=2)
        for phase, marker in zip(phases, "ovsx^"):
            events = [e for e in report["events"] if e["phase"] == phase]
            y = [e["scale"] if e["scale"] is not None else 1.0 for e in events]
            ax_scale.scatter([e["step"] for e in events], y, marker=marker, label=f"{phase} overflow", zorder=3)
        ax_scale.set(xlabel="optimizer step", ylabel="loss scale", title=f"Loss scale ({precision})")
    elif phases:  # bf16 / fp32: no scale to draw; skipped steps over the run, by phase
        for row, phase in enumerate(phases):
            steps = [e["step"] for e in report["events"] if e["phase"] == phase]
            ax_scale.scatter(steps, [row] * len(steps), marker="|", s=200, label=f"{phase} ({len(steps)})")
        ax_scale.set_yticks(range(len(phases)), phases)
        title = f"Skipped steps ({precision}): {report['run']['skipped_steps']} of {report['run']['optimizer_steps']}"
        ax_scale.set(xlabel="optimizer step", title=title)
    if ax_scale is not None:
        ax_scale.legend(loc="best", fontsize=8)
    rows = _lowest_headroom(report, limit)
    risky = [(fqn, stats) for fqn, stats in rows if _lowest(stats) < RISKY_HEADROOM_BITS]
    if risky or (rows and history):
        shown = risky or rows
        names = [fqn for fqn, _ in shown][::-1]
        act = [s["activation_headroom_bits"] or 0.0 for _, s in shown][::-1]
        # Not measured (bf16 / fp32 parameter gradients): no bar, rather than a bar of 0 bits.
        grad = [math.nan if s["grad_headroom_bits"] is None else s["grad_headroom_bits"] for _, s in shown][::-1]
        pos = range(len(names))
        ax_head.barh([p + 0.2 for p in pos], act, height=0.4, label="activations")
        ax_head.barh([p - 0.2 for p in pos], grad, height=0.4, label="gradients")
        ax_head.set_yticks(list(pos), names, fontsize=7)
        ax_head.legend(loc="best", fontsize=8)
        ax_head.set(xlabel="headroom (bits below the format's max)", title="Lowest per-module headroom")
    else:  # the format's range is no risk here: say so, and show what runs in fp32 instead of 120-bit bars
        lowest = min((_lowest(s) for _, s in rows), default=None)
        run = report["run"]
        lines = [
            f"range is no risk in {precision}",
            f"optimizer steps: {run['optimizer_steps']}, skipped: {run['skipped_steps']}",
        ]
        if lowest is not None:
            lines.append(f"lowest headroom of any module: {lowest:.0f} bits")
        lines.append("fp32 modules: " + promotion_summary(report["promotions"], limit=6))
        ax_head.text(0.02, 0.5, "\n".join(lines), va="center", transform=ax_head.transAxes, fontsize=10)
        ax_head.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_table(report: dict[str, Any], limit: int = 8) -> Any:
    """A rich Table summarising the run, for the console."""
    from rich.table import Table

    run = report["run"]
    table = Table(title=f"lightning-mp precision report ({run['precision']})", show_lines=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    if run["scaler"] is not None:  # rescues exist in fp16 only
        steps = f"{run['optimizer_steps']} / {run['skipped_steps']} / {run.get('rescued_steps', 0)}"
        table.add_row("optimizer steps / skipped / rescued", steps)
    else:
        table.add_row("optimizer steps / skipped", f"{run['optimizer_steps']} / {run['skipped_steps']}")
    if run["scaler"]:
        table.add_row("final loss scale", f"{run['scaler']['final_scale']:g} ({run['scaler']['policy']})")
    table.add_row("overflow events", ", ".join(f"{k}: {v}" for k, v in run["overflow_counts"].items()) or "none")
    table.add_row("fp32 modules", promotion_summary(report["promotions"], limit))
    low_bit = low_bit_summary(report.get("low_bit"))
    if low_bit is not None:
        table.add_row("low-bit layers", low_bit)
    weights = report.get("weights") or {}
    if weights.get("weights_dtype"):
        table.add_row("weights", f"{weights['weights_dtype']}, master_weights={weights['master_weights']!r}")
    if weights.get("memory"):
        memory = weights["memory"]
        table.add_row("training state", f"{_bytes(memory['total'])} ({memory['share_of_fp32']:.0%} of fp32)")
    if weights.get("lost_update_share") is not None:
        worst = max(weights["lost_updates"].items(), key=lambda item: item[1]["lost"])
        last, mean = weights["lost_update_share"], weights.get("lost_update_mean") or 0.0
        table.add_row(
            "lost updates", f"{mean:.1%} over the run, {last:.1%} last (most: {worst[0]} {worst[1]['lost']:.0%})"
        )
    for fqn, s in _lowest_headroom(report, 3):
        if _lowest(s) >= RISKY_HEADROOM_BITS:
            continue  # bf16/fp32 headroom is over 100 bits: not worth a line, let alone "low"
        table.add_row(
            f"low headroom: {fqn}",
            f"act {_fmt(s['activation_headroom_bits'])} bits, grad {_fmt(s['grad_headroom_bits'])} bits,"
            f" underflow {_percent(s['underflow_fraction'])}",
        )
    return table


def write_report(report: dict[str, Any], directory: str | Path) -> dict[str, Path]:
    """Write ``precision_report.json``, ``.md`` and ``.png`` into ``directory``; return their paths.

    Each file is written to a temporary name first and renamed, so an interrupted write never leaves a
    truncated report behind.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": directory / "precision_report.json",
        "markdown": directory / "precision_report.md",
        "png": directory / "precision_report.png",
    }
    _atomic_text(paths["json"], json.dumps(report, indent=2, allow_nan=False))
    _atomic_text(paths["markdown"], render_markdown(report))
    tmp = paths["png"].with_suffix(".tmp.png")
    render_png(report, tmp)
    tmp.replace(paths["png"])
    return paths


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)

"""``lightning-mp compare``: one recipe under several precisions (and seeds), tables relative to fp32, a verdict
per metric, a plot.

Each run is its own ``lightning-mp train`` process (so peak memory is per run). The accuracy table reports
means and spreads over the seeds and, per metric, the difference from fp32 and the smallest difference the runs
could have detected; ``verdict.py`` holds the rule (``VERDICT_RULE``). The cost table reports speed, memory
and the bytes of training state; ``compare_plot.py`` draws the learning curves and the costs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightning_mp.cli.compare_plot import plot_comparison
from lightning_mp.cli.compose import PRECISION_ALIASES, compose
from lightning_mp.cli.errors import TrainingFailed
from lightning_mp.cli.help import list_configs
from lightning_mp.cli.verdict import METRICS, VERDICT_RULE, judge, summary, verdict
from lightning_mp.errors import ConfigError, invalid

__all__ = [
    "COLUMNS",
    "COST_COLUMNS",
    "VERDICT_RULE",
    "compare",
    "comparison_markdown",
    "comparison_table",
    "verdict",
]


def compare(overrides: list[str]) -> list[dict[str, Any]]:
    """Train the same recipe under each precision, ``seeds=N`` times each (one process per run, so peak memory
    is per run), and print and save a table of means and spreads, relative to fp32, with a verdict per
    precision (see ``verdict``)."""
    precisions, seeds, rest = _split_precisions(overrides)
    cfg = compose(rest)  # fail fast on a bad override, before the first run
    out = Path(os.path.expanduser(str(cfg.output_dir))).parent / "compare"
    if (out / "compare.json").exists() and not cfg.overwrite:
        allowed = "compare into another output_dir=..., or replace it with overwrite=true"
        problem = f"already has a comparison beside it ({out / 'compare.json'})"
        raise invalid("output_dir", str(cfg.output_dir), allowed, problem=problem)
    if cfg.overwrite:
        rest = [*[o for o in rest if not o.startswith("overwrite=")], "overwrite=true"]
    rest = [o for o in rest if not o.startswith("seed=")]
    runs = [(name, cfg.seed + i) for name in precisions for i in range(seeds)]
    rows = []
    for index, (name, seed) in enumerate(runs, start=1):
        run_dir = out / name / f"seed={seed}" if seeds > 1 else out / name
        run_overrides = [*rest, f"precision={name}", f"seed={seed}", f"output_dir='{run_dir}'"]  # quoted: has '='
        finished = None if cfg.overwrite else _finished_run(run_dir, run_overrides)
        if finished is not None:
            print(
                f"[{index}/{len(runs)}] {cfg.recipe_name} under {name}, seed {seed}: kept, finished earlier with "
                f"the same config ({run_dir})",
                flush=True,
            )
            rows.append({**finished, "seed": seed})
            continue
        print(f"[{index}/{len(runs)}] {cfg.recipe_name} under {name}, seed {seed} -> {run_dir}", flush=True)
        command = [sys.executable, "-m", "lightning_mp.cli", "train", *run_overrides]
        if (run_dir / "config.yaml").exists() and not cfg.overwrite:
            command.append("overwrite=true")  # an unfinished run of this comparison (interrupted): start it again
        proc = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode == 2:  # the run printed the user's mistake as its one line
            raise ConfigError(f"the {name} run (seed {seed}) was refused: its error is the line above.")
        if proc.returncode != 0:
            raise TrainingFailed(f"the {name} run (seed {seed}) failed with exit status {proc.returncode}; see above.")
        rows.append({**json.loads((run_dir / "result.json").read_text()), "seed": seed})
    table = comparison_table(rows)
    title = f"{cfg.recipe_name}: precision comparison, {seeds} seed(s) each"
    notes = [VERDICT_RULE]
    if any(r.get("speed_emulated") for r in rows):
        notes.append(EMULATED_NOTE)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    (out / "compare.md").write_text(f"# {title}\n\n" + comparison_markdown(table) + "\n" + "\n\n".join(notes) + "\n")
    plot_comparison(group_by_precision(rows), out / "compare.png", title)
    _print_table(table, title=f"{title} ({out})")
    print("\n".join(notes))
    print(f"lightning-mp: comparison written to {out} (compare.md, compare.json, compare.png)")
    return rows


def _finished_run(run_dir: Path, overrides: list[str]) -> dict[str, Any] | None:
    """The result of a run an earlier, interrupted ``compare`` finished with exactly this run's config, or None.
    A comparison stopped halfway (a crash, Ctrl-C, a lost machine) resumes where it stopped instead of training
    its finished runs again; a run whose config differs in anything but ``overwrite`` is trained again."""
    result, saved = run_dir / "result.json", run_dir / "config.yaml"
    if not (result.exists() and saved.exists()):
        return None
    wanted = OmegaConf.to_container(compose(overrides), resolve=True)
    earlier = OmegaConf.to_container(OmegaConf.create(saved.read_text()), resolve=True)
    for config in (wanted, earlier):
        config.pop("overwrite", None)
    return json.loads(result.read_text()) if wanted == earlier else None


def _split_precisions(overrides: list[str]) -> tuple[list[str], int, list[str]]:
    precisions, seeds, rest = ["fp32", "bf16", "fp16"], 1, []
    for item in overrides:
        if item.startswith("precisions="):
            precisions = [p.strip() for p in item.split("=", 1)[1].strip("[]").split(",") if p.strip()]
            precisions = [PRECISION_ALIASES.get(p, p) for p in precisions]
        elif item.startswith("seeds="):
            value = item.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise invalid("seeds", value, "must be an integer >= 1 (runs per precision)")
            seeds = int(value)
        elif item.startswith("precision="):
            allowed = "use precisions=fp32,bf16,fp16 (compare runs several)"
            raise invalid("precision", item.split("=", 1)[1], allowed, problem="is not taken by compare")
        else:
            rest.append(item)
    known = [name for name, _ in list_configs()["precision"]]  # the precision group's options, yours included
    unknown = [p for p in precisions if p not in known]
    if unknown or not precisions:
        raise invalid("precisions", ",".join(precisions), f"choose from {', '.join(known)}")
    return precisions, seeds, rest


COLUMNS = (
    ("precision", "precision"),
    ("runs", "seeds"),
    ("val_acc", "final val acc"),
    ("d_val_acc", "vs fp32 (detectable)"),
    ("best_val_acc", "best val acc"),
    ("d_best_val_acc", "vs fp32 (detectable)"),
    ("val_loss", "final val loss"),
    ("d_val_loss", "vs fp32 (detectable)"),
    ("best_val_loss", "best val loss"),
    ("d_best_val_loss", "vs fp32 (detectable)"),
    ("verdict", "verdict"),
    ("decided_by", "decided by"),
)
"""The accuracy table: each metric as mean +- sd over the seeds, its difference from fp32 and the smallest
difference the runs could have detected, the verdict and the metric that decided it."""

COST_COLUMNS = (
    ("precision", "precision"),
    ("samples_per_s", "samples/s"),
    ("speedup", "speed vs fp32"),
    ("ms_per_step", "ms/step"),
    ("peak_memory_mb", "peak MB"),
    ("weights_mb", "weights MB"),
    ("gradients_mb", "grads MB"),
    ("optimizer_mb", "optimizer MB"),
    ("remedy_mb", "masters + comp. MB"),
    ("state_share", "state vs fp32"),
    ("lost_updates", "lost updates"),
    ("skipped_steps", "skipped"),
    ("fp32_promotions", "fp32 promotions"),
    ("low_bit", "low-bit layers (moved to bf16)"),
)
"""The cost table: speed (marked when this device only emulates the format), peak memory of the run's process,
the bytes of weights, gradients, optimizer state and a remedy's fp32 masters and compensation buffers (their real
dtypes), that training state's share of the same state in fp32, the share of the update lost to rounding (mean
over the run's samples), skipped steps and promotions."""


EMULATED_NOTE = (
    "speed: a format marked (emulated) has no arithmetic instructions on this device (a CPU without bf16 or fp16"
    " instructions converts to fp32 and back around every operation); its speed says nothing about hardware"
    " that has them."
)


def _remedy_bytes(run: dict[str, Any]) -> float | None:
    state = run.get("state_bytes") or {}
    if "master_copies" not in state:
        return None
    return state["master_copies"] + state.get("compensation", 0)


def _stats(values: list[float]) -> tuple[float | None, float | None, int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def group_by_precision(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["precision"], []).append(r)
    return groups


def comparison_table(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row of display strings per precision (means and spreads over its seeds), relative to fp32 (or the
    first precision when fp32 did not run), with a verdict per metric; the keys of ``COLUMNS`` and
    ``COST_COLUMNS``."""
    groups = group_by_precision(rows)
    reference = groups.get("fp32", next(iter(groups.values())))

    def mean(runs, key):
        return _stats([r.get(key) for r in runs])[0]

    def spread(runs, key, fmt):
        m, sd, _ = _stats([r.get(key) for r in runs])
        if m is None:
            return "-"
        return fmt.format(m) + (f" +- {fmt.format(sd)}" if sd is not None else "")

    def megabytes(runs, part):
        return _num(_stats([(r.get("state_bytes") or {}).get(part) for r in runs])[0], "{:.2f}", scale=2**-20)

    table = []
    for name, runs in groups.items():
        is_reference = runs is reference
        judgements = {j.metric.key: j for j in judge(runs, reference)}
        text, decided_by = ("reference", "-") if is_reference else summary(list(judgements.values()))
        speed, base_speed = mean(runs, "samples_per_s"), mean(reference, "samples_per_s")
        resolved = runs[0].get("resolved_precision")
        promotions = sorted({m for r in runs for m in r.get("fp32_promotions") or []})
        moved = sorted({m["module"] for r in runs for m in r.get("low_bit_moved") or []})
        converted = runs[0].get("low_bit_layers") or []
        row = {
            "precision": name + (f" ({resolved})" if name == "auto" else ""),
            "runs": str(len(runs)),
            "verdict": text,
            "decided_by": decided_by,
            "samples_per_s": spread(runs, "samples_per_s", "{:.0f}"),
            "speedup": _num(speed / base_speed if speed and base_speed else None, "{:.2f}x")
            + (" (emulated)" if any(r.get("speed_emulated") for r in runs) else ""),
            "ms_per_step": spread(runs, "ms_per_step", "{:.1f}"),
            "peak_memory_mb": _num(mean(runs, "peak_memory_mb"), "{:.0f}"),
            "weights_mb": megabytes(runs, "weights"),
            "gradients_mb": megabytes(runs, "gradients"),
            "optimizer_mb": megabytes(runs, "optimizer_state"),
            "remedy_mb": _num(_stats([_remedy_bytes(r) for r in runs])[0], "{:.2f}", scale=2**-20),
            "state_share": _num(_stats([(r.get("state_bytes") or {}).get("share_of_fp32") for r in runs])[0], "{:.0%}"),
            "lost_updates": _num(mean(runs, "lost_update_share"), "{:.0%}"),
            "skipped_steps": _num(mean(runs, "skipped_steps"), "{:g}"),
            "fp32_promotions": ", ".join(promotions) or "-",
            "low_bit": f"{len(converted)} ({', '.join(moved) or 'none'})" if converted else "-",
        }
        for metric in METRICS:
            row[metric.key] = spread(runs, metric.key, "{:.3f}")
            j = judgements[metric.key]
            if is_reference or j.difference is None:
                row[f"d_{metric.key}"] = "-" if not is_reference else "reference"
            else:
                detectable = f" ({j.detectable:.3f})" if j.detectable is not None else ""
                row[f"d_{metric.key}"] = f"{j.difference:+.3f}{detectable}"
        table.append(row)
    return table


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return fmt.format(value * scale) if value is not None else "-"


def _markdown(table: list[dict[str, str]], columns) -> str:
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "---|" * len(columns)
    lines = ["| " + " | ".join(row[key] for key, _ in columns) + " |" for row in table]
    return "\n".join([header, rule, *lines]) + "\n"


def comparison_markdown(table: list[dict[str, str]]) -> str:
    """The accuracy table, then the cost table, as markdown."""
    return _markdown(table, COLUMNS) + "\n" + _markdown(table, COST_COLUMNS)


def _print_table(table: list[dict[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped or captured output has no terminal width (rich assumes 80 and cuts the headers): give it room.
    console = Console()
    console = Console(width=None if console.is_terminal else 200)
    for columns, heading in ((COLUMNS, title), (COST_COLUMNS, "cost")):
        rich_table = Table(title=heading)
        for _, name in columns:
            rich_table.add_column(name, overflow="fold")
        for row in table:
            rich_table.add_row(*(row[key] for key, _ in columns))
        console.print(rich_table)

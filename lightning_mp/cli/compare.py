"""``lightning-mp compare``: one recipe under several precisions (and seeds), a table relative to fp32, a verdict.

Each run is its own ``lightning-mp train`` process (so peak memory is per run); the table reports means and
spreads over the seeds, and ``verdict`` says whether a precision is within noise of fp32 (``VERDICT_RULE``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lightning_mp.cli.compose import PRECISION_ALIASES, PRECISIONS, compose
from lightning_mp.cli.errors import TrainingFailed
from lightning_mp.errors import ConfigError, invalid

__all__ = ["COLUMNS", "VERDICT_RULE", "compare", "comparison_markdown", "comparison_table", "verdict"]


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
        print(f"[{index}/{len(runs)}] {cfg.recipe_name} under {name}, seed {seed} -> {run_dir}", flush=True)
        command = [sys.executable, "-m", "lightning_mp.cli", "train", *rest]
        command += [f"precision={name}", f"seed={seed}", f"output_dir='{run_dir}'"]  # quoted: the path has '='
        proc = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode == 2:  # the run printed the user's mistake as its one line
            raise ConfigError(f"the {name} run (seed {seed}) was refused: its error is the line above.")
        if proc.returncode != 0:
            raise TrainingFailed(f"the {name} run (seed {seed}) failed with exit status {proc.returncode}; see above.")
        rows.append({**json.loads((run_dir / "result.json").read_text()), "seed": seed})
    table = comparison_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    (out / "compare.md").write_text(comparison_markdown(table) + "\n" + VERDICT_RULE + "\n")
    _print_table(table, title=f"{cfg.recipe_name}: precision comparison, {seeds} seed(s) each ({out})")
    print(VERDICT_RULE)
    return rows


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
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise invalid("precisions", ",".join(precisions), f"choose from {', '.join(PRECISIONS)}")
    return precisions, seeds, rest


COLUMNS = (
    ("precision", "precision"),
    ("runs", "seeds"),
    ("val_acc", "final val acc"),
    ("d_acc", "vs fp32"),
    ("best_val_acc", "best val acc"),
    ("d_best", "vs fp32"),
    ("val_loss", "val loss"),
    ("samples_per_s", "samples/s"),
    ("speedup", "speed vs fp32"),
    ("peak_memory_mb", "peak MB"),
    ("skipped_steps", "skipped"),
    ("fp32_promotions", "fp32 promotions"),
    ("verdict", "verdict"),
)

VERDICT_RULE = (
    "verdict: a precision is within noise of fp32 when, for the final and for the best validation accuracy,"
    " |mean - fp32 mean| <= max(2 x the standard error of the difference, 0.005), the standard error being"
    " sqrt(s^2/n + s_fp32^2/n_fp32) over the seeds; with one seed there is no spread to judge by."
)


def _stats(values: list[float]) -> tuple[float | None, float | None, int]:
    import statistics

    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def verdict(runs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> str:
    """Whether ``runs`` (one precision, several seeds) is within noise of ``reference`` (fp32): see
    ``VERDICT_RULE``; judged on the final and on the best validation accuracy."""
    if runs is reference:
        return "reference"
    parts = []
    for key, label in (("val_acc", "final"), ("best_val_acc", "best")):
        mean, sd, n = _stats([r.get(key) for r in runs])
        ref_mean, ref_sd, ref_n = _stats([r.get(key) for r in reference])
        if mean is None or ref_mean is None:
            continue
        if sd is None or ref_sd is None:
            return "one seed: no verdict (use seeds=3)"
        bound = max(2 * math.sqrt(sd**2 / n + ref_sd**2 / ref_n), 0.005)
        diff = mean - ref_mean
        if abs(diff) > bound:
            parts.append(f"{label} {diff:+.3f} (beyond {bound:.3f})")
    return "within noise of fp32" if not parts else "differs from fp32: " + ", ".join(parts)


def comparison_table(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row of display strings per precision (means and spreads over its seeds), relative to fp32 (or the
    first precision when fp32 did not run), with a verdict."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["precision"], []).append(r)
    reference = groups.get("fp32", next(iter(groups.values())))

    def mean(runs, key):
        return _stats([r.get(key) for r in runs])[0]

    def spread(runs, key, fmt):
        m, sd, _ = _stats([r.get(key) for r in runs])
        if m is None:
            return "-"
        return fmt.format(m) + (f" +- {fmt.format(sd)}" if sd is not None else "")

    table = []
    for name, runs in groups.items():
        acc, base_acc = mean(runs, "val_acc"), mean(reference, "val_acc")
        best, base_best = mean(runs, "best_val_acc"), mean(reference, "best_val_acc")
        speed, base_speed = mean(runs, "samples_per_s"), mean(reference, "samples_per_s")
        resolved = runs[0].get("resolved_precision")
        promotions = sorted({m for r in runs for m in r.get("fp32_promotions") or []})
        table.append(
            {
                "precision": name + (f" ({resolved})" if name == "auto" else ""),
                "runs": str(len(runs)),
                "val_acc": spread(runs, "val_acc", "{:.3f}"),
                "d_acc": _num(acc - base_acc if acc is not None and base_acc is not None else None, "{:+.3f}"),
                "best_val_acc": spread(runs, "best_val_acc", "{:.3f}"),
                "d_best": _num(best - base_best if best is not None and base_best is not None else None, "{:+.3f}"),
                "val_loss": spread(runs, "val_loss", "{:.3f}"),
                "samples_per_s": spread(runs, "samples_per_s", "{:.0f}"),
                "speedup": _num(speed / base_speed if speed and base_speed else None, "{:.2f}x"),
                "peak_memory_mb": _num(mean(runs, "peak_memory_mb"), "{:.0f}"),
                "skipped_steps": _num(mean(runs, "skipped_steps"), "{:g}"),
                "fp32_promotions": ", ".join(promotions) or "-",
                "verdict": verdict(runs, reference),
            }
        )
    return table


def _num(value: float | None, fmt: str) -> str:
    return fmt.format(value) if value is not None else "-"


def comparison_markdown(table: list[dict[str, str]]) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    lines = ["| " + " | ".join(row[key] for key, _ in COLUMNS) + " |" for row in table]
    return "\n".join([header, rule, *lines]) + "\n"


def _print_table(table: list[dict[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    rich_table = Table(title=title)
    for _, name in COLUMNS:
        rich_table.add_column(name, overflow="fold")
    for row in table:
        rich_table.add_row(*(row[key] for key, _ in COLUMNS))
    # Piped or captured output has no terminal width (rich assumes 80 and cuts the headers): give it room.
    console = Console()
    Console(width=None if console.is_terminal else 160).print(rich_table)

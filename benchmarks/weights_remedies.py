"""Low-precision weights against fp32 on a recipe: where plain bf16 weights fall behind, what each remedy for lost
updates recovers, at what memory, and whether the lost-update share tracks the gap.

Every run is ``lightning-mp train`` in its own process (the installed command), the same recipe and seeds under:
fp32; bf16 autocast (fp32 weights: its lost-update share is the measure's zero); ``bf16-true`` with
``master_weights=null`` (updates round to nearest); ``stochastic`` (torchao's AdamW); ``kahan`` (optimi's AdamW);
``fp32`` master copies. Each is judged against the fp32 runs by the comparison's rule
(``lightning_mp.cli.verdict``: a difference counts when it exceeds the seeds' spread), and its training state's
bytes (weights + gradients + optimizer state + masters + compensation, real dtypes) are given as a share of
fp32's. The lost-update share is the run's mean over its sampled steps' overall figure (every 20th step here).

    python -m benchmarks.weights_remedies                                  # nlp, lr 3e-4, seeds 0-2
    python -m benchmarks.weights_remedies --overrides model.lr=3e-3        # the recipe's own lr
    python -m benchmarks.weights_remedies --seeds 0 --variants fp32 bf16-true

Writes ``benchmarks/results/weights_<recipe>.{md,json,png}`` (the table, every run's result, the loss curves).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "fp32": ["precision=fp32"],
    "bf16 autocast": ["precision=bf16"],
    "bf16-true": ["precision=bf16-true", "precision.master_weights=null"],
    "stochastic": ["precision=bf16-true", "precision.master_weights=stochastic"],
    "kahan": ["precision=bf16-true", "precision.master_weights=kahan"],
    "fp32 masters": ["precision=bf16-true", "precision.master_weights=fp32"],
}
RESULTS = Path(__file__).parent / "results"


def run(recipe: str, overrides: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "lightning_mp.cli", "train", f"recipe={recipe}", "logger=null"]
    command += ["callbacks.progress_bar=null", "callbacks.early_stopping=null", f"output_dir='{out}'"]
    start = time.perf_counter()
    proc = subprocess.run([*command, *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(overrides)}):\n{proc.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    return {**result, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="nlp")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--overrides", nargs="*", default=["model.lr=3e-4"])
    parser.add_argument("--stats-every", type=int, default=20)
    parser.add_argument("--name", default=None, help="results file stem (default weights_<recipe>)")
    parser.add_argument("--replot", action="store_true", help="redraw the table and plot from the saved JSON")
    args = parser.parse_args(argv)
    if args.replot:
        rows = json.loads((RESULTS / f"{args.name or f'weights_{args.recipe}'}.json").read_text())
        write(rows, args)
        return rows
    rows = []
    common = [*args.overrides, f"+precision.stats_every={args.stats_every}"]
    with tempfile.TemporaryDirectory(prefix="lmp-weights-") as tmp:
        for variant in args.variants:
            for seed in args.seeds:
                out = Path(tmp) / f"{variant.replace(' ', '_')}-{seed}"
                result = run(args.recipe, [*VARIANTS[variant], *common, f"seed={seed}"], out)
                rows.append({**result, "precision": variant, "seed": seed})
                print(
                    f"{variant:13} seed {seed}: val acc {result['val_acc']:.3f}  val loss {result['val_loss']:.4f}  "
                    f"state {result['state_bytes'].get('share_of_fp32', 1):.0%} of fp32  "
                    f"lost {_mean_lost(result):.1%} (state {result.get('state_lost_update_share') or 0:.1%})  "
                    f"{result['seconds']:.0f} s",
                    flush=True,
                )
    write(rows, args)
    return rows


def _mean_lost(result: dict) -> float:
    return result.get("lost_update_share") or 0.0


def write(rows: list[dict], args: argparse.Namespace) -> None:
    from lightning_mp.cli.compare import group_by_precision
    from lightning_mp.cli.verdict import VERDICT_RULE, judge, summary

    groups = group_by_precision(rows)
    reference = groups["fp32"]
    lines = [
        f"# {args.recipe}: low-precision weights against fp32 ({', '.join(args.overrides) or 'recipe defaults'},"
        f" seeds {', '.join(map(str, args.seeds))})",
        "",
        "| run | final val loss | final val acc | verdict vs fp32 | training state | share of fp32 | lost updates:"
        " weights | optimizer state |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in groups.items():
        text = "reference" if runs is reference else summary(judge(runs, reference))[0]
        loss = _spread([r["val_loss"] for r in runs], "{:.4f}")
        acc = _spread([r["val_acc"] for r in runs], "{:.3f}")
        state = runs[0]["state_bytes"]
        lost = _spread([_mean_lost(r) for r in runs], "{:.1%}")
        state_lost = _spread([r.get("state_lost_update_share") or 0.0 for r in runs], "{:.1%}")
        lines.append(
            f"| {name} | {loss} | {acc} | {text} | {state.get('total', 0) / 2**20:.2f} MB |"
            f" {state.get('share_of_fp32', 1):.0%} | {lost} | {state_lost} |"
        )
    lines += ["", VERDICT_RULE, ""]
    stem = args.name or f"weights_{args.recipe}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    _plot(groups, RESULTS / f"{stem}.png", lines[0][2:])
    print("\n".join(lines))


def _spread(values: list[float], fmt: str) -> str:
    import statistics

    mean = statistics.fmean(values)
    return fmt.format(mean) + (f" +- {fmt.format(statistics.stdev(values))}" if len(values) > 1 else "")


def _plot(groups: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lost) = plt.subplots(1, 2, figsize=(13, 5))
    for index, (name, runs) in enumerate(groups.items()):
        for k, run in enumerate(runs):
            points = [p for p in run["history"] if "val_loss" in p]
            ax.plot([p["step"] for p in points], [p["val_loss"] for p in points], color=f"C{index}",
                    alpha=0.8, label=name if k == 0 else None)  # fmt: skip
            lost = run.get("lost_update_history") or []
            ax_lost.plot([s for s, _ in lost], [100 * v for _, v in lost], color=f"C{index}", alpha=0.8,
                         label=name if k == 0 else None)  # fmt: skip
    ax.set(xlabel="optimizer step", ylabel="held-out loss", title=title)
    ax_lost.set(xlabel="optimizer step", ylabel="% of the intended update lost (weights)",
                title="lost updates on sampled steps (the LR warms up, then decays)")  # fmt: skip
    for axes in (ax, ax_lost):
        axes.grid(alpha=0.3)
        axes.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""AdaptiveMP on a ``torch.compile``d model against Lightning's plugin: compiled graphs, recompilations, step time.

What compile users care about: hooks that the statistics add and remove on sampled steps must not recompile
the model at every sample (nor exhaust dynamo's recompile limit over a long run), the statistics must still
see the compiled model's modules, and the steady step time must stay within the 1.02 budget. Each round fits
the reference and AdaptiveMP (order rotating) for ``--steps`` steps on a freshly compiled model; the graph and
recompile counts are dynamo's own (``torch._dynamo.utils.counters``, its "Recompiling function" log records).

    python -m benchmarks.compiled                       # Transformer, 500 steps, statistics every 25
    python -m benchmarks.compiled --quick               # CI-sized smoke run (aot_eager, 30 steps)
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch
from lightning.pytorch.plugins import MixedPrecision, Precision

from benchmarks.overhead import Task, Transformer, data, timed_fit
from lightning_mp import AdaptiveMP
from lightning_mp.formats import cpu_has_native_bf16


class RecompileCounter(logging.Handler):
    """Counts dynamo's "Recompiling function ..." records (``torch._logging.set_logs(recompiles=True)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Recompiling function" in record.getMessage():
            self.count += 1


def fit(make_plugin, steps: int, every: int, backend: str) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    counter = RecompileCounter()
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(counter)
    plugin = make_plugin(every)
    try:
        module = torch.compile(Task(Transformer()), backend=backend)
        all_times = timed_fit(plugin, module, data("transformer", steps), steps)
    finally:
        logger.removeHandler(counter)
    times = all_times[5:]  # the first steps compile
    result = {
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "recompiles": counter.count,
        "mean": statistics.fmean(times),
        "median": statistics.median(times),
    }
    if isinstance(plugin, AdaptiveMP):
        summary = plugin.statistics.summary(plugin.stats_dtype)
        result["modules_with_activations"] = sum(1 for s in summary.values() if s["activation_amax"] > 0)
        result["modules"] = len(summary)
        result["samples"] = plugin.statistics.samples_taken
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=25, help="AdaptiveMP(stats_every=...)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.rounds, args.backend = 30, 5, 1, "aot_eager"
    torch.set_num_threads(args.threads)
    torch._logging.set_logs(recompiles=True)
    # bf16 where the CPU runs it natively; elsewhere emulated bf16 kernels are ~10x slower and hide any cost.
    bf16 = cpu_has_native_bf16() or torch.cuda.is_available()
    precision = "bf16-mixed" if bf16 else "32-true"
    variants = {
        "Lightning": (lambda every: MixedPrecision("bf16-mixed", "cpu")) if bf16 else (lambda every: Precision()),
        "AdaptiveMP": lambda every: AdaptiveMP(precision, stats_every=every),
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        for r in range(args.rounds):
            for name in list(variants)[r % 2 :] + list(variants)[: r % 2]:
                runs[name].append(fit(variants[name], args.steps, args.every, args.backend))
    finally:
        torch._logging.set_logs()  # back to torch's defaults (a test process goes on)
    print(
        f"torch.compile(backend={args.backend!r}) Transformer, {precision}, {args.steps} steps, statistics every"
        f" {args.every} steps, {args.rounds} round(s), {args.threads} thread(s)"
    )
    for name, results in runs.items():
        last = results[-1]
        extra = ""
        if "modules" in last:
            extra = f", statistics: {last['samples']} samples, {last['modules_with_activations']}/{last['modules']}"
            extra += " modules with activation amax"
        print(f"  {name:11} compiled graphs {last['graphs']}, recompilations {last['recompiles']}{extra}")
    ratios_mean = [a["mean"] / b["mean"] for a, b in zip(runs["AdaptiveMP"], runs["Lightning"], strict=True)]
    ratios_median = [a["median"] / b["median"] for a, b in zip(runs["AdaptiveMP"], runs["Lightning"], strict=True)]
    print(
        f"  step time AdaptiveMP / Lightning: mean {statistics.median(ratios_mean):.3f}, median"
        f" {statistics.median(ratios_median):.3f} (median over rounds; budget 1.02)"
    )
    return {"runs": runs, "mean_ratio": statistics.median(ratios_mean)}


if __name__ == "__main__":
    main()

"""What the spike-aware loss scale costs: measuring the gradients inside the backward on sampled steps.

In fp16 the predictive scaler asks the statistics for the largest gradient flowing into any module output
(a tensor hook per module output on sampled steps, ``stats_every`` = 25 by default). This times one sampled
step's forward/backward plus the fold-in (``collect``) with the ``"cheap"`` hooks alone and with the
output-gradient hooks added, on the small GPT-2 / BERT / ViT of ``step_cost`` (fp32: the host cost of the
hooks is what is measured; fp16 kernels on this CPU are emulated), interleaved, median of the rounds.

    python -m benchmarks.backward_amax_cost            # 7 rounds x 20 steps
    python -m benchmarks.backward_amax_cost --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.step_cost import batches, models
from lightning_mp.diagnosis.statistics import ModuleStatistics


def sampled_step(model: torch.nn.Module, batch: dict, output_grads: bool | None) -> float:
    """Seconds for one forward/backward with the statistics hooks (None: no hooks) and their fold-in."""
    stats = ModuleStatistics("cheap")
    start = time.perf_counter()
    if output_grads is not None:
        stats.start(model, output_grads=output_grads)
    loss = model(**batch).loss
    loss.backward()
    if output_grads is not None:
        stats.collect(model, 1.0, torch.float16)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=25, help="stats_every, to amortize over")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 3
    torch.set_num_threads(1)
    results = {}
    print(
        f"one sampled step, {args.rounds} rounds x {args.steps} steps, 1 thread;"
        f" amortized over stats_every={args.every}"
    )
    for name, (make, kind) in models().items():
        torch.manual_seed(0)
        model = make()
        batch = next(iter(batches(kind, 1)))
        variants = {"no hooks": None, "cheap": False, "cheap + backward amax": True}
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for label, output_grads in variants.items():
                times[label].append(
                    statistics.median(sampled_step(model, batch, output_grads) for _ in range(args.steps))
                )
        median = {label: statistics.median(t) for label, t in times.items()}
        extra = median["cheap + backward amax"] - median["cheap"]
        results[name] = {"step_ms": median["no hooks"] * 1e3, "backward_amax_us": extra * 1e6}
        print(
            f"  {name:6} step {median['no hooks'] * 1e3:6.2f} ms"
            f" | cheap hooks +{(median['cheap'] - median['no hooks']) * 1e6:5.0f} us"
            f" | backward amax +{extra * 1e6:5.0f} us per sampled step = {extra * 1e6 / args.every:4.1f} us per step"
        )
    return results


if __name__ == "__main__":
    main()

"""What the lost-update measure costs: one sampled step's extra time (the fp32 shadow step and the snapshots
before and after ``optimizer.step()``) against a whole training step, and what that is per step at the format's
default cadence (bf16-true samples one step in 100, like bf16; fp16-true one in 25).

The model is the NLP recipe's Transformer at a width where the optimizer step is a visible part of the step
(dim 256, 4 layers: 3.2 M parameters), bf16 weights, AdamW and torchao's stochastic-rounding AdamW; timings are
medians of interleaved repeats in one process, so the ratios hold on a noisy machine.

    OMP_NUM_THREADS=1 python -m benchmarks.lost_update_cost
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_mp.recipes.nlp import TransformerClassifier
from lightning_mp.weights.lost import LostUpdates, module_names


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    net = TransformerClassifier(vocab_size=2000, num_classes=2, max_length=24, dim=args.dim, heads=4,
                                layers=args.layers).bfloat16()  # fmt: skip
    tokens, labels = torch.randint(0, 2000, (64, 24)), torch.randint(0, 2, (64,))
    names = module_names(net)
    results = {}
    for label, optimizer in (("AdamW", torch.optim.AdamW(net.parameters(), lr=1e-4)), ("stochastic", _sr(net))):
        lost = LostUpdates()

        def step(sampled: bool, optimizer=optimizer, lost=lost) -> tuple[float, float]:
            start = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(net(tokens).float(), labels).backward()
            middle = time.perf_counter()
            if sampled:
                lost.arm([optimizer], names)
            optimizer.step()
            if sampled:
                lost.collect()
            end = time.perf_counter()
            return end - start, end - middle

        for _ in range(3):
            step(False), step(True)  # warm up (torchao compiles its step)
        plain, sampled = [], []
        for _ in range(args.repeats):
            plain.append(step(False))
            sampled.append(step(True))
        whole = statistics.median(t for t, _ in plain)
        extra = statistics.median(s for _, s in sampled) - statistics.median(s for _, s in plain)
        parameters = sum(p.numel() for p in net.parameters())
        row = {"step_ms": whole * 1e3, "sampled_extra_ms": extra * 1e3, "sampled_step_ratio": (whole + extra) / whole}
        row["per_step_at_100"] = 1 + extra / whole / 100
        row["per_step_at_25"] = 1 + extra / whole / 25
        results[label] = row
        print(
            f"{label:10} {parameters / 1e6:.1f} M params: step {row['step_ms']:.1f} ms, a sampled step +"
            f"{row['sampled_extra_ms']:.1f} ms ({row['sampled_step_ratio']:.2f}x); per step at every 100th:"
            f" {row['per_step_at_100']:.4f}x, every 25th: {row['per_step_at_25']:.4f}x",
            flush=True,
        )
    return results


def _sr(net: torch.nn.Module) -> torch.optim.Optimizer:
    from lightning_mp._compat import torchao_adamw

    return torchao_adamw()(net.parameters(), lr=1e-4, bf16_stochastic_round=True)


if __name__ == "__main__":
    main()

"""What one replay of a bad step costs, relative to a training step, on the overhead benchmark's models.

A fault inside the network's own forward (a NaN multiplied into the output of a block) is injected every
``every`` steps; the replay runs on those steps only. The figure is the median time of a bad step divided by
the median time of a clean step, in the same run, with the replay on and off (off: the bad step is only
skipped). Their difference is the replay.

    python -m benchmarks.replay_cost            # CNN and Transformer (bf16, fp32 without native bf16), fp16 MLP
    python -m benchmarks.replay_cost --quick
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from benchmarks.overhead import Task, Transformer, cnn, data, mlp, timed_fit
from lightning_mp import AdaptiveMP
from lightning_mp.formats import cpu_has_native_bf16


class Poisoned(nn.Module):
    """The network, then a multiplication by ``factor`` (1, or NaN on a bad step) in its own forward."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.factor = 1.0

    def forward(self, x):
        return self.net(x) * self.factor


class PoisonedTask(Task):
    def __init__(self, net: nn.Module, every: int):
        super().__init__(Poisoned(net))
        self.every = every

    def training_step(self, batch, batch_idx):
        self.net.factor = float("nan") if self.global_step % self.every == self.every - 1 else 1.0
        return super().training_step(batch, batch_idx)


def ratios(precision: str, make_net, kind: str, steps: int, every: int, replay: bool) -> tuple[float, int]:
    """(median bad step / median clean step, events reproduced) for one run."""
    torch.manual_seed(0)
    plugin = AdaptiveMP(precision, replay=replay, attach_callbacks=False)
    module = PoisonedTask(make_net(), every)
    all_times = timed_fit(plugin, module, data(kind, steps), steps, report=False)
    bad = {e.step - 1 for e in plugin.overflow_events}
    times = all_times[every:]  # after the first bad step: warm
    clean = [t for i, t in enumerate(times, every) if i not in bad]
    faulty = [t for i, t in enumerate(times, every) if i in bad]
    return statistics.median(faulty) / statistics.median(clean), sum(bool(e.reproduced) for e in plugin.overflow_events)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    steps, every = (24, 4) if args.quick else (120, 6)
    dense = "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    cases = [
        ("cnn", dense, cnn, "cnn"),
        ("transformer", dense, Transformer, "transformer"),
        ("mlp", "16-mixed", mlp, "mlp"),
    ]
    rows = []
    print(
        f"{'model':12} {'precision':10} {'bad/clean, replay on':>21} {'replay off':>11} {'replay cost':>12} reproduced"
    )
    for name, precision, make_net, kind in cases:
        on, reproduced = ratios(precision, make_net, kind, steps, every, replay=True)
        off, _ = ratios(precision, make_net, kind, steps, every, replay=False)
        rows.append({"model": name, "precision": precision, "on": on, "off": off, "reproduced": reproduced})
        print(f"{name:12} {precision:10} {on:21.2f} {off:11.2f} {on - off:11.2f}x {reproduced:>5}/{steps // every}")
    return rows


if __name__ == "__main__":
    main()

"""Skipped steps, scale and gradient underflow of loss scalers fed the same stream of fp16 gradients.

Each step has an unscaled parameter-gradient amax ``a`` and a hidden activation-gradient amax ``r * a``
inside the backward pass; the backward overflows when ``scale * r * a`` does not fit in fp16 (it is cast
to fp16 here, as autocast would). Every scaler sees the same stream through the real
``scale / step / update`` calls, so what differs is only the update rule:

* ``GradScaler``: ``torch.amp.GradScaler`` itself;
* ``DeepSpeed-style``: DeepSpeed's DynamicLossScaler rule (hysteresis 2, refilled only at growth);
* ``dynamic+hysteresis``: ``AdaptiveLossScaler(policy="dynamic", hysteresis=2)``;
* ``predictive``: ``AdaptiveLossScaler()`` with its defaults.

Underflow is the fraction of a fixed sample of activation-gradient magnitudes (log-uniform over twelve
decades below the amax) that round to zero in fp16 at the step's scale.

    python -m benchmarks.scaler_streams            # 60,000 steps, growth_interval 2000 (about a minute)
    python -m benchmarks.scaler_streams --quick    # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_mp import AdaptiveLossScaler

INF = float("inf")
FP16_MAX = 65504.0


def fp16_stream(steps: int, seed: int = 0, drift: float = 0.0, spike_every: int = 0, ratio: float = 64.0):
    """(amax, hidden amax) per step: log-normal noise, optional exponential drift, optional 40x spikes."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(steps, generator=gen) * 0.1
    base = 1e-3 * torch.exp(noise + drift * torch.linspace(0, 1, steps))
    if spike_every:
        base[spike_every::spike_every] *= 40
    return [(a, a * ratio) for a in base.tolist()]


class DeepSpeedStyleScaler:
    """DeepSpeed's DynamicLossScaler update rule (delayed_shift=hysteresis, consecutive_hysteresis=False)."""

    def __init__(self, init_scale=2.0**16, scale_window=2000, hysteresis=2, min_scale=1.0):
        self.cur_scale, self.scale_window, self.min_scale = init_scale, scale_window, min_scale
        self.delayed_shift = self.cur_hysteresis = hysteresis
        self.cur_iter, self.last_overflow_iter = 0, -1
        self._found = False

    def get_scale(self) -> float:
        return self.cur_scale

    def scale(self, loss):
        return loss * self.cur_scale

    def step(self, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self._found = not all(torch.isfinite(g).all() for g in grads)
        if not self._found:
            optimizer.step()

    def update(self):
        if self._found:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.cur_scale = max(self.cur_scale / 2, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        elif (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
            self.cur_hysteresis = self.delayed_shift
            self.cur_scale *= 2
        self.cur_iter += 1


@dataclass
class StreamResult:
    skipped: int = 0
    scales: list[float] = field(default_factory=list)
    underflow: list[float] = field(default_factory=list)


def run_stream(scaler, stream, underflow_sample: torch.Tensor | None = None) -> StreamResult:
    """Drive any GradScaler-like object through the stream with real fp16 casts and optimizer calls."""
    param = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.0)
    result = StreamResult()
    for a, hidden in stream:
        scale = scaler.get_scale()
        overflow = not torch.isfinite(torch.tensor(scale * hidden).half())
        result.skipped += overflow
        param.grad = torch.tensor([scale * a, INF if overflow else 0.0])
        scaler.scale(torch.ones(()))  # lazily creates GradScaler's scale tensor, as a real loop would
        scaler.step(optimizer)
        scaler.update()
        result.scales.append(scale)
        if underflow_sample is not None:
            result.underflow.append(((underflow_sample * (scale * hidden)).half() == 0).float().mean().item())
    return result


def scalers(growth_interval: int):
    return {
        "GradScaler": lambda: torch.amp.GradScaler("cpu", growth_interval=growth_interval),
        "DeepSpeed-style": lambda: DeepSpeedStyleScaler(scale_window=growth_interval),
        "dynamic+hysteresis": lambda: AdaptiveLossScaler("cpu", growth_interval=growth_interval, policy="dynamic"),
        "predictive": lambda: AdaptiveLossScaler("cpu", growth_interval=growth_interval),
    }


STREAMS = {
    "stationary": {},
    "drifting down 20x": {"drift": -3.0},
    "drifting up 2.7x": {"drift": 1.0},
    "spiky (40x every 997)": {"spike_every": 997},
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60_000)
    parser.add_argument("--growth-interval", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="6,000 steps with growth_interval 200")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.growth_interval = 6_000, 200
    sample = torch.logspace(-12, 0, 2048)  # magnitudes relative to the activation-gradient amax
    warmup = args.steps // 10
    rows = []
    print(f"{args.steps} steps, growth_interval={args.growth_interval}; ratios against GradScaler in the same run")
    print(f"{'stream':24} {'scaler':20} {'skipped':>8} {'vs GS':>7} {'median scale/GS':>16} {'underflow':>10}")
    for stream_name, kwargs in STREAMS.items():
        stream = fp16_stream(args.steps, **kwargs)
        results = {name: run_stream(make(), stream, sample) for name, make in scalers(args.growth_interval).items()}
        ref = results["GradScaler"]
        for name, res in results.items():
            ratio = statistics.median(o / r for o, r in zip(res.scales[warmup:], ref.scales[warmup:]))
            row = {
                "stream": stream_name,
                "scaler": name,
                "skipped": res.skipped,
                "skipped_vs_gradscaler": res.skipped / max(ref.skipped, 1),
                "median_scale_vs_gradscaler": ratio,
                "underflow": statistics.fmean(res.underflow[warmup:]),
            }
            rows.append(row)
            print(
                f"{stream_name:24} {name:20} {res.skipped:8d} {row['skipped_vs_gradscaler']:7.3f}"
                f" {ratio:16.3f} {row['underflow']:10.4f}"
            )
    return rows


if __name__ == "__main__":
    main()

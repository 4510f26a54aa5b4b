"""fp8 and int8 step time against bf16, compiled, with AdaptiveMP and with torchao alone; and what watching costs.

    python -m benchmarks.lowbit_speed                 # an NVIDIA GPU (H100 or newer for fp8): GPT-2-medium sized
    python -m benchmarks.lowbit_speed --smoke         # any machine: a tiny model, a few steps (CI runs it)
    python -m benchmarks.lowbit_speed --smoke --rounds 5 --steps 30   # CPU: what watching every step costs

The model is a GPT-2-medium-sized Transformer encoder (d=1024, 24 layers, 16 heads, 4096-wide MLP; 256 tokens,
batch 16), ``torch.compile``d as torchao recommends. Variants, each timed on the same data, interleaved over
rounds, medians of the step times after a warm-up:

- ``bf16``: Lightning's ``MixedPrecision("bf16-mixed")``, the reference, and again (how far two identical runs
  differ: the noise floor);
- ``torchao fp8`` / ``torchao int8``: torchao's own conversion of the same layers, under the same plugin;
- ``AdaptiveMP fp8`` / ``AdaptiveMP int8``: the plugin, default watching (every 50th step);
- ``AdaptiveMP fp8, watched every step``: the cost of the watch itself (a sampled step costs this much more).

The torchao authors report 1.25-1.5x over bf16 at large scale and a slowdown on small shapes, so the GEMM
shapes of the converted layers are printed with the ratios. On a CPU the figures are not speed (fp8 is
emulated there, see ``lightning_mp.lowbit.convert``): ``--smoke`` only checks that every variant runs.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from benchmarks.overhead import Task, Transformer, data, timed_fit
from lightning_mp import AdaptiveMP
from lightning_mp.lowbit import default_selection
from lightning_mp.lowbit.convert import convert


def model(smoke: bool) -> nn.Module:
    return Transformer(vocab=1000, dim=64, layers=2) if smoke else Transformer(vocab=1000, dim=1024, layers=24)


def variants(device: str) -> dict:
    def torchao_alone(kind: str):
        def make(net: nn.Module):
            convert(net, kind, "tensorwise", default_selection(net), device)  # torchao's conversion, as the plugin
            return MixedPrecision("bf16-mixed", device)

        return make

    return {
        "bf16": lambda net: MixedPrecision("bf16-mixed", device),
        "bf16 (again: the noise floor)": lambda net: MixedPrecision("bf16-mixed", device),
        "torchao fp8": torchao_alone("fp8"),
        "AdaptiveMP fp8": lambda net: AdaptiveMP("fp8-mixed", stats="off", attach_callbacks=False),
        "AdaptiveMP fp8, watched every step": lambda net: AdaptiveMP(
            "fp8-mixed", stats="off", stats_every=1, attach_callbacks=False
        ),
        "torchao int8": torchao_alone("int8"),
        "AdaptiveMP int8": lambda net: AdaptiveMP("int8-mixed", stats="off", attach_callbacks=False),
    }


def step_time(make_plugin, smoke: bool, device: str, steps: int, warmup: int, batch: int, seq: int) -> float:
    torch.manual_seed(0)
    net = model(smoke)
    plugin = make_plugin(net)
    module = Task(net)
    module.net = torch.compile(module.net, backend="aot_eager" if smoke else "inductor")  # smoke: no compiler needed
    loader = data("transformer", steps + warmup, batch, seq)
    times = timed_fit(plugin, module, loader, steps + warmup, device, report=False)
    return statistics.median(times[warmup:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model on any device: checks, not speed")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (smoke: 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run, default 20 (smoke: 2)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("benchmarks.lowbit_speed measures speed on an NVIDIA GPU; on a CPU pass --smoke.")
    rounds, steps, warmup = (
        (args.rounds or 1, args.steps or 2, 1) if args.smoke else (args.rounds or 3, args.steps or 20, 5)
    )
    batch, seq = (4, 16) if args.smoke else (16, 256)
    net = model(args.smoke)
    shapes = sorted({tuple(net.get_submodule(fqn).weight.shape) for fqn in default_selection(net)})
    print(f"converted GEMMs (out x in) {shapes}, {batch * seq} tokens per step, compiled, on {device}", flush=True)
    names = list(variants(device))
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        times = {n: step_time(variants(device)[n], args.smoke, device, steps, warmup, batch, seq) for n in order}
        for n in names:
            per_round[n].append(times[n] / times["bf16"])
    result = {"device": device, "shapes": shapes, "tokens": batch * seq, "ratio_to_bf16": {}}
    print("\n| variant | step time / bf16 (median over rounds) |\n|---|---|")
    for n in names:
        result["ratio_to_bf16"][n] = statistics.median(per_round[n])
        print(f"| {n} | {result['ratio_to_bf16'][n]:.3f} |")
    return result


if __name__ == "__main__":
    main()

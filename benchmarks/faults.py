"""Fault-injection harness: inf/NaN injected into inputs, chosen modules' forward outputs, the arithmetic of a
module's own ``forward`` (where no hook can see), the loss and chosen modules' gradients at random steps of a
run, and what AdaptiveMP made of each.

    python -m benchmarks.faults              # campaign under fp16, bf16, fp32 (600 steps each) + 20k-step memory run
    python -m benchmarks.faults --quick      # CI-sized

The campaign reports, per precision: faults injected, reported with the right phase (every one, the first
included: the replay names it), forward/backward faults attributed to the right module, and steps after which
a parameter, BatchNorm's running statistics or an optimizer state was non-finite (must be 0). The long runs
(fp16 and bf16) inject a fault in 30% of their steps, with statistics and the monitor callbacks on, and sample
resident memory, live tensors and the event buffer's length as they go: all three must stay flat once the run
is warm.
"""

from __future__ import annotations

import argparse
import gc
import random
import resource
import time
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_mp import AdaptiveMP, LossScaleMonitor, OverflowDiagnostics

MODULES = ["net.0", "net.3", "net.5"]  # the three Linear layers
OWN = "net.4"  # the Gate: a fault inside its own forward arithmetic is a forward fault of net.4
PHASES = ["input", "forward", "loss", "backward", "own"]
Plan = dict[int, tuple[str, "str | None", str]]


def schedule(steps: int, rate: float, seed: int = 0) -> Plan:
    """step (1-based optimizer step) -> (phase, module or None, kind); step 1 is always clean."""
    rng = random.Random(seed)
    plan = {}
    for step in range(2, steps + 1):
        if rng.random() < rate:
            phase = rng.choice(PHASES)
            module = rng.choice(MODULES) if phase in ("forward", "backward") else OWN if phase == "own" else None
            plan[step] = (phase, module, rng.choice(["inf", "nan"]))
    return plan


class Batches(IterableDataset):
    """One batch per optimizer step; the input fault is in the data itself, before the model sees it."""

    def __init__(self, plan: Plan, steps: int):
        self.plan, self.steps = plan, steps

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for step in range(1, self.steps + 1):
            x = torch.randn(16, 8, generator=gen)
            y = x[:, :2].sum(dim=1, keepdim=True)
            phase, _, kind = self.plan.get(step, (None, None, None))
            if phase == "input":
                x[3, 1] = float(kind)
            yield x, y


class Gate(nn.Module):
    """A ReLU with arithmetic of its own: ``scale`` multiplies its output (1.0, or inf/NaN on a planned step)."""

    def __init__(self):
        super().__init__()
        self.scale = 1.0

    def forward(self, x):
        return torch.relu(x) * self.scale


class FaultyNet(L.LightningModule):
    """A three-layer MLP with a BatchNorm after the first layer, whose forward outputs, weight gradients and loss
    are poisoned on planned steps. Input faults and net.0's forward faults reach BatchNorm's running statistics,
    which a skipped step must leave as they were."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), Gate(), nn.Linear(16, 1)
        )  # fmt: skip
        for fqn in MODULES:
            module = self.net[int(fqn.split(".")[1])]
            module.register_forward_hook(self._forward_fault(fqn))
            module.weight.register_hook(self._gradient_fault(fqn))

    def _fault(self):
        return self.plan.get(self.global_step + 1, (None, None, None))

    def _forward_fault(self, fqn):
        def hook(module, args, output):
            phase, target, kind = self._fault()
            if phase == "forward" and target == fqn and self.training:
                # Added, not assigned: the fault stays on the autograd path, as a real overflow would.
                fault = torch.zeros_like(output)
                fault[0, 0] = float(kind)
                return output + fault
            return None

        return hook

    def _gradient_fault(self, fqn):
        def hook(grad):
            phase, target, kind = self._fault()
            if phase == "backward" and target == fqn:
                grad = grad.clone()
                grad[0, 0] = float(kind)
                return grad
            return None

        return hook

    def training_step(self, batch, batch_idx):
        x, y = batch
        phase, _, kind = self._fault()
        self.net[4].scale = float(kind) if phase == "own" else 1.0
        loss = F.mse_loss(self.net(x).float(), y)
        if phase == "loss":
            loss = loss * float(kind)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class FiniteWatch(L.Callback):
    """Records every optimizer step after which a parameter, a buffer (BatchNorm's running statistics) or an
    optimizer state was not finite."""

    def __init__(self):
        self.bad_steps: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
        for state in trainer.optimizers[0].state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
        if not all(torch.isfinite(t).all() for t in tensors):
            self.bad_steps.append(trainer.global_step)


class MemoryWatch(L.Callback):
    """Every ``every`` steps: resident memory (MB, from /proc), live tensors and the plugin's event buffer."""

    def __init__(self, every: int):
        self.every = every
        self.samples: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step % self.every:
            return
        gc.collect()
        plugin = trainer.precision_plugin
        with warnings.catch_warnings():  # isinstance() on some lazily imported modules warns; not ours
            warnings.simplefilter("ignore")
            tensors = sum(1 for o in gc.get_objects() if torch.is_tensor(o))
        self.samples.append(
            {
                "step": trainer.global_step,
                "rss_mb": _rss_mb(),
                "tensors": tensors,
                "events_kept": len(plugin.overflow_events),
                "events_seen": sum(plugin.overflow_counts.values()),
            }
        )


def _rss_mb() -> float:
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * resource.getpagesize() / 2**20


def make_plugin(precision: str, **overrides) -> AdaptiveMP:
    """The campaign's plugin: promotion off (the model under test stays the same), the probe armed for the
    whole run once a forward fault was seen, fp16 starting at a scale these gradients never overflow (so
    every event is an injected one)."""
    scaler = {"init_scale": 2.0**8, "growth_interval": 50} if precision == "16-mixed" else None
    kwargs = dict(scaler=scaler, auto_fallback=False, watch_steps=10**6, attach_callbacks=False, stats="off")
    return AdaptiveMP(precision, **{**kwargs, **overrides})


def fit(plugin: AdaptiveMP, plan: Plan, steps: int, callbacks=(), model: FaultyNet | None = None) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        plugins=[plugin],
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model or FaultyNet(plan), DataLoader(Batches(plan, steps), batch_size=None))


def score(plan: Plan, events: dict) -> tuple[int, int, int]:
    """(faults reported with the right phase, forward/backward faults, of those the right module).

    A fault in a module's own arithmetic ("own") is a forward fault of that module."""
    right_phase = right_module = located = 0
    for step, (phase, module, _) in plan.items():
        event = events.get(step)
        expected = "forward" if phase == "own" else phase
        right_phase += event is not None and event.phase == expected
        if phase in ("forward", "backward", "own"):
            located += 1
            right_module += event is not None and event.module == module
    return right_phase, located, right_module


def campaign(precision: str, steps: int, rate: float = 0.35, seed: int = 0) -> dict:
    """Inject faults over ``steps`` steps; return the figures and the events by step."""
    plan = schedule(steps, rate, seed)
    watch, plugin = FiniteWatch(), make_plugin(precision)
    fit(plugin, plan, steps, [watch])
    events = {e.step: e for e in plugin.overflow_events}
    right_phase, located, right_module = score(plan, events)
    return {
        "precision": precision,
        "steps": steps,
        "faults": len(plan),
        "by_phase": dict(Counter(p for p, _, _ in plan.values())),
        "right_phase": right_phase,
        "located": located,
        "right_module": right_module,
        "nonfinite_steps": len(watch.bad_steps),
        "skipped": plugin.skipped_steps,
        "plan": plan,
        "events": events,
        "plugin": plugin,
    }


def long_run(precision: str, steps: int, rate: float = 0.3, max_events: int = 100, every: int = 1000) -> dict:
    """A long run with frequent faults and everything a user would have on (statistics, the monitor and
    diagnostics callbacks); memory, live tensors and kept events sampled every ``every`` steps."""
    plan = schedule(steps, rate, seed=1)
    memory, watch, monitor = MemoryWatch(every), FiniteWatch(), LossScaleMonitor()
    plugin = make_plugin(precision, max_events=max_events, stats="cheap")
    start = time.perf_counter()
    fit(plugin, plan, steps, [monitor, OverflowDiagnostics(), memory, watch])
    return {
        "precision": precision,
        "steps": steps,
        "faults": len(plan),
        "seconds": time.perf_counter() - start,
        "samples": memory.samples,
        "nonfinite_steps": len(watch.bad_steps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "scale_points": len(monitor.scale_history),
        "plugin": plugin,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--long-steps", type=int, default=20_000)
    args = parser.parse_args(argv)
    steps = 120 if args.quick else 600
    results = {"campaign": [], "long_run": None}
    print("precision   steps  faults  phase right  module right  non-finite weights  skipped  faults by phase")
    for precision in ("16-mixed", "bf16-mixed", "32-true"):
        r = campaign(precision, steps)
        results["campaign"].append(r)
        print(
            f"{precision:10} {r['steps']:6} {r['faults']:7} {r['right_phase']:12} "
            f"{r['right_module']:6}/{r['located']:<6} {r['nonfinite_steps']:18} {r['skipped']:8}  "
            + "/".join(f"{p} {r['by_phase'].get(p, 0)}" for p in PHASES),
            flush=True,
        )
    long_steps = 1000 if args.quick else args.long_steps
    results["long_run"] = []
    for precision in ("16-mixed", "bf16-mixed"):
        r = long_run(precision, long_steps, every=max(long_steps // 10, 1))
        results["long_run"].append(r)
        print(
            f"\nlong run, {precision}, {r['steps']} steps, {r['faults']} faults, {r['seconds']:.0f} s, max_events=100:"
        )
        print("   step   RSS MB  live tensors  events kept  events seen")
        for s in r["samples"]:
            print(f"{s['step']:7} {s['rss_mb']:8.1f} {s['tensors']:13} {s['events_kept']:12} {s['events_seen']:12}")
        print(
            f"peak RSS {r['peak_rss_mb']:.0f} MB (this process so far); scale history points kept "
            f"{r['scale_points']}; steps ending with non-finite weights {r['nonfinite_steps']}"
        )
    return results


if __name__ == "__main__":
    main()

"""Step time of AdaptiveMP against Lightning's MixedPrecision on the same model, interleaved in one process.

Each round fits every variant for the same number of steps, in an order that rotates from round to
round, and takes the median step time (steps after a warm-up, timed from on_train_batch_start to
on_train_batch_end). The figure reported is the median over rounds of (variant / reference) measured in
the same round; ``noise`` is the reference measured against a second copy of itself the same way, so a
ratio inside 1 +- noise is not distinguishable from 1 on this machine.

    python -m benchmarks.overhead            # CNN and Transformer in bf16 (fp32 without native bf16), fp16 MLPs
    python -m benchmarks.overhead --quick    # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision, Precision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import AdaptiveLossScaler, AdaptiveMP, PrecisionReport
from lightning_mp.formats import cpu_has_native_bf16


class Timer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def _sync(self, module) -> None:
        if module.device.type == "cuda":  # GPU work is asynchronous: time it to completion
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._sync(module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._sync(module)
        self.times.append(time.perf_counter() - self._start)


class Task(L.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def cnn(width: int = 32) -> nn.Module:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        block(3, width),
        block(width, width),
        nn.MaxPool2d(2),
        block(width, 2 * width),
        block(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    )


class Transformer(nn.Module):
    def __init__(self, vocab=1000, dim=128, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def mlp(width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def wide_mlp() -> nn.Module:
    return mlp(512)


def data(kind: str, batches: int, batch_size: int = 32, seq: int = 64) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    n = batch_size * batches
    if kind == "cnn":
        x = torch.randn(n, 3, 32, 32, generator=gen)
    elif kind == "transformer":
        x = torch.randint(0, 1000, (n, seq), generator=gen)
    else:
        x = torch.randn(n, 64, generator=gen)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=gen)), batch_size=batch_size)


def timed_fit(
    plugin, module: L.LightningModule, loader, max_steps: int, accelerator="cpu", report=True, callbacks=()
) -> list[float]:
    """Fit ``module`` under ``plugin`` with nothing but a step timer (and, with ``report``, a quiet
    ``PrecisionReport``, written at the end of fit, outside the timed steps; ``callbacks`` are added as given);
    returns every step's time."""
    timer = Timer()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        plugins=[plugin],
        default_root_dir=tempfile.mkdtemp(prefix="lmp-bench-"),  # the report goes here, not into the repo
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, *([PrecisionReport(console=False)] if report else []), *callbacks],
    )
    trainer.fit(module, loader)
    return timer.times


def step_time(make_plugin, make_net, kind: str, steps: int, warmup: int, accelerator="cpu", batch_size=32) -> float:
    torch.manual_seed(0)
    module = Task(make_net())
    times = timed_fit(make_plugin(), module, data(kind, steps + warmup, batch_size), steps + warmup, accelerator)
    return statistics.median(times[warmup:])


def compare(name, kind, make_net, variants, rounds, steps, warmup, **run) -> list[dict]:
    names = list(variants)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who runs first
        times = {n: step_time(variants[n], make_net, kind, steps, warmup, **run) for n in order}
        for n in names:
            per_round[n].append(times[n] / times[names[0]])
    noise = max(abs(statistics.median(per_round[names[1]]) - 1), 1e-4)
    rows = []
    for n in names[1:]:
        ratio = statistics.median(per_round[n])
        rows.append({"model": name, "variant": n, "ratio": ratio, "noise": noise})
        print(f"{name:18} {n:55} {ratio:7.3f}   (noise floor +-{noise:.3f})", flush=True)
    return rows


def armed_probe(precision, **kwargs):
    """AdaptiveMP with its forward probe armed on every step: the cost attribution pays after a bad step."""

    class Armed(AdaptiveMP):
        def train_step_context(self):
            core = self.core
            if core.model is not None and not core.tracker.probe.armed:
                core.tracker.probe.arm(core.model, steps=10**9)
            return super().train_step_context()

    return Armed(precision, **kwargs)


def dense_variants(dense: str) -> dict:
    """The CNN and Transformer rows: Lightning's own plugin for that precision against AdaptiveMP's settings."""
    precision = {"bf16": "bf16-mixed", "fp32": "32-true"}[dense]
    lightning = (lambda: MixedPrecision("bf16-mixed", "cpu")) if dense == "bf16" else Precision
    name = "MixedPrecision" if dense == "bf16" else "Precision"
    return {
        f"Lightning {name} {dense} (reference)": lightning,
        f"Lightning {name} {dense} (again)": lightning,
        f"AdaptiveMP {dense}, default (stats cheap/25)": lambda: AdaptiveMP(precision),
        f"AdaptiveMP {dense}, stats off": lambda: AdaptiveMP(precision, stats="off"),
        f"AdaptiveMP {dense}, stats full/25": lambda: AdaptiveMP(precision, stats="full"),
        f"AdaptiveMP {dense}, stats full every step": lambda: AdaptiveMP(precision, stats="full", stats_every=1),
        f"AdaptiveMP {dense}, probe armed (after a bad step)": lambda: armed_probe(precision, stats="off"),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = least noise)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--dense",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="precision of the CNN and Transformer rows; auto = bf16 where the CPU runs it natively, else fp32"
        " (emulated bf16 kernels are 10x slower and would hide any plugin cost)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="model rows to run, e.g. --only 'MLP-512 fp16'")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 5
    torch.set_num_threads(args.threads)
    warmup = 3
    dense = args.dense if args.dense != "auto" else ("bf16" if cpu_has_native_bf16() else "fp32")
    variants = dense_variants(dense)
    fp16 = {
        "Lightning MixedPrecision fp16 (reference)": lambda: MixedPrecision(
            "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")
        ),
        "Lightning MixedPrecision fp16 (again)": lambda: MixedPrecision(
            "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")
        ),
        "AdaptiveMP fp16, default (predictive, stats cheap/25)": lambda: AdaptiveMP("16-mixed"),
        "AdaptiveMP fp16, stats off": lambda: AdaptiveMP("16-mixed", stats="off"),
        "AdaptiveMP fp16, stats full/25": lambda: AdaptiveMP("16-mixed", stats="full"),
        "AdaptiveMP fp16, classic scaler, stats off": lambda: AdaptiveMP(
            "16-mixed",
            scaler=AdaptiveLossScaler("cpu", policy="dynamic", hysteresis=1, min_scale=None, max_scale=None),
            stats="off",
        ),
    }
    print(
        f"median step-time ratio vs Lightning, {args.rounds} interleaved rounds x {args.steps} steps, "
        f"{args.threads} thread(s)"
    )
    suites = [
        (f"CNN {dense}", "cnn", cnn, variants),
        (f"Transformer {dense}", "transformer", Transformer, variants),
        ("MLP-64 fp16", "mlp", mlp, fp16),
        ("MLP-512 fp16", "mlp", wide_mlp, fp16),
    ]
    rows = []
    for name, kind, make_net, variants in suites:
        if args.only is None or name in args.only:
            rows += compare(name, kind, make_net, variants, args.rounds, args.steps, warmup)
    return rows


if __name__ == "__main__":
    main()

"""The fixed host cost AdaptiveMP adds to a small, fast training step, in microseconds, on Hugging Face models.

A fast step shows what a slow one hides: per-step Python and kernel-launch work that does not shrink with the
model. Small GPT-2, BERT and ViT models (built from configs, nothing downloaded) train under Lightning's plugin
and under AdaptiveMP variants, interleaved round by round with the order rotating; the figure per variant is
the median over rounds of (its median step time - the reference's) and of their ratio. "again" is the
reference against itself: the noise floor.

    python -m benchmarks.step_cost            # 7 rounds x 60 steps, 1 thread
    python -m benchmarks.step_cost --quick    # smoke run

On a CPU without native bf16 (AVX512-BF16/AMX) the rows run in fp32 ("32-true" against Lightning's
``Precision``): the plugin's per-step work (guard, input check, bookkeeping) is the same, and emulated bf16
kernels would bury it.
"""

from __future__ import annotations

import argparse
import statistics

import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision, Precision
from torch.utils.data import DataLoader

from benchmarks.overhead import timed_fit
from lightning_mp import AdaptiveMP
from lightning_mp.precision import cpu_has_native_bf16


def models() -> dict:
    import transformers

    return {
        "GPT-2": (
            lambda: transformers.GPT2LMHeadModel(
                transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=2)
            ),
            "tokens",
        ),
        "BERT": (
            lambda: transformers.BertForSequenceClassification(
                transformers.BertConfig(
                    vocab_size=512,
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    intermediate_size=128,
                    max_position_embeddings=64,
                    num_labels=4,
                )  # fmt: skip
            ),
            "labels",
        ),
        "ViT": (
            lambda: transformers.ViTForImageClassification(
                transformers.ViTConfig(
                    image_size=32,
                    patch_size=8,
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    intermediate_size=128,
                    num_labels=4,
                )  # fmt: skip
            ),
            "pixels",
        ),
    }


def batches(kind: str, n: int, batch_size: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        if kind == "pixels":
            out.append({"pixel_values": torch.randn(batch_size, 3, 32, 32, generator=gen),
                        "labels": torch.randint(0, 4, (batch_size,), generator=gen)})  # fmt: skip
        else:
            ids = torch.randint(0, 512, (batch_size, 32), generator=gen)
            labels = ids if kind == "tokens" else torch.randint(0, 4, (batch_size,), generator=gen)
            out.append({"input_ids": ids, "labels": labels})
    return DataLoader(out, batch_size=None)


class HFTask(L.LightningModule):
    def __init__(self, make_model) -> None:
        super().__init__()
        self.model = make_model()

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def step_time(make_plugin, make_model, kind: str, steps: int, warmup: int = 5) -> float:
    torch.manual_seed(0)
    module = HFTask(make_model)
    return statistics.median(timed_fit(make_plugin(), module, batches(kind, steps + warmup), steps + warmup)[warmup:])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="*", default=None, help="rows to run, e.g. --models GPT-2")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, 10
    torch.set_num_threads(args.threads)
    bf16 = cpu_has_native_bf16()
    precision = "bf16-mixed" if bf16 else "32-true"
    reference = (lambda: MixedPrecision("bf16-mixed", "cpu")) if bf16 else Precision
    variants = {
        "reference": reference,
        "again": reference,
        "AdaptiveMP default": lambda: AdaptiveMP(precision),
        "AdaptiveMP guard off": lambda: AdaptiveMP(precision, guard_nonfinite=False),
        "AdaptiveMP stats off": lambda: AdaptiveMP(precision, stats="off"),
    }
    names = list(variants)
    ref_name = "Lightning MixedPrecision bf16" if bf16 else "Lightning Precision fp32"
    print(f"{precision} against {ref_name}, {args.rounds} rounds x {args.steps} steps, {args.threads} thread(s)")
    rows = []
    for model_name, (make_model, kind) in models().items():
        if args.models is not None and model_name not in args.models:
            continue
        diffs: dict[str, list[float]] = {n: [] for n in names[1:]}
        ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
        base = []
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            times = {n: step_time(variants[n], make_model, kind, args.steps) for n in order}
            base.append(times["reference"])
            for n in names[1:]:
                diffs[n].append(times[n] - times["reference"])
                ratios[n].append(times[n] / times["reference"])
        step_ms = statistics.median(base) * 1e3
        for n in names[1:]:
            diff_us = statistics.median(diffs[n]) * 1e6
            ratio = statistics.median(ratios[n])
            rows.append({"model": model_name, "variant": n, "step_ms": step_ms, "us": diff_us, "ratio": ratio})
            print(f"  {model_name:6} ({step_ms:5.2f} ms/step) {n:22} {diff_us:+7.0f} us ratio {ratio:.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()

"""Step time of this checkout's AdaptiveMP against an earlier commit's, side by side in one process.

A refactor must not slow the step. Timing the two versions in two runs compares two machine states (this
machine's absolute times drift by several percent between runs); here the earlier commit's package is
extracted with ``git archive``, imported under another name, and timed in the same interleaved rounds as the
current one and Lightning's own plugin (``benchmarks.overhead.compare``).

    python -m benchmarks.versions --ref b9f25f0                    # fp16 MLPs and the fp32 Transformer
    python -m benchmarks.versions --ref b9f25f0 --only "MLP-512 fp16" --rounds 15 --steps 100
    python -m benchmarks.versions --ref HEAD                       # the A/A control: same code, two copies

The printed noise floor is Lightning against itself. Two copies of the same package differ by more (their
position in a round, where each is imported from): ``--ref HEAD`` measured up to 0.015 of Lightning's step
apart on the MLPs and 0.010 on the Transformer here (2026-12-05, 11 rounds x 40 steps). Read a difference
between versions against that spread.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import torch
from lightning.pytorch.plugins import MixedPrecision, Precision

from benchmarks import overhead
from lightning_mp import AdaptiveMP

ROOT = Path(__file__).resolve().parents[1]


def import_ref(ref: str) -> object:
    """The ``lightning_mp`` package of commit ``ref``, importable as ``lightning_mp_<ref>``."""
    name = f"lightning_mp_{re.sub(r'[^0-9A-Za-z]', '_', ref)}"
    archive = subprocess.run(["git", "archive", ref, "lightning_mp"], cwd=ROOT, capture_output=True, check=True)
    target = Path(tempfile.mkdtemp(prefix="lmp-versions-"))
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    package = target / "lightning_mp"
    for path in package.rglob("*.py"):
        text = re.sub(r"\blightning_mp\b", name, path.read_text())
        # Versions before 2026-12 reached into the repository from __init__; nothing timed here needs that.
        path.write_text(re.sub(r"\n_root = .*", "\n", text, flags=re.DOTALL) if path.name == "__init__.py" else text)
    package.rename(target / name)
    sys.path.insert(0, str(target))
    return importlib.import_module(name)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--only", nargs="*", default=None, help="rows: 'MLP-64 fp16', 'MLP-512 fp16', 'Transformer fp32'"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    old = import_ref(args.ref)

    def variants(precision: str, lightning) -> dict:
        short = {"16-mixed": "fp16", "32-true": "fp32"}[precision]
        return {
            f"Lightning {short} (reference)": lightning,
            f"Lightning {short} (again)": lightning,
            f"{args.ref}: AdaptiveMP {short} default": lambda: old.AdaptiveMP(precision),
            f"this checkout: AdaptiveMP {short} default": lambda: AdaptiveMP(precision),
            f"{args.ref}: AdaptiveMP {short} stats off": lambda: old.AdaptiveMP(precision, stats="off"),
            f"this checkout: AdaptiveMP {short} stats off": lambda: AdaptiveMP(precision, stats="off"),
        }

    fp16 = variants("16-mixed", lambda: MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu")))
    fp32 = variants("32-true", Precision)
    suites = [
        ("MLP-64 fp16", "mlp", overhead.mlp, fp16),
        ("MLP-512 fp16", "mlp", overhead.wide_mlp, fp16),
        ("Transformer fp32", "transformer", overhead.Transformer, fp32),
    ]
    print(f"median step-time ratio vs Lightning, {args.rounds} interleaved rounds x {args.steps} steps, 1 thread")
    rows = []
    for name, kind, make_net, suite in suites:
        if args.only is None or name in args.only:
            rows += overhead.compare(name, kind, make_net, suite, args.rounds, args.steps, warmup=3)
    return rows


if __name__ == "__main__":
    main()

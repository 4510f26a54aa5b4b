"""The overhead and speedup figures on an NVIDIA GPU, in one short run that writes them to a JSON file.

    python -m benchmarks.gpu --out gpu_results.json      # a few minutes on one GPU, no downloads

Measures, at GPU-sized batches and models (CNN width 128 on 32x32, batch 256; Transformer d=512, 4 layers,
128 tokens, batch 64), interleaved as in benchmarks/overhead.py:
* AdaptiveMP / Lightning MixedPrecision step time for bf16 and fp16 (default diagnostics, statistics off),
  with the noise floor;
* bf16 and fp16 speed over fp32 with AdaptiveMP;
* with torchao installed, fp8 and int8 step time against bf16 on a GPT-2-medium-sized model, compiled, with the
  plugin and with torchao alone (``benchmarks.lowbit_speed``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from benchmarks.overhead import Transformer, cnn, compare, step_time
from lightning_mp import AdaptiveMP


def wide_cnn() -> nn.Module:
    return cnn(width=128)


def big_transformer() -> nn.Module:
    return Transformer(vocab=1000, dim=512, layers=4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_out = Path(os.environ.get("OUT", "benchmarks/results")) / "gpu_results.json"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs an NVIDIA GPU (torch.cuda.is_available() is False).")
    torch.backends.cudnn.benchmark = True
    warmup = 5
    models = {"CNN": ("cnn", wide_cnn, 256), "Transformer": ("transformer", big_transformer, 64)}
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "overhead": [],
        "speedup": {},
    }
    for name, (kind, make_net, batch) in models.items():
        run = {"accelerator": "cuda", "batch_size": batch}
        for precision, ref in (
            ("bf16-mixed", lambda: MixedPrecision("bf16-mixed", "cuda")),
            ("16-mixed", lambda: MixedPrecision("16-mixed", "cuda")),
        ):
            variants = {
                "Lightning (reference)": ref,
                "Lightning (again)": ref,
                "AdaptiveMP default": lambda p=precision: AdaptiveMP(p),
                "AdaptiveMP stats off": lambda p=precision: AdaptiveMP(p, stats="off"),
                "AdaptiveMP stats full/25": lambda p=precision: AdaptiveMP(p, stats="full"),
            }
            results["overhead"] += compare(
                f"{name} {precision}", kind, make_net, variants, args.rounds, args.steps, warmup, **run
            )
        times = {
            p: step_time(lambda p=p: AdaptiveMP(p, stats="off"), make_net, kind, args.steps, warmup, **run)
            for p in ("32-true", "bf16-mixed", "16-mixed")
        }
        results["speedup"][name] = {p: times["32-true"] / t for p, t in times.items()}
        print(f"{name}: speed over fp32 {results['speedup'][name]}", flush=True)
    try:
        import torchao  # noqa: F401
    except ImportError:
        print("torchao is not installed: no fp8/int8 figures (pip install 'lightning-mp[fp8]')")
    else:
        from benchmarks import lowbit_speed

        results["low_bit"] = lowbit_speed.main(["--rounds", str(min(args.rounds, 3))])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

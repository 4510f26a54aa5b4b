"""A comparison's verdicts against another reference than fp32, from its ``compare.json`` (no training).

``lightning-mp compare`` judges every precision against fp32. Whether fp8 and int8 cost anything against the
bf16 they replace is the same rule with bf16 as the reference (paired seeds, per metric):

    python -m benchmarks.against benchmarks/results/compare_nlp.json --reference bf16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_mp.cli.verdict import judge, summary


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("compare_json", type=Path)
    parser.add_argument("--reference", default="bf16")
    args = parser.parse_args(argv)
    groups: dict[str, list[dict]] = {}
    for row in json.loads(args.compare_json.read_text()):
        groups.setdefault(row["precision"], []).append(row)
    if args.reference not in groups:
        raise SystemExit(f"--reference {args.reference!r} is not in {args.compare_json}: choose from {sorted(groups)}")
    reference = groups[args.reference]
    print(f"| precision | vs {args.reference}: final val acc (detectable) | final val loss (detectable) | verdict |")
    print("|---|---|---|---|")
    verdicts = {}
    for name, runs in groups.items():
        if name == args.reference:
            continue
        judgements = {j.metric.key: j for j in judge(runs, reference)}
        verdicts[name], _ = summary(list(judgements.values()), against=args.reference)
        cells = [f"{j.difference:+.3f} ({j.detectable:.3f})" for j in (judgements["val_acc"], judgements["val_loss"])]
        print(f"| {name} | {cells[0]} | {cells[1]} | {verdicts[name]} |")
    return verdicts


if __name__ == "__main__":
    main()

"""What the command says about itself: the usage line, ``train --help`` / ``compare --help``, and ``ls`` (every
shipped config with the first sentences of its header). Read from the files and the code, never kept by hand."""

from __future__ import annotations

from importlib import resources

__all__ = ["CONFIG_MODULE", "USAGE", "command_help", "list_configs", "print_configs"]

CONFIG_MODULE = "lightning_mp.conf"  # conf/, shipped inside the package
USAGE = """usage: lightning-mp train [key=value ...]
       lightning-mp train --multirun [hydra/launcher=slurm] [key=a,b ...]
       lightning-mp compare [precisions=fp32,bf16,fp16] [key=value ...]
       lightning-mp ls

Keys are Hydra overrides of conf/train.yaml, e.g. recipe=nlp precision=fp16 trainer.max_epochs=3
precision.scaler.growth_interval=500 logger=csv callbacks.early_stopping=null experiment=quick.
--multirun hands the command line to Hydra: sweeps (precision=fp32,bf16) and launcher plugins
(hydra/launcher=slurm submits through submitit; pip install "lightning-mp[slurm]")."""


def list_configs() -> dict[str, list[tuple[str, str]]]:
    """Recipes, precisions and experiments found in the shipped conf/, each with its one-line header."""
    found = {}
    root = resources.files(CONFIG_MODULE)
    for group in ("recipe", "precision", "experiment", "trainer", "logger", "callbacks", "hydra/launcher"):
        entries = []
        for item in sorted(root.joinpath(group).iterdir(), key=lambda p: p.name):
            if item.name.endswith(".yaml"):
                entries.append((item.name.removesuffix(".yaml"), _description(item.read_text())))
        found[group] = entries
    return found


def command_help(command: str) -> str:
    """``lightning-mp train --help`` / ``compare --help``: the groups and the knobs most runs change."""
    import dataclasses

    from lightning_mp.options import PluginOptions  # AdaptiveMP's knobs, without importing Lightning
    from lightning_mp.scaling import ScalerConfig

    if command == "compare":
        head = [
            "usage: lightning-mp compare [precisions=fp32,bf16,fp16] [key=value ...]",
            "",
            "Train one recipe under each precision (one process each) and print accuracy, speed, memory and skipped",
            "steps side by side, relative to fp32; writes compare.json, compare.md and compare.png (learning",
            "curves, time and memory) next to the runs. Every key=value below applies to every run; precision=",
            "is replaced by precisions=.",
            "seeds=3 runs each precision with seeds seed..seed+2 and reports mean +- spread and a verdict per",
            "metric (final and best validation accuracy and held-out loss: within noise of fp32, or better or",
            "worse by how much, against the smallest difference the seeds could detect).",
            "An interrupted comparison resumes: the same command keeps the runs that finished with the same config.",
        ]
    else:
        head = [
            "usage: lightning-mp train [key=value ...]",
            "       lightning-mp train --multirun [key=a,b ...]   (a sweep: one run per combination)",
            "",
            "Train one recipe under one precision; logs, checkpoints, the precision report and result.json",
            "go to output_dir.",
        ]
    lines = [*head, "", "config groups (group=option):"]
    for group, entries in list_configs().items():
        if group == "hydra/launcher" and command != "train":
            continue
        lines.append(f"  {group + ':':16}" + ", ".join(name for name, _ in entries))
    adaptive = [f.name for f in dataclasses.fields(PluginOptions) if f.name not in ("precision", "device", "scaler")]
    scaler = [f.name for f in dataclasses.fields(ScalerConfig)]
    lines += [
        "  precision also takes Lightning's names: 32-true, bf16-mixed, 16-mixed, fp8-mixed, int8-mixed, 32, 16",
        "",
        "common keys:",
        "  seed=0  output_dir=outputs/<recipe>/<precision>  ckpt_path=last (resume)  overwrite=true  logger=null",
        "  trainer.max_epochs=3  trainer.max_steps=200  trainer.devices=1  trainer.<any Trainer argument>=...",
        "  data.batch_size=64  data.root=~/data (the recipe's real dataset instead of its generated one)",
        "  precision.<knob>=...   " + ", ".join(adaptive),
        "  precision.scaler.<knob>=...   " + ", ".join(scaler),
        "",
        "lightning-mp ls lists every option with a line about it; the README explains each knob.",
    ]
    return "\n".join(lines)


def _description(text: str) -> str:
    """A config's opening comment, whole sentences: its lines up to the first example command or blank."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if body.startswith("@package"):
            continue
        if not body or body.startswith("lightning-mp "):
            break
        lines.append(body)
    return " ".join(lines)


def print_configs() -> None:
    """``lightning-mp ls``: every option of every group, its description wrapped to the terminal."""
    import shutil
    import textwrap

    width = max(shutil.get_terminal_size((100, 20)).columns, 60)
    for group, entries in list_configs().items():
        print(f"{group}:")
        for name, description in entries:
            wrapped = textwrap.wrap(description, width=width - 17) or [""]
            print(f"  {name:14} {wrapped[0]}")
            for more in wrapped[1:]:
                print(" " * 17 + more)

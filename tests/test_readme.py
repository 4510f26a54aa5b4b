"""The README's Python examples run as written on this CPU (the quick start is checked by ``test_packaging``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lightning_mp
from tests.helpers import fit

README = Path(__file__).resolve().parents[1] / "README.md"


def _first_block_after(heading: str) -> str:
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text[text.index(heading) :], flags=re.DOTALL)[0]


def _plugins_built_by(code: str, monkeypatch) -> list[lightning_mp.AdaptiveMP]:
    """Run a README example; every ``AdaptiveMP`` it builds, in order."""
    built: list[lightning_mp.AdaptiveMP] = []

    class Recorded(lightning_mp.AdaptiveMP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(lightning_mp, "AdaptiveMP", Recorded)
    exec(code, {})
    return built


def test_every_plugin_the_options_examples_build_trains_on_a_cpu(monkeypatch):
    with pytest.warns(UserWarning, match="GradScaler"):  # the migrating example says what it carries over
        built = _plugins_built_by(_first_block_after("## Options"), monkeypatch)
    assert len(built) >= 4
    for plugin in built:  # a scaler built for another device is refused at setup
        _, trainer = fit(plugin, max_steps=2)
        assert trainer.precision_plugin.optimizer_steps == 2


def test_the_fabric_example_trains_reports_and_saves(tmp_path):
    namespace: dict = {}
    exec(_first_block_after("### Lightning Fabric"), namespace)
    amp = namespace["amp"]
    assert amp.optimizer_steps == 16
    assert (tmp_path / "reports" / "precision_report.json").is_file() and (tmp_path / "ckpt.pt").is_file()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)["amp"]
    assert saved["steps"] == 16 and saved["scaler"]["scale"] == amp.scaler.get_scale()


def test_every_plugin_the_low_bit_examples_build_trains_on_a_cpu(monkeypatch):
    pytest.importorskip("torchao")
    import lightning as L
    import torch.nn.functional as F
    from torch import nn

    from tests.helpers import loader

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))

        def forward(self, x):
            return x + self.mlp(x)

    class Blocks(L.LightningModule):  # the shape the example's patterns name
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.head = nn.Linear(4, 64), nn.Linear(64, 1)
            self.blocks = nn.ModuleList(Block() for _ in range(2))

        def training_step(self, batch, batch_idx):
            h = self.inp(batch[0])
            for block in self.blocks:
                h = block(h)
            return F.mse_loss(self.head(h).float(), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    block = _first_block_after("### fp8 and int8 matrix multiplies")
    built = _plugins_built_by("from lightning_mp import AdaptiveMP\n" + block, monkeypatch)
    assert len(built) == 4
    for plugin in built:
        fit(plugin, model=Blocks(), data=loader(samples=16), max_steps=2)
        assert plugin.optimizer_steps == 2 and plugin.low_bit_layers
    assert built[-1].low_bit_layers == ["blocks.1.mlp.0", "blocks.1.mlp.2"]

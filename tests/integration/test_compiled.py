"""``torch.compile``d models: statistics and attribution hooks run, no recompilation, same numerics.

Hooks added to a compiled model are not run by its compiled code (dynamo does not guard on them); the core
runs the steps whose hooks are armed eagerly instead. ``aot_eager`` compiles through dynamo and AOTAutograd
without code generation: the same guards and graphs as inductor, eager numerics (so weights compare bitwise).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision as FabricMixedPrecision
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch._dynamo.utils import counters

from lightning_mp import AdaptiveMP
from lightning_mp.fabric import AdaptiveMP as FabricAdaptiveMP
from tests.helpers import Chain, TinyRegressor, fit, loader, same_weights

BACKEND = "aot_eager"


class Wide(L.LightningModule):
    """A plain training_step (Lightning compiles it whole: nothing in it may change from step to step, such as
    reading ``self.global_step``, or dynamo recompiles it at every step whatever the precision plugin)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def compiled_fit(plugin):
    """Fit a compiled LightningModule; returns (module, compiled graphs)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Wide()
    fit(plugin, model=torch.compile(model, backend=BACKEND), data=loader(samples=32), max_steps=8)
    return model, counters["stats"]["unique_graphs"]


def test_statistics_see_a_compiled_model_with_no_extra_graph_and_the_same_weights():
    plugin = AdaptiveMP("bf16-mixed", stats_every=2)  # hooks added and removed on four of the eight steps
    ours, our_graphs = compiled_fit(plugin)
    theirs, their_graphs = compiled_fit(MixedPrecision("bf16-mixed", "cpu"))
    assert our_graphs == their_graphs == 1  # no recompilation when hooks come and go
    summary = plugin.statistics.summary(plugin.stats_dtype)
    assert all(summary[f"net.{i}"]["activation_amax"] > 0 for i in range(5)), summary  # "act -" before
    assert plugin.statistics.samples_taken == 4
    assert same_weights(ours, theirs)


class Holder(TinyRegressor):
    """A LightningModule holding the user's network as ``self.model`` (how nanoGPT or HF models are wrapped)."""

    def __init__(self, compiled: bool = False, **kwargs):
        super().__init__(**kwargs)
        chain = Chain()
        self.model = torch.compile(chain, backend=BACKEND) if compiled else chain

    def forward(self, x):
        return self.model(x[:, :3])


def test_patterns_select_compiled_submodules_by_their_written_names():
    torch._dynamo.reset()
    plugin = AdaptiveMP("bf16-mixed", fp32_modules=["model.b"])
    fit(plugin, model=Holder(compiled=True), max_steps=2)
    assert plugin.fp32_modules == ["model._orig_mod.b"]  # the compiled wrapper's level is not written


def test_a_pattern_written_for_the_inner_network_suggests_its_name_in_the_lightning_module():
    with pytest.raises(ValueError, match=r"\['b'\] match no module of Holder\. Did you mean model\.b\?"):
        fit(AdaptiveMP("bf16-mixed", fp32_modules=["b"]), model=Holder(), max_steps=1)


def fabric_compiled(plugin):
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 1))
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(torch.compile(net, backend=BACKEND), optimizer)
    x, y = loader(samples=24).dataset.tensors
    for i in range(0, 24, 4):
        fabric.backward(F.mse_loss(model(x[i : i + 4]), y[i : i + 4]))
        optimizer.step()
        optimizer.zero_grad()
    return net, counters["stats"]["unique_graphs"]


def test_fabric_with_a_compiled_model_keeps_its_graphs_numerics_and_statistics():
    plugin = FabricAdaptiveMP("bf16-mixed", stats_every=2)
    ours, our_graphs = fabric_compiled(plugin)
    theirs, their_graphs = fabric_compiled(FabricMixedPrecision("bf16-mixed", "cpu"))
    assert our_graphs == their_graphs == 1  # no recompilation when hooks come and go
    assert same_weights(ours, theirs)
    summary = plugin.statistics.summary(plugin.stats_dtype)
    assert summary["0"]["activation_amax"] > 0 and plugin.statistics.samples_taken == 3


class Sliced(Wide):
    """Modern Hugging Face decoders (Llama, Mistral, Qwen) run ``self.layers[: n]``: a new ModuleList per call."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.n = 2

    def training_step(self, batch, batch_idx):
        x, y = batch
        for layer in self.layers[: self.n]:
            x = layer(x)
        return F.mse_loss(self.net(x).float(), y)


def test_a_model_that_builds_a_module_list_in_forward_compiles_once():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    fit(AdaptiveMP("bf16-mixed"), model=torch.compile(Sliced(), backend=BACKEND), data=loader(samples=32), max_steps=8)
    assert counters["stats"]["unique_graphs"] == 1, "the registration counter must not be traced as a guard"

"""Promotion by evidence: an overflow born in a module's own code runs that code in fp32 and nothing more.

A container whose ``forward`` overflows in its own arithmetic (not inside a submodule) becomes an *own-code
island*: its own operations in fp32, its submodules in fp16. No size rule: the small block of a small model and
a whole network kept as ``self.model`` are treated alike. Checked by recording the dtype of every matmul the
trained model runs, and against a clean run's held-out loss.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import AdaptiveLossScaler, AdaptiveMP
from lightning_mp.fallback.islands import island_scope
from tests.helpers import OpRecorder, SpikyRegressor, fit, line_of, loader, loader_with, trainer

MATMULS = ("aten::mm", "aten::bmm", "aten::addmm")


def _fp16(**kwargs) -> AdaptiveMP:
    return AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=16.0), attach_callbacks=False, **kwargs)


def _large_every_third(samples: int = 48) -> DataLoader:
    x, y = loader(samples=samples).dataset.tensors
    x = x.clone()
    x[::3] *= 30  # every batch holds a sample large enough for the block's own multiply to overflow fp16
    return loader_with(x, y)


def test_a_block_that_overflows_in_its_own_arithmetic_is_promoted_as_own_code():
    # The shape: Sequential(Linear(4, 32), ReLU(), Spiky(), ReLU(), Linear(32, 1)), Spiky holding 63% of
    # the parameters. Its bad steps used to be skipped for the whole run; now two blames promote its own code.
    plugin = _fp16()
    model, _ = fit(plugin, model_cls=lambda: SpikyRegressor(lr=1e-3), data=_large_every_third(), max_steps=12)
    share = sum(p.numel() for p in model.net[2].parameters()) / sum(p.numel() for p in model.parameters())
    assert share > 0.5
    line = f"helpers.py:{line_of(type(model.net[2]).forward, 'the overflowing line')}"
    assert [(e.module, e.op, e.source) for e in plugin.overflow_events] == [("net.2", "aten::mul", line)] * 2
    assert [(p.module, p.reason, p.scope) for p in plugin.promotions] == [("net.2", "overflow", "own_code")]
    assert island_scope(model.net[2]) == "own_code" and island_scope(model.net[2].proj) is None
    assert plugin.skipped_steps == 2, "nothing skipped once the block's own code runs in fp32"
    with torch.autocast("cpu", dtype=torch.float16), OpRecorder(model) as ops:
        model(_large_every_third().dataset.tensors[0][:4])
    assert ops.dtypes("aten::addmm") == {
        "net.0": {torch.float16},
        "net.2.proj": {torch.float16},
        "net.4": {torch.float16},
    }
    assert {op for module, op, dtype in ops.ops if module == "net.2" and dtype == torch.float32} >= {"aten::mul.Tensor"}


WIDTH, TOKENS = 16, 6


class Block(nn.Module):
    """Hand-written attention: a ``Linear`` child and the score arithmetic in the block's own ``forward``."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.gain = gain  # 1e4 in the harmful block: ``* gain / gain`` is exact in fp32, overflows in fp16

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(-2, -1)) * self.gain / self.gain / WIDTH**0.5  # the overflowing line
        return x + scores.softmax(dim=-1) @ v


class Blocks(L.LightningModule):
    """Three blocks; only the middle one's own arithmetic overflows fp16 (on large inputs)."""

    def __init__(self, harmful: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(4, WIDTH)
        self.blocks = nn.Sequential(Block(), Block(1e4 if harmful else 1.0), Block())
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x))).mean(dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _sequences(samples: int, seed: int, large: bool) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, TOKENS, 4, generator=gen)
    y = x.sum(dim=(1, 2)).unsqueeze(1) / TOKENS
    if large:
        x[::4] *= 8  # a quarter of the samples: their scores times 1e4 exceed fp16's range
    return TensorDataset(x, y)


def _train_blocks(plugin: AdaptiveMP, harmful: bool, seed: int = 0) -> tuple[Blocks, float]:
    torch.manual_seed(seed)
    model = Blocks(harmful)
    data = DataLoader(_sequences(640, seed=0, large=True), batch_size=16)
    trainer(plugin, max_epochs=1, max_steps=-1).fit(model, data)
    x, y = _sequences(256, seed=1, large=True).tensors
    with torch.no_grad():
        held_out = F.mse_loss(model.eval()(x), y).item()
    return model, held_out


@pytest.mark.slow
def test_only_the_blamed_blocks_own_operations_run_in_fp32_and_the_run_matches_a_clean_one():
    plugin = _fp16()
    model, loss = _train_blocks(plugin, harmful=True)
    assert [(p.module, p.scope) for p in plugin.promotions] == [("blocks.1", "own_code")]
    assert plugin.skipped_steps == 2
    with torch.autocast("cpu", dtype=torch.float16), OpRecorder(model) as ops:
        model(_sequences(4, seed=2, large=True).tensors[0])
    matmuls = {module: dtypes for op in MATMULS for module, dtypes in ops.dtypes(op).items()}
    assert matmuls.pop("blocks.1") == {torch.float32}, "the blamed block's own matmuls run in fp32"
    assert set(matmuls) == {"embed", "head", "blocks.0", "blocks.2", *(f"blocks.{i}.qkv" for i in range(3))}
    assert all(dtypes == {torch.float16} for dtypes in matmuls.values()), matmuls  # its qkv child included
    # Clean references: the same model and data without the harmful constant (nothing overflows), over three
    # seeds for the noise; the harmed run differs from its own seed's clean run by less than the seeds differ.
    clean = []
    for seed in range(3):
        clean_plugin = _fp16()
        clean.append(_train_blocks(clean_plugin, harmful=False, seed=seed)[1])
        assert clean_plugin.overflow_events == [] and clean_plugin.promotions == []
    assert abs(loss - clean[0]) <= max(clean) - min(clean), (loss, clean)


def test_an_own_code_island_survives_a_checkpoint(tmp_path):
    plugin = _fp16()
    model, t = fit(plugin, model_cls=lambda: SpikyRegressor(lr=1e-3), data=_large_every_third(), max_steps=4)
    t.save_checkpoint(tmp_path / "last.ckpt")
    resumed = _fp16()
    torch.manual_seed(0)
    again = SpikyRegressor(lr=1e-3)
    trainer(resumed, max_steps=6).fit(again, _large_every_third(), ckpt_path=tmp_path / "last.ckpt")
    assert [(p.module, p.scope) for p in resumed.promotions] == [("net.2", "own_code")]
    assert island_scope(again.net[2]) == "own_code"
    assert resumed.skipped_steps == plugin.skipped_steps == 2

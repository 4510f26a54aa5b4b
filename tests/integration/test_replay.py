"""Replay of a bad step (lightning_mp/replay.py): the first bad step is named down to the operation and the line,
and the replay leaves no trace in the run."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import AdaptiveLossScaler, AdaptiveMP, ScaleAction
from tests.helpers import Explode, line_of, trainer

WIDTH, TOKENS = 8, 4


class Attention(nn.Module):
    """Causal self-attention written out by hand, as model code often is: the score arithmetic and the -inf mask
    are the module's own forward, where no forward hook can look."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.register_buffer("mask", torch.ones(TOKENS, TOKENS).tril().bool(), persistent=False)
        self.gain = 1.0  # set per step by the test model: 1e6 overflows fp16, NaN is bad in any precision

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(-2, -1)) * self.gain  # the overflowing line
        scores = scores.masked_fill(~self.mask, float("-inf"))  # -inf on purpose: softmax makes it finite
        return self.proj(scores.softmax(dim=-1) @ v)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Transformer(L.LightningModule):
    """Two blocks; ``bad_attention`` maps a global step to the gain of blocks.1.attn on that step, and
    ``nan_loss_steps`` poisons the loss in training_step."""

    def __init__(self, bad_attention=None, nan_loss_steps=(), lr=1e-2, dropout=0.0):
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(WIDTH, 1)
        self.bad_attention = dict(bad_attention or {})
        self.nan_loss_steps = set(nan_loss_steps)
        self.lr = lr

    def forward(self, x):
        h = self.drop(self.embed(x))
        for block in self.blocks:
            h = block(h)
        return self.head(h).mean(dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.blocks[1].attn.gain = self.bad_attention.get(self.global_step, 1.0)
        loss = F.mse_loss(self(x).float(), y)
        if self.global_step in self.nan_loss_steps:
            loss = loss * float("nan")  # the poisoned loss line
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def data(batches=8, batch_size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, TOKENS, WIDTH, generator=gen)
    y = x.mean(dim=(1, 2)).unsqueeze(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def run(plugin, model, steps=6, **kwargs):
    torch.manual_seed(0)
    t = trainer(plugins=[plugin], max_steps=steps, **kwargs)
    t.fit(model, data())
    return t


def plugin_for(precision, **kwargs):
    if precision == "16-mixed":
        kwargs.setdefault("scaler", AdaptiveLossScaler("cpu", init_scale=256.0))
        kwargs.setdefault("rescue", False)  # each overflow is a skipped, replayed step (rescue: test_rescue.py)
    return AdaptiveMP(precision, attach_callbacks=False, **kwargs)


ATTENTION_LINE = f"test_replay.py:{line_of(Attention.forward, 'the overflowing line')}"
LOSS_LINE = f"test_replay.py:{line_of(Transformer.training_step, 'the poisoned loss line')}"


@pytest.mark.parametrize(
    ("precision", "gain", "kind"),
    [("16-mixed", 1e6, "inf"), ("bf16-mixed", float("nan"), "nan"), ("32-true", float("nan"), "nan")],
    ids=["fp16", "bf16", "fp32"],
)
def test_a_single_forward_overflow_in_a_module_own_code_is_named_on_its_only_occurrence(precision, gain, kind):
    torch.manual_seed(0)
    plugin = plugin_for(precision)
    run(plugin, Transformer(bad_attention={2: gain}))
    [event] = plugin.overflow_events
    dtype = {"16-mixed": "float16", "bf16-mixed": "bfloat16", "32-true": "float32"}[precision]
    assert (event.step, event.phase, event.module, event.op) == (3, "forward", "blocks.1.attn", "aten::mul")
    assert (event.kind, event.dtype, event.source, event.reproduced) == (kind, dtype, ATTENTION_LINE, True)
    assert event.where == f"blocks.1.attn: aten::mul in {dtype} produced {kind} ({ATTENTION_LINE})"
    assert plugin.fp32_modules == [] or precision == "16-mixed", "one event promotes nothing"
    assert not any(p.reason == "overflow" for p in plugin.promotions)


class ProbeWatch(L.Callback):
    """Whether the forward probe (the fallback when a replay cannot localize) was armed after each step."""

    def __init__(self):
        self.armed = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.armed.append(trainer.precision_plugin.core.tracker.probe.armed)


def test_a_reproduced_event_arms_no_probe():
    torch.manual_seed(0)
    watch, plugin = ProbeWatch(), plugin_for("32-true")
    run(plugin, Transformer(bad_attention={2: float("nan")}), callbacks=[watch])
    assert plugin.overflow_events[0].reproduced and watch.armed == [False] * 6


def test_a_single_nan_loss_is_one_loss_event_and_nothing_is_promoted():
    torch.manual_seed(0)
    plugin = plugin_for("16-mixed")
    run(plugin, Transformer(nan_loss_steps={3}))
    [event] = plugin.overflow_events
    assert (event.phase, event.module, event.op, event.source) == ("loss", None, "aten::mul", LOSS_LINE)
    assert event.kind == "nan" and event.reproduced
    assert not any(p.reason == "overflow" for p in plugin.promotions)
    assert plugin.scaler.get_scale() >= 256.0, "a bad loss is not a scaling problem"


class ExplodingTransformer(Transformer):
    """A custom autograd function after block 0 blows the gradient up on chosen steps."""

    def __init__(self, steps):
        super().__init__()
        self.explode_steps = set(steps)

    def forward(self, x):
        h = self.blocks[0](self.embed(x))
        if self.global_step in self.explode_steps:
            h = Explode.apply(h, 1e6)
        return self.head(self.blocks[1](h)).mean(dim=1)


def test_a_backward_overflow_names_the_operation_its_module_and_the_line():
    torch.manual_seed(0)
    plugin = plugin_for("16-mixed")
    run(plugin, ExplodingTransformer(steps={2}))
    [event] = plugin.overflow_events
    assert (event.phase, event.op, event.kind, event.reproduced) == ("backward", "aten::mul", "inf", True)
    assert event.source == f"helpers.py:{line_of(Explode.backward, 'grad * ctx.factor')}"
    assert event.module is None, "the custom function runs in the LightningModule's own forward"
    assert event.scaler_action is not ScaleAction.EXCUSED, "a backward overflow is the scale's business"


class Recorder(L.Callback):
    """Everything a replay could disturb, after every step: weights, buffers, optimizer state, RNG."""

    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        tensors = [t.detach().clone() for t in [*module.parameters(), *module.buffers()]]
        for state in trainer.optimizers[0].state.values():
            tensors += [v.clone() for v in state.values() if torch.is_tensor(v)]
        self.states.append((tensors, torch.get_rng_state()))


class BatchNormTransformer(Transformer):
    def __init__(self, **kwargs):
        super().__init__(dropout=0.2, **kwargs)
        self.norm = nn.BatchNorm1d(TOKENS)

    def forward(self, x):
        return super().forward(self.norm(x))


@pytest.mark.parametrize("precision", ["16-mixed", "32-true"], ids=["fp16", "fp32"])
def test_the_replay_leaves_no_trace_in_weights_buffers_optimizer_state_or_rng(precision):
    """With dropout (RNG) and BatchNorm (buffers): a run that replays its bad steps equals, bit for bit and at
    every step, the same run with the replay off (promotion off: with the replay the second event promotes,
    without it the first event is not localized and nothing is promoted yet)."""
    bad = {2: float("nan"), 4: float("nan")}
    runs = []
    for replay in (True, False):
        torch.manual_seed(0)
        recorder, plugin = Recorder(), plugin_for(precision, replay=replay, auto_fallback=False)
        run(plugin, BatchNormTransformer(bad_attention=bad), steps=7, callbacks=[recorder])
        runs.append((recorder.states, plugin.overflow_events))
    (replayed, events), (plain, plain_events) = runs
    assert [e.reproduced for e in events] == [True, True] and [e.reproduced for e in plain_events] == [None, None]
    assert len(replayed) == len(plain) == 7
    for (tensors, rng), (tensors_plain, rng_plain) in zip(replayed, plain):
        assert torch.equal(rng, rng_plain)
        assert all(torch.equal(a, b) for a, b in zip(tensors, tensors_plain, strict=True))


class Logged(Transformer):
    def training_step(self, batch, batch_idx):
        self.log("calls", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")
        return super().training_step(batch, batch_idx)


def test_the_replay_logs_nothing_twice():
    torch.manual_seed(0)
    plugin = plugin_for("32-true")
    t = run(plugin, Logged(bad_attention={1: float("nan"), 3: float("nan")}), steps=8, max_epochs=1)
    assert len(plugin.overflow_events) == 2 and all(e.reproduced for e in plugin.overflow_events)
    assert t.callback_metrics["calls"].item() == 8.0, "one logged call per real step, none per replay"


def test_gradient_accumulation_replays_the_micro_batches_and_names_the_bad_one():
    class SecondMicroBatch(Transformer):
        def training_step(self, batch, batch_idx):
            self.blocks[1].attn.gain = float("nan") if batch_idx == 3 else 1.0  # micro-batch 2 of step 2
            return F.mse_loss(self(batch[0]).float(), batch[1])

    torch.manual_seed(0)
    plugin = plugin_for("32-true")
    run(plugin, SecondMicroBatch(), steps=3, accumulate_grad_batches=2)
    [event] = plugin.overflow_events
    assert (event.step, event.module, event.op, event.source) == (2, "blocks.1.attn", "aten::mul", ATTENTION_LINE)


def test_a_fault_the_replay_cannot_reproduce_is_reported_as_not_reproduced():
    class CountedFault(Transformer):
        """The fault depends on how often training_step ran, which a replay changes: not reproducible."""

        calls = 0

        def training_step(self, batch, batch_idx):
            self.calls += 1
            self.blocks[1].attn.gain = float("nan") if self.calls == 3 else 1.0
            return F.mse_loss(self(batch[0]).float(), batch[1])

    torch.manual_seed(0)
    watch, plugin = ProbeWatch(), plugin_for("32-true")
    run(plugin, CountedFault(), steps=5, callbacks=[watch])
    [event] = plugin.overflow_events
    assert (event.phase, event.module, event.op, event.reproduced) == ("forward", None, None, False)
    assert watch.armed == [False, False, True, True, True], "falls back to the cheap attribution: the probe watches"


@pytest.mark.slow
def test_a_compiled_model_gets_the_same_events_as_eager():
    events = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = Transformer(bad_attention={1: float("nan"), 3: float("nan")})
        if compiled:
            model.blocks = nn.ModuleList([torch.compile(block, backend="aot_eager") for block in model.blocks])
        plugin = plugin_for("32-true")
        run(plugin, model, steps=5)
        if compiled:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "the blocks really were compiled"
        events[compiled] = [
            (e.step, e.phase, (e.module or "").replace("._orig_mod", ""), e.op, e.source, e.reproduced)
            for e in plugin.overflow_events
        ]
    expected = [(step, "forward", "blocks.1.attn", "aten::mul", ATTENTION_LINE, True) for step in (2, 4)]
    assert events[False] == expected
    assert events[True] == expected

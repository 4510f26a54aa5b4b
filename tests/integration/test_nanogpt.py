"""nanoGPT's model.py (tests/third_party/nanogpt, unchanged) wrapped in a LightningModule as ``self.model``: an
overflow in the network's own ``forward`` is named down to its line, promotes that forward's own code (not its
blocks) to fp32, and costs the run only the skipped steps."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_mp import AdaptiveLossScaler, AdaptiveMP
from tests.helpers import OpRecorder, line_of, trainer
from tests.third_party.nanogpt.model import GPT, GPTConfig

VOCAB, BLOCK = 32, 16


class HarmedGPT(GPT):
    """nanoGPT's ``GPT.forward``, line for line, with one added line that scales the logits by ``harm``."""

    harm = 1.0

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=device)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        logits = logits * self.harm  # the harmful line
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


class LitNanoGPT(L.LightningModule):
    def __init__(self, harm_steps=()):
        super().__init__()
        config = GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
        self.model = HarmedGPT(config)
        self.harm_steps = set(harm_steps)

    def training_step(self, batch, batch_idx):
        self.model.harm = 1e5 if self.global_step in self.harm_steps else 1.0
        _, loss = self.model(*batch)
        return loss

    def configure_optimizers(self):
        return self.model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")


def markov_tokens(sequences: int, seed: int) -> torch.Tensor:
    """Sequences from a fixed random bigram chain: learnable, with an entropy floor the loss settles on."""
    chain = torch.Generator().manual_seed(1234)
    transitions = torch.softmax(3.0 * torch.randn(VOCAB, VOCAB, generator=chain), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.empty(sequences, BLOCK + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(VOCAB, (sequences,), generator=gen)
    for i in range(BLOCK):
        tokens[:, i + 1] = torch.multinomial(transitions[tokens[:, i]], 1, generator=gen).squeeze(1)
    return tokens


def train(harm_steps=(), steps=80):
    tokens = markov_tokens(steps * 16, seed=0)
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=16)
    torch.manual_seed(0)
    model = LitNanoGPT(harm_steps)
    plugin = AdaptiveMP("16-mixed", scaler=AdaptiveLossScaler("cpu", init_scale=1024.0), attach_callbacks=False)
    trainer(plugins=[plugin], max_steps=steps).fit(model, data)
    held_out = markov_tokens(256, seed=1)
    with torch.no_grad():
        _, loss = model.model.eval()(held_out[:, :-1].contiguous(), held_out[:, 1:].contiguous())
    return plugin, loss.item()


@pytest.mark.slow
def test_an_overflow_in_nanogpt_own_forward_is_named_promotes_its_own_code_and_costs_no_accuracy(recwarn):
    harm_steps = {10, 11, 12, 13}
    plugin, loss = train(harm_steps)
    clean_plugin, clean_loss = train()
    assert clean_plugin.overflow_events == []

    line = f"test_nanogpt.py:{line_of(HarmedGPT.forward, 'the harmful line')}"
    events = plugin.overflow_events
    assert [e.step - 1 for e in events] == sorted(harm_steps), "every harmed step skipped, nothing else"
    assert [(e.phase, e.module, e.op, e.source, e.reproduced) for e in events[:2]] == [
        ("forward", "model", "aten::mul", line, True)
    ] * 2, "the first event is already exact: the network's own forward, its operation and line"
    # The second blame promotes the network's own code; its blocks keep fp16. The harmed steps after it are
    # finite in fp32 but 1e4 times the usual loss: the spike rule skips them.
    assert [(p.module, p.reason, p.scope) for p in plugin.promotions if p.reason == "overflow"] == [
        ("model", "overflow", "own_code")
    ]
    assert [e.phase for e in events[2:]] == ["loss", "loss"] and all("spike" in e.action for e in events[2:])
    told = [str(w.message) for w in recwarn if "model's own code runs in fp32" in str(w.message)]
    assert len(told) == 1 and "lightning_mp.fp32()" in told[0] and line in told[0]
    tokens = markov_tokens(4, seed=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16), OpRecorder(plugin.core.model) as ops:
        plugin.core.model.model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    matmuls = {
        module: dtypes for op in ("aten::mm", "aten::bmm", "aten::addmm") for module, dtypes in ops.dtypes(op).items()
    }
    assert "model.lm_head" in matmuls and all(d == {torch.float16} for d in matmuls.values()), matmuls
    assert ("model", "aten::mul.Tensor", torch.float32) in ops.ops, "the harmful line itself runs in fp32"
    assert abs(loss - clean_loss) <= 0.10 * clean_loss, (loss, clean_loss)

"""Conformance on Hugging Face ``transformers`` models built from small configs (nothing is downloaded).

A decoder (GPT-2), an encoder (BERT), a vision transformer (ViT) and a speech model (Wav2Vec2), each wrapped
the way users wrap them (``self.model = AutoModel...``) and trained a few steps: bitwise Lightning's
``MixedPrecision`` in bf16, finite in fp16 with the defaults (CPU fp16 is slow: the models are tiny), default
fp32 modules and statistics on the real module names, and ``fp32_modules`` patterns as a user writes them.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from lightning_mp import AdaptiveMP
from tests.helpers import same_weights, trainer

transformers = pytest.importorskip("transformers")

STEPS = 3
BATCH = 4


def gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def vit():
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def wav2vec2():
    config = transformers.Wav2Vec2Config(
        vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, num_labels=3, classifier_proj_size=16,
        mask_time_prob=0.0, layerdrop=0.0,  # SpecAugment and LayerDrop draw from numpy / Python RNGs
    )  # fmt: skip
    return transformers.Wav2Vec2ForSequenceClassification(config)


def batches(name: str) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        labels = torch.randint(0, 3, (BATCH,), generator=gen)
        if name == "gpt2":
            ids = torch.randint(0, 64, (BATCH, 12), generator=gen)
            out.append({"input_ids": ids, "labels": ids})
        elif name == "bert":
            out.append({"input_ids": torch.randint(0, 64, (BATCH, 12), generator=gen), "labels": labels})
        elif name == "vit":
            out.append({"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=gen), "labels": labels})
        else:
            out.append({"input_values": torch.randn(BATCH, 800, generator=gen), "labels": labels})
    return out


MODELS = {"gpt2": gpt2, "bert": bert, "vit": vit, "wav2vec2": wav2vec2}


class HFTask(L.LightningModule):
    """How a user trains a Hugging Face model in Lightning: the model as ``self.model``, its own loss."""

    def __init__(self, name: str):
        super().__init__()
        torch.manual_seed(0)
        self.model = MODELS[name]()
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.losses.append(loss.detach().float())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def train(name: str, plugin) -> HFTask:
    task = HFTask(name)
    trainer(plugins=[plugin], max_steps=STEPS).fit(task, DataLoader(batches(name), batch_size=None))
    return task


@pytest.mark.parametrize("name", MODELS)
def test_bf16_is_bitwise_lightnings_mixed_precision(name):
    plugin = AdaptiveMP("bf16-mixed", stats_every=1)
    ours = train(name, plugin)
    theirs = train(name, MixedPrecision("bf16-mixed", "cpu"))
    assert same_weights(ours, theirs)
    assert plugin.optimizer_steps == STEPS and plugin.skipped_steps == 0
    # Statistics on the real module names, relative to the LightningModule.
    assert any(fqn.startswith("model.") and fqn.count(".") >= 3 for fqn in plugin.statistics.summary(torch.bfloat16))


# The fp32 defaults fp16 should give each model: its LayerNorms, on their real names.
LAYER_NORMS = {
    "gpt2": "model.transformer.h.0.ln_1",
    "bert": "model.bert.encoder.layer.0.attention.output.LayerNorm",
    "vit": "model.vit.layers.0.layernorm_before",
    "wav2vec2": "model.wav2vec2.encoder.layers.0.layer_norm",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_fp16_with_the_defaults_trains_finite_with_norms_in_fp32(name):
    plugin = AdaptiveMP("16-mixed", stats_every=1)
    task = train(name, plugin)
    assert plugin.optimizer_steps == STEPS
    assert all(torch.isfinite(p).all() for p in task.parameters())
    assert torch.isfinite(task.losses[-1])
    reasons = {p.module: p.reason for p in plugin.promotions}
    assert reasons[LAYER_NORMS[name]] == "default"
    summary = plugin.statistics.summary(torch.float16)
    assert summary[LAYER_NORMS[name]]["activation_amax"] > 0  # statistics reach the model's own modules
    # The model returns its fp32 loss, whose gradient is the loss scale: judged against fp32, not fp16's max.
    assert summary["model"]["grad_headroom_bits"] > 1.0, summary["model"]


def test_an_attention_pattern_selects_every_attention_module_of_bert():
    plugin = AdaptiveMP("bf16-mixed", fp32_modules=["*.attention.*"])
    train("bert", plugin)
    static = sorted(p.module for p in plugin.promotions if p.reason == "static")
    assert "model.bert.encoder.layer.0.attention.self" in static
    assert "model.bert.encoder.layer.1.attention.output.dense" in static
    assert all(".attention." in fqn for fqn in static)


def test_a_pattern_written_without_the_lightning_module_prefix_is_refused_with_the_right_name():
    with pytest.raises(ValueError, match=r"Did you mean model\.transformer\.h\.\*\.attn\?.*model\.transformer"):
        train("gpt2", AdaptiveMP("bf16-mixed", fp32_modules=["transformer.h.*.attn"]))

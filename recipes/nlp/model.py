"""A small Transformer encoder classifier: attention, LayerNorm and softmax, the classic fp16 trouble spots."""

from __future__ import annotations

import torch
from torch import nn

from lightning_mp.recipes.nlp.knobs import NET


class TransformerClassifier(nn.Module):
    """Token and position embeddings -> pre-norm Transformer encoder -> masked mean pooling -> linear.

    Token id 0 is padding (masked out of attention and pooling).
    """

    def __init__(
        self, vocab_size: int, num_classes: int, dim: int = 64, heads: int = 4, layers: int = 2, max_length: int = 24
    ):
        NET.check(locals())  # what each argument accepts: knobs.py
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position = nn.Parameter(0.02 * torch.randn(1, max_length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0
        h = self.encoder(self.embed(ids) + self.position[:, : ids.shape[1]], src_key_padding_mask=pad)
        h = self.norm(h)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0))

"""NLP recipe: a small Transformer encoder classifier on generated sentences or an AG News style CSV."""

from lightning_mp.recipes.nlp.data import TextData, generate_sentences, read_text_csv
from lightning_mp.recipes.nlp.model import TransformerClassifier

__all__ = ["TextData", "TransformerClassifier", "generate_sentences", "read_text_csv"]

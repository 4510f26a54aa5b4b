"""Text for the NLP recipe: generated sentences (default) or a CSV/TSV of label and text (AG News layout).

Generated sentences carry a sentiment that single words do not decide: "not" flips an adjective, and in
"A but B" only the clause after "but" counts; half the adjectives are made up, learned only from examples.
Tokens come from a word-level tokenizer trained on the training texts with Hugging Face ``tokenizers`` (no
download).
"""

from __future__ import annotations

import csv
import random

import torch

from lightning_mp.errors import ConfigError, invalid
from lightning_mp.recipes.common import TensorDataModule, check_root
from lightning_mp.recipes.nlp.knobs import DATA

SUBJECTS = [
    "the movie",
    "this film",
    "the book",
    "the show",
    "my meal",
    "the service",
    "the hotel",
    "the game",
    "the album",
    "the lecture",
    "our trip",
    "the ending",
]
VERBS = ["was", "is", "seemed", "felt", "looked", "turned out"]
POSITIVE = ["good", "great", "excellent", "wonderful", "fun", "brilliant", "lovely", "enjoyable"]
NEGATIVE = ["bad", "awful", "boring", "terrible", "dull", "poor", "painful", "disappointing"]
INTENSIFIERS = ["", "", "really", "very", "quite", "rather"]
NEGATIONS = ["not", "never", "hardly"]
LEXICON = 145  # made-up adjectives per polarity: fp32 ends at 0.90 +- 0.01 in five epochs (seeds 0-2)


def made_up_adjectives(size: int = LEXICON) -> tuple[list[str], list[str]]:
    """``size`` made-up positive and ``size`` made-up negative adjectives ("stostor", "plekral"), the same for
    every seed: a vocabulary a model can only learn from the examples it sees."""
    rng = random.Random(1234)
    onsets = "b d f g k l m n p r s t v z br dr gl kr pl st tr".split()
    words: set[str] = set()
    while len(words) < 2 * size:
        words.add("".join(rng.choice(onsets) + rng.choice("aeiou") for _ in range(2)) + rng.choice("nrlsxk"))
    ordered = sorted(words)
    rng.shuffle(ordered)
    return ordered[:size], ordered[size:]


def _clause(rng: random.Random, subject: str, made_up: tuple[list[str], list[str]]) -> tuple[str, int]:
    """``<subject> <verb> [negation] [intensifier] <adjective>``: half the adjectives are common words, half
    made up. The sentiment is the adjective's, flipped by a negation."""
    positive, negated = rng.random() < 0.5, rng.random() < 0.5
    words = [subject, rng.choice(VERBS)]
    if negated:
        words.append(rng.choice(NEGATIONS))
    pool = (POSITIVE, NEGATIVE) if rng.random() < 0.5 else made_up
    words += [rng.choice(INTENSIFIERS), rng.choice(pool[0] if positive else pool[1])]
    return " ".join(w for w in words if w), int(positive != negated)


def generate_sentences(count: int, seed: int, lexicon: int = LEXICON) -> tuple[list[str], list[int]]:
    """Deterministic sentences and binary sentiment labels (1 = positive).

    No single word decides a label: "not" flips an adjective, and in "A but B" only the clause after "but"
    counts. Half the adjectives are common words; the other half come from ``lexicon`` made-up words per
    polarity, each seen a few dozen times in an epoch, so a model learns the structure early and the
    vocabulary slowly: fp32 ends in the 0.80-0.95 band in five epochs and is still learning (half the steps or
    half the width ends far lower). Every label is exact (the generator knows it): the ceiling is 1.
    """
    rng = random.Random(seed)
    made_up = made_up_adjectives(lexicon)
    texts, labels = [], []
    for _ in range(count):
        first, second = rng.sample(SUBJECTS, 2)
        text, label = _clause(rng, first, made_up)
        if rng.random() < 0.5:
            second_text, label = _clause(rng, second, made_up)  # "A but B": the label is B's
            text = f"{text} but {second_text}"
        texts.append(text)
        labels.append(label)
    return texts, labels


HEADER_LABELS = {"label", "labels", "class", "class index", "class_index", "category", "target", "y"}


def read_text_csv(path) -> tuple[list[str], list[int]]:
    """Rows of ``label, text[, more text]`` (AG News: class 1..4, title, description); ``.tsv`` is tab-separated.

    Labels are mapped to 0..K-1 in sorted order of their values. A header row is recognised (its first field is
    a known column name, or is not a number while every other label is) and skipped. Errors name the file and
    the line: a row without text, a quote that is never closed (it would swallow the rest of the file as one
    field), a file that is not UTF-8 text.
    """
    delimiter = "\t" if str(path).endswith(".tsv") else ","
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=delimiter, strict=True)
            line = 1  # where the current row starts
            try:
                for row in reader:
                    start, line = line, reader.line_num + 1
                    if not row:
                        continue
                    if reader.line_num > start:  # one row spread over several lines: a quote left open
                        raise ConfigError(
                            f"{path}:{start}: a quoted field runs over {reader.line_num - start + 1} lines"
                            " (an unterminated quote?); expected one 'label, text' row per line."
                        )
                    if len(row) < 2 or not row[1].strip():
                        raise ConfigError(f"{path}:{start}: expected 'label, text', got {row!r}.")
                    rows.append((start, row[0].strip(), " ".join(part.strip() for part in row[1:])))
            except csv.Error as error:  # the row starting at `line` never ended: a quote left open
                raise ConfigError(
                    f"{path}:{line}: not a valid CSV row ({error}; an unterminated quote runs to line"
                    f" {reader.line_num})."
                ) from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start}).") from None
    if rows and _is_header(rows):
        rows = rows[1:]
    if not rows:
        raise ConfigError(f"{path} has no rows.")
    classes = sorted({label for _, label, _ in rows}, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else v))
    index = {label: i for i, label in enumerate(classes)}
    return [text for _, _, text in rows], [index[label] for _, label, _ in rows]


def _is_header(rows: list[tuple[int, str, str]]) -> bool:
    first = rows[0][1]
    if first.lower() in HEADER_LABELS:
        return True
    rest = [label for _, label, _ in rows[1:]]
    return bool(rest) and not first.isdigit() and all(label.isdigit() for label in rest)


class TextData(TensorDataModule):
    """Generated sentences by default; ``root/train.csv`` and ``root/test.csv`` (or ``.tsv``) when given.

    Args:
        root: directory with the CSV/TSV files, or ``None`` for generated sentences.
        num_classes: 2 for the generated sentences, 4 for AG News (checked against the data).
        vocab_size: tokenizer vocabulary cap (the model's embedding uses the same number).
        max_length: tokens per text (padded or truncated).
        batch_size: per step.
        train_size: generated training sentences.
        val_size: generated validation sentences.
        seed: data seed.
    """

    def __init__(
        self,
        root=None,
        num_classes: int = 2,
        vocab_size: int = 2000,
        max_length: int = 24,
        batch_size: int = 64,
        train_size: int = 4000,
        val_size: int = 800,
        seed: int = 0,
    ):
        DATA.check(locals())  # what each argument accepts: knobs.py
        super().__init__()
        self.root, self.num_classes, self.vocab_size, self.max_length = root, num_classes, vocab_size, max_length
        self.batch_size, self.train_size, self.val_size, self.seed = batch_size, train_size, val_size, seed

    def _files(self):
        path = check_root(self.root)
        for suffix in (".csv", ".tsv"):
            train, test = path / f"train{suffix}", path / f"test{suffix}"
            if train.exists() and test.exists():
                return train, test
        expected = "expected train.csv and test.csv (or .tsv) with rows 'label, text'"
        raise invalid("data.root", str(self.root), expected, problem="has no train.csv and test.csv")

    def load(self):
        if self.root is None:
            train = generate_sentences(self.train_size, self.seed)
            val = generate_sentences(self.val_size, self.seed + 1)
        else:
            train_file, test_file = self._files()
            train, val = read_text_csv(train_file), read_text_csv(test_file)
        # The tokenizer learns its vocabulary from the training texts only.
        self.tokenizer = self._train_tokenizer(train[0])
        return self._encode(*train), self._encode(*val), max(train[1]) + 1

    def _train_tokenizer(self, texts):
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.train_from_iterator(
            texts, trainers.WordLevelTrainer(vocab_size=self.vocab_size, special_tokens=["[PAD]", "[UNK]"])
        )
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=self.max_length)
        tokenizer.enable_truncation(self.max_length)
        return tokenizer

    def _encode(self, texts, labels) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([e.ids for e in self.tokenizer.encode_batch(texts)], dtype=torch.long)
        return ids, torch.tensor(labels, dtype=torch.long)

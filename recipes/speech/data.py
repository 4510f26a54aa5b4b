"""Audio for the speech recipe: synthesized keyword-like waveforms (default) or a folder of WAVs per label.

A synthesized "keyword" is three voiced syllables whose pitch contour and vowel (formant-like harmonic
weights) are fixed per class; twelve keywords come in six pairs that differ in one vowel. Every sample varies
the speaker's pitch, the speed, the loudness and the onset, in loud white noise, so the class is in the pattern
over time, not in any single frequency.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from lightning_mp.errors import ConfigError, invalid
from lightning_mp.recipes.common import TensorDataModule, check_root
from lightning_mp.recipes.speech.knobs import DATA

KEYWORDS = 12  # six pairs: the two keywords of a pair differ in one syllable's vowel only


def synthesize_keywords(
    count: int, seed: int, sample_rate: int = 8000, seconds: float = 1.0, snr_db: tuple[float, float] = (0.0, 12.0)
):
    """``count`` waveforms of shape (samples,) and their class labels, deterministic for a seed.

    Twelve keywords in six confusable pairs: the keywords of a pair share their pitch contour and two of their
    three vowels. Every clip varies the speaker's pitch, the speed, the loudness and the onset, and is buried in
    white noise at a signal-to-noise ratio drawn from ``snr_db`` (0 to 12 dB: the noise up to as loud as the
    word). The label is exact (the generator knows it); the difficulty is hearing one vowel through the noise.
    """
    gen = torch.Generator().manual_seed(seed)
    pattern_gen = torch.Generator().manual_seed(1234)  # the keywords themselves never change with the seed
    pairs = KEYWORDS // 2
    contours = (0.75 + 0.6 * torch.rand(pairs, 3, generator=pattern_gen)).repeat_interleave(2, dim=0)
    vowels = torch.softmax(2.5 * torch.randn(pairs, 3, 4, generator=pattern_gen), dim=-1).repeat_interleave(2, dim=0)
    for pair in range(pairs):  # the second keyword of each pair: another vowel in one syllable
        vowels[2 * pair + 1, pair % 3] = torch.softmax(2.5 * torch.randn(4, generator=pattern_gen), dim=-1)
    length = int(sample_rate * seconds)
    t = torch.arange(length) / sample_rate
    labels = torch.randint(KEYWORDS, (count,), generator=gen)
    waves = torch.zeros(count, length)
    for i in range(count):
        c = int(labels[i])
        f0 = 110 + 140 * torch.rand((), generator=gen).item()
        speed = 0.8 + 0.45 * torch.rand((), generator=gen).item()
        start = 0.05 + 0.15 * torch.rand((), generator=gen).item()
        syllable = 0.22 / speed
        for s in range(3):
            on = start + s * syllable
            envelope = torch.exp(-(((t - on - syllable / 2) / (syllable / 3)) ** 2))
            for h in range(4):
                phase = 2 * math.pi * f0 * contours[c, s].item() * (h + 1) * t
                waves[i] += vowels[c, s, h] * envelope * torch.sin(phase)
        word = waves[i] / waves[i].abs().max().clamp_min(1e-6)
        snr = snr_db[0] + (snr_db[1] - snr_db[0]) * torch.rand((), generator=gen).item()
        noise = torch.randn(length, generator=gen) * word.pow(2).mean().sqrt() * 10 ** (-snr / 20)
        gain = 0.3 + 0.7 * torch.rand((), generator=gen).item()
        waves[i] = gain * (word + noise)
    return waves, labels


def _fit_length(wave: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(wave, (0, length - wave.numel())) if wave.numel() < length else wave[:length]


def load_wav_folder(root, sample_rate: int = 8000, seconds: float = 1.0):
    """Speech Commands layout: ``root/<label>/*.wav``. Audio is mixed to mono, resampled linearly to
    ``sample_rate`` and padded or cut to ``seconds``. Files listed in ``root/validation_list.txt`` form the
    validation set; without that list a stable hash of the path puts about 10% there.

    Returns ``(train, val, labels)`` where train and val are (waves, targets).
    """
    import soundfile

    path = check_root(root)
    labels = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    if not labels:
        raise invalid("data.root", str(root), "expected root/<label>/*.wav", problem="has no label folders")
    listed = path / "validation_list.txt"
    validation = set(listed.read_text().split()) if listed.exists() else None
    length = int(sample_rate * seconds)
    splits = {"train": ([], []), "val": ([], [])}
    for index, label in enumerate(labels):
        for file in sorted((path / label).glob("*.wav")):
            relative = f"{label}/{file.name}"
            try:
                audio, rate = soundfile.read(file, dtype="float32", always_2d=True)
            except Exception as error:  # soundfile raises its own LibsndfileError / RuntimeError subclasses
                raise ConfigError(f"{file} is not a readable WAV file ({error}).") from error
            wave = torch.from_numpy(audio).mean(dim=1)
            if rate != sample_rate:
                wave = F.interpolate(wave[None, None], scale_factor=sample_rate / rate, mode="linear")[0, 0]
            in_val = relative in validation if validation is not None else zlib.crc32(relative.encode()) % 10 == 0
            waves, targets = splits["val" if in_val else "train"]
            waves.append(_fit_length(wave, length))
            targets.append(index)
    if not splits["train"][0]:
        problem = "has no .wav files in its label folders"
        raise invalid("data.root", str(root), "expected root/<label>/*.wav", problem=problem)

    def stack(split):
        waves, targets = splits[split]
        if not waves:
            return torch.zeros(0, length), torch.zeros(0, dtype=torch.long)
        return torch.stack(waves), torch.tensor(targets)

    return stack("train"), stack("val"), labels


class SpeechData(TensorDataModule):
    """Synthesized keywords by default; a WAV folder per label when ``root`` is given.

    Args:
        root: Speech Commands style folder, or ``None``.
        num_classes: 12 for the synthesized keywords; the number of label folders otherwise (checked).
        sample_rate: audio is resampled to this rate.
        batch_size: per step.
        train_size: synthesized training clips.
        val_size: synthesized validation clips.
        seed: data seed.
    """

    def __init__(
        self,
        root=None,
        num_classes: int = KEYWORDS,
        sample_rate: int = 8000,
        batch_size: int = 32,
        train_size: int = 1600,
        val_size: int = 300,
        seed: int = 0,
    ):
        DATA.check(locals())  # what each argument accepts: knobs.py
        super().__init__()
        self.root, self.num_classes, self.sample_rate, self.batch_size = root, num_classes, sample_rate, batch_size
        self.train_size, self.val_size, self.seed = train_size, val_size, seed

    def load(self):
        if self.root is None:
            train = synthesize_keywords(self.train_size, self.seed, self.sample_rate)
            return train, synthesize_keywords(self.val_size, self.seed + 1, self.sample_rate), KEYWORDS
        train, val, labels = load_wav_folder(self.root, self.sample_rate)
        return train, val, len(labels)

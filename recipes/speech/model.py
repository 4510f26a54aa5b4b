"""Log-mel front end (torch.stft, the fp16-fragile part) and a small CNN keyword classifier."""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_mp.recipes.speech.knobs import NET


def mel_filterbank(
    n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """Triangular HTK-mel filters, shape (n_freqs, n_mels); the same formula as torchaudio's melscale_fbanks."""
    f_max = f_max or sample_rate / 2

    def to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    m_pts = torch.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2)
    f_pts = 700.0 * (10 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.min(down, up), min=0.0)


class LogMel(nn.Module):
    """Waveform (batch, samples) -> log-mel spectrogram (batch, 1, n_mels, frames).

    The power spectrum of a loud clip exceeds fp16's range inside the mel projection: under fp16 autocast
    this module overflows, which is exactly what AdaptiveMP's forward attribution and fp32 fallback are for.
    """

    def __init__(self, sample_rate: int = 8000, n_fft: int = 256, hop_length: int = 128, n_mels: int = 40):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("filters", mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave, self.n_fft, self.hop_length, window=self.window.to(wave.dtype), return_complex=True)
        power = spec.abs() ** 2  # (batch, freqs, frames)
        mel = torch.matmul(power.transpose(1, 2), self.filters).transpose(1, 2)
        return torch.log(mel + 1e-6).unsqueeze(1)


class KeywordCNN(nn.Module):
    """LogMel -> instance-normalised features -> three conv blocks -> pooling -> linear."""

    def __init__(self, num_classes: int, sample_rate: int = 8000, n_mels: int = 40, width: int = 32):
        NET.check(locals())  # what each argument accepts: knobs.py
        super().__init__()
        self.frontend = LogMel(sample_rate, n_mels=n_mels)
        self.norm = nn.BatchNorm2d(1)

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, width), block(width, width), block(width, 2 * width))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.frontend(wave))
        return self.head(self.features(x).mean(dim=(2, 3)))

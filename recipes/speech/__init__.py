"""Speech recipe: log-mel features computed in the model with torch.stft, feeding a small CNN."""

from lightning_mp.recipes.speech.data import SpeechData, load_wav_folder, synthesize_keywords
from lightning_mp.recipes.speech.model import KeywordCNN, LogMel

__all__ = ["KeywordCNN", "LogMel", "SpeechData", "load_wav_folder", "synthesize_keywords"]

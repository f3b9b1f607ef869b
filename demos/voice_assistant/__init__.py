"""Voice assistant demo: microphone or WAV → streaming speech-to-text → edgellm → text and speech.

Layers, each small: audio (AudioChunk sources), stt (SpeechToText: Vosk, pocketsphinx fallback),
intents (smart-home commands without the LLM), prefill (user words into the KV cache while they
speak), speech (clause-by-clause text-to-speech), assistant (the loop and its latency report), cli.
"""

from .errors import (AudioDeviceError, AudioFormatError, DownloadError, EmptyAudioError, SttModelError, VoiceError,
                     VoiceModelError)
from .types import AudioChunk, Transcript, Word

__all__ = [
    "AudioChunk", "Transcript", "Word",
    "VoiceError", "AudioFormatError", "EmptyAudioError", "SttModelError", "AudioDeviceError", "DownloadError",
    "VoiceModelError",
]

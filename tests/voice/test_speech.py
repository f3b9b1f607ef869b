"""Speech out: clause splitting for streamed text, espeak-ng synthesis, the speaking thread and WAV sink."""

from __future__ import annotations

import threading
import time
import wave

import pytest

from demos.voice_assistant.speech import ClauseSplitter, EspeakSpeaker, SpeechOutput


def _split(pieces: list[str]) -> list[str]:
    splitter, out = ClauseSplitter(), []
    for piece in pieces:
        out.extend(splitter.feed(piece))
    rest = splitter.flush()
    return out + ([rest] if rest else [])


def test_clauses_are_flushed_as_soon_as_they_end():
    splitter = ClauseSplitter()
    assert splitter.feed("The capital") == []
    assert splitter.feed(" of France is Paris") == []
    assert splitter.feed(".") == ["The capital of France is Paris."]  # sentence end at the end of the stream so far
    assert splitter.feed(" It is") == []
    assert splitter.flush() == "It is"


@pytest.mark.parametrize("pieces, clauses", [
    (["Hi", ",", " there. ", "Bye", "!"], ["Hi, there.", "Bye!"]),  # short comma clause is kept together
    (["When the sun goes down, the", " sky turns red."], ["When the sun goes down,", "the sky turns red."]),
    (["It is 3", ".", "5 km away."], ["It is 3.5 km away."]),  # a digit before the dot waits
    (["One; two: three\nfour"], ["One;", "two:", "three", "four"]),
    (["  "], []),
])
def test_clause_boundaries(pieces, clauses):
    assert _split(pieces) == clauses


def test_espeak_synthesizes_a_clause():
    audio = EspeakSpeaker().synthesize("The capital of France is Paris.")
    assert audio.rate > 8000 and audio.channels == 1 and audio.width == 2
    assert 0.8 < audio.seconds < 5.0
    assert max(audio.audio) > 0


def test_speech_output_speaks_in_order_to_a_wav_file(tmp_path):
    out = SpeechOutput(EspeakSpeaker(), wav_path=tmp_path / "reply.wav", play=False)
    starts: list[tuple[str, float]] = []
    queued = time.perf_counter()
    for text in ("One moment.", "The capital of France is Paris."):
        out.say(text, lambda at, text=text: starts.append((text, at)))
    out.wait()
    out.close()
    assert [text for text, _ in starts] == ["One moment.", "The capital of France is Paris."]
    assert queued < starts[0][1] < starts[1][1]
    with wave.open(str(tmp_path / "reply.wav")) as wav:
        seconds = wav.getnframes() / wav.getframerate()
    assert 1.5 < seconds < 8.0


def test_speech_output_reports_a_failing_speaker_on_the_next_say():
    class Broken:
        name = "broken"

        def synthesize(self, text):
            raise RuntimeError("no voice")

    out = SpeechOutput(Broken(), play=False)
    out.say("hello")
    out.wait()
    with pytest.raises(Exception, match="speech output stopped"):
        out.say("again")
    out.close()
    assert not any(t.name == "speech-out" and t.is_alive() for t in threading.enumerate())

"""Speech out: clause splitting for streamed text, espeak-ng synthesis, the speaking thread and WAV sink."""

from __future__ import annotations

import threading
import time
import wave

import pytest

from demos.voice_assistant.speech import ClauseSplitter, EspeakSpeaker, SpeechOutput


def _split(pieces: list[str], first_words: int = 0) -> list[str]:
    splitter, out = ClauseSplitter(first_words), []
    for piece in pieces:
        out.extend(splitter.feed(piece))
    rest = splitter.flush()
    return out + ([rest] if rest else [])


def test_clauses_are_flushed_as_soon_as_they_end():
    splitter = ClauseSplitter(first_words=0)
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


def test_the_first_words_are_spoken_before_the_first_clause_ends():
    tokens = ["The", " capital", " of", " France", " is", " Paris", ".", " It", " is", " big", "."]
    splitter, pieces = ClauseSplitter(first_words=3), []
    for i, token in enumerate(tokens):
        got = splitter.feed(token)
        pieces.extend((i, piece) for piece in got)
    assert pieces == [(3, "The capital of"), (6, "France is Paris."), (10, "It is big.")]  # "of" is whole at " France"
    assert _split(["Yes", ".", " It", " is", " Paris", "."], 3) == ["Yes.", "It is Paris."]  # a clause came first
    whole = ClauseSplitter(first_words=0)
    assert [c for t in tokens for c in whole.feed(t)] == ["The capital of France is Paris.", "It is big."]


def test_libespeak_in_process_gives_the_commands_audio_much_sooner():
    from demos.voice_assistant.espeak import EspeakLibrarySpeaker

    lib, command = EspeakLibrarySpeaker(), EspeakSpeaker()
    text = "The capital of France is Paris."
    ours, theirs = lib.synthesize(text), command.synthesize(text)
    assert ours.rate == theirs.rate and abs(ours.seconds - theirs.seconds) < 0.05  # same voice, same speed
    took = []
    for speaker in (lib, command):
        started = time.perf_counter()
        speaker.synthesize(text)
        took.append(time.perf_counter() - started)
    print(f"synthesis: in-process {took[0] * 1000:.1f} ms, command {took[1] * 1000:.1f} ms")
    assert took[0] < took[1]  # no process start, no voice load per clause
    pieces = []
    assert lib.stream("This sentence is cut after two buffers of audio.", lambda p: pieces.append(p) or len(pieces) < 2) \
        is False
    assert len(pieces) == 2  # a sink can stop synthesis between two buffers


def test_stop_cuts_the_clause_being_played_at_once(tmp_path):
    from demos.voice_assistant.espeak import EspeakLibrarySpeaker

    out = SpeechOutput(EspeakLibrarySpeaker(), wav_path=tmp_path / "cut.wav", play=False, realtime=True)
    started = threading.Event()
    out.say("This is a long sentence that takes a few seconds to say out loud.", lambda at: started.set())
    out.say("And this one is never said.")
    assert started.wait(5)
    time.sleep(0.3)
    asked = time.perf_counter()
    assert out.stop(wait=1.0)  # idle: nothing of the reply is written any more
    stopped_ms = (time.perf_counter() - asked) * 1000
    assert stopped_ms < 50, stopped_ms  # the paced writer is woken, not left to sleep out its slice
    out.wait()
    out.close()
    with wave.open(str(tmp_path / "cut.wav")) as wav:
        assert wav.getnframes() / wav.getframerate() < 1.0


@pytest.mark.parametrize("speaker", ["command", "library"])
def test_a_clause_that_starts_with_a_dash_is_spoken_not_read_as_an_option(speaker):
    from demos.voice_assistant.espeak import EspeakLibrarySpeaker

    voice = EspeakSpeaker() if speaker == "command" else EspeakLibrarySpeaker()
    assert voice.synthesize("- Paris is the capital.").seconds > 0.5
    assert voice.synthesize("  ").seconds == 0.0

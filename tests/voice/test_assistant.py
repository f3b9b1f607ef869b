"""The whole loop on real parts: recording → pocketsphinx → commands or the default model → report."""

from __future__ import annotations

import json
import subprocess
import sys
import wave

import numpy as np
import pytest

from demos.voice_assistant.assistant import AssistantConfig, VoiceAssistant
from demos.voice_assistant.audio import WavSource
from demos.voice_assistant.intents import CommandRecognizer
from demos.voice_assistant.speech import EspeakSpeaker, SpeechOutput

from .helpers import FIXTURES, REPO, SAMPLE, write_wav


@pytest.fixture(scope="module")
def commands():
    return CommandRecognizer()


def _answer(sphinx, llm, commands=None, path=SAMPLE, fast=True, **config):
    shown: list[str] = []
    assistant = VoiceAssistant(sphinx, llm, commands, config=AssistantConfig(max_new_tokens=24, **config),
                               on_text=shown.append)
    reports = list(assistant.run(WavSource(path, fast=fast, tail_silence=1.0, chunk_ms=32).chunks()))
    return reports, "".join(shown)


def test_question_is_answered_by_the_llm_with_a_latency_report(sphinx, llm, commands):
    (report,), shown = _answer(sphinx, llm, commands, fast=False)  # real time: prefill keeps pace with speech
    assert report.transcript == "What is the capital of france"
    assert report.route == "llm" and report.intent is None and report.recognizer == "pocketsphinx"
    assert "Paris" in report.reply and report.reply in shown
    lat = report.latency_ms
    assert 0 < lat.end_of_turn <= lat.recognizer_final <= lat.first_token <= lat.first_audio <= lat.reply_done
    assert lat.final_to_first_token == pytest.approx(lat.first_token - lat.recognizer_final, abs=0.2)
    assert report.incremental and report.prefills >= 1
    assert report.cached_tokens >= report.prompt_tokens - 6  # only the tail and the assistant header were left
    assert json.loads(json.dumps(report.to_dict()))["latency_ms"]["first_token"] == lat.first_token


def test_without_incremental_prefill_the_words_are_not_cached_but_the_reply_is_the_same(sphinx, llm):
    (inc,), _ = _answer(sphinx, llm)
    (plain,), _ = _answer(sphinx, llm, incremental=False)
    assert not plain.incremental and plain.prefills == 0
    assert plain.reply == inc.reply
    assert plain.cached_tokens < inc.cached_tokens - 5


def test_missed_budget_says_the_holding_phrase_first(sphinx, llm, tmp_path):
    speech = SpeechOutput(EspeakSpeaker(), wav_path=tmp_path / "out.wav", play=False)
    assistant = VoiceAssistant(sphinx, llm, None, speech, AssistantConfig(max_new_tokens=12, budget_ms=0.001,
                                                                             speculative=False))
    (report,) = list(assistant.run(WavSource(SAMPLE, fast=True, tail_silence=1.0).chunks()))
    speech.wait()
    speech.close()
    assert report.holding_phrase == "One moment."
    assert report.latency_ms.first_audio is not None
    with wave.open(str(tmp_path / "out.wav")) as wav:
        assert wav.getnframes() / wav.getframerate() > 1.0  # holding phrase + reply were both spoken


def test_within_budget_no_holding_phrase(sphinx, llm):
    (report,), shown = _answer(sphinx, llm, budget_ms=10_000)
    assert report.holding_phrase is None and "One moment" not in shown


def test_commands_skip_the_llm(sphinx, llm, commands):
    # real time, as a microphone delivers audio (--fast would starve the reply thread of the GIL)
    (report,), _ = _answer(sphinx, llm, commands, path=FIXTURES / "en_what_time.wav", fast=False)
    assert report.route == "command" and report.intent == "HassGetCurrentTime"
    assert report.reply.startswith("It is ") and report.cached_tokens is None
    assert report.latency_ms.final_to_first_token < 300  # no model call on this path (loose: CI may be loaded)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "demos.voice_assistant", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_json_prints_transcript_reply_and_breakdown(default_model_dir):
    done = _cli("--wav", str(SAMPLE), "--json", "--fast", "--model", str(default_model_dir), "--max-tokens", "24")
    assert done.returncode == 0, done.stderr
    assert "pocketsphinx" in done.stderr  # the fallback is announced on screen, outside the JSON
    (line,) = done.stdout.strip().splitlines()
    report = json.loads(line)
    assert report["transcript"] == "What is the capital of france" and "Paris" in report["reply"]
    assert set(report["latency_ms"]) == {"end_of_turn", "recognizer_final", "first_token", "first_audio",
                                         "reply_done", "final_to_first_token"}
    assert report["endpointing"] == "smart" and report["end_reason"] in ("complete", "complete_both") and not report["speculative"]


def test_cli_white_noise_gets_no_reply_and_says_why(default_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    noise = write_wav(tmp_path / "noise.wav", np.clip(rng.normal(0, 0.3, 16000 * 10), -1, 1), 16000)
    done = _cli("--wav", str(noise), "--json", "--fast", "--model", str(default_model_dir), "--max-tokens", "24")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""  # no transcript, no reply: the VAD heard no utterance
    assert f"no speech heard in {noise}" in done.stderr and "Fix:" in done.stderr


def test_cli_compare_reports_medians_for_both_modes(default_model_dir):
    done = _cli("--wav", str(SAMPLE), "--json", "--fast", "--model", str(default_model_dir), "--max-tokens", "8",
                "--runs", "2", "--compare")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary) == {"recognizer_endpointer", "fixed_silence", "smart_no_incremental", "smart_turn_only",
                            "smart", "smart_speculative", "smart_clause_speech", "loadavg"}
    for name, mode in summary.items():
        if name != "loadavg":
            assert mode["replies"] == 2 and mode["median_ms"]["first_token"] > 0, name
            assert mode["p90_ms"]["first_token"] >= mode["median_ms"]["first_token"]
    assert summary["smart"]["median_cached_tokens"] > summary["smart_no_incremental"]["median_cached_tokens"]
    assert summary["smart_speculative"]["speculative"] == 2 and summary["smart"]["speculative"] == 0
    # fixed 0.7 s silence vs Smart Turn's 0.2 s after a complete question (audio time: --fast compresses wall time)
    silence = {name: [t["silence_ms"] for t in summary[name]["turns"]] for name in ("smart", "fixed_silence")}
    assert max(silence["smart"]) <= 232 and min(silence["fixed_silence"]) >= 700
    assert {t["end_reason"] for t in summary["smart_turn_only"]["turns"]} == {"complete"}
    assert all(t["text_probability"] is None for t in summary["smart_turn_only"]["turns"])


@pytest.mark.parametrize("args, message", [
    (["--wav", "missing.wav"], "does not exist"),
    (["--wav", str(FIXTURES / "README.md")], "not a readable PCM WAV"),
    (["--wav", str(SAMPLE), "--model", "/nonexistent"], "no converted model"),
    (["--wav", str(SAMPLE), "--vosk-model", str(FIXTURES)], "not a Vosk model folder"),
])
def test_cli_bad_input_is_one_line(args, message):
    done = _cli(*args)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert message in error


def test_vosk_partials_feed_the_cache_in_the_loop(ko_recognizer, llm):
    """Vosk in the loop: its partials drive incremental prefill and its word times the latency origin."""
    assistant = VoiceAssistant(ko_recognizer, llm, None, config=AssistantConfig(max_new_tokens=4))
    source = WavSource(FIXTURES / "ko_weather.wav", tail_silence=1.5)  # real time: prefill runs beside the audio
    (report,) = list(assistant.run(source.chunks()))
    assert report.transcript == "오늘 날씨 어때" and report.recognizer == "vosk"
    assert report.prefills >= 2
    assert report.cached_tokens >= report.prompt_tokens - 6
    assert 0 <= report.latency_ms.recognizer_final <= report.latency_ms.first_token


def test_cli_with_a_vosk_model_and_grammar(default_model_dir, ko_model_dir):
    from .helpers import KO_GRAMMAR

    grammar = [arg for phrase in KO_GRAMMAR for arg in ("--grammar", phrase)]
    done = _cli("--wav", str(FIXTURES / "ko_time.wav"), "--json", "--fast", "--model", str(default_model_dir),
                "--max-tokens", "4", "--vosk-model", str(ko_model_dir), "--no-commands", *grammar)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["transcript"] == "지금 몇 시 야" and report["recognizer"] == "vosk"
    assert "Vosk model" in done.stderr


def test_a_speaker_who_never_stops_gets_answers_at_the_maximum_turn_length(sphinx, llm, tmp_path):
    """30 s of speech without a pause: the loop closes a turn every max_turn seconds, answers it, and returns."""
    import time

    import numpy as np

    from demos.voice_assistant.audio import read_wav
    from demos.voice_assistant.turn import TurnConfig

    from .helpers import write_wav

    words = np.frombuffer(read_wav(SAMPLE).audio, dtype="<i2")[int(0.3 * 16000):int(1.85 * 16000)]
    speech = np.tile(words, int(30 / (len(words) / 16000)) + 1)[:30 * 16000].astype(np.float32) / 32768
    path = write_wav(tmp_path / "talker.wav", speech, 16000)
    assistant = VoiceAssistant(sphinx, llm, None, config=AssistantConfig(
        max_new_tokens=4, speculative=False, turn=TurnConfig(max_turn=10.0)))
    started = time.perf_counter()
    reports = list(assistant.run(WavSource(path, fast=True, chunk_ms=32).chunks()))
    assert time.perf_counter() - started < 240
    assert [r.end_reason for r in reports] == ["max_length", "max_length", "end_of_audio"]
    assert all(r.route == "llm" and r.transcript for r in reports)
    # the speaker goes on after each cut, which barges in on the reply to the cut turn; the last one is answered
    assert [r.interrupted for r in reports] == [True, True, False] and reports[-1].reply
    assert all(r.end_at_s - r.silence_ms / 1000 <= 10.1 * (i + 1) for i, r in enumerate(reports[:2])), reports

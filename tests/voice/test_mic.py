"""The microphone path on a machine without a sound card: ALSA's file plugin as the capture device.

HOME must point at the .asoundrc before PortAudio starts, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from demos.voice_assistant.audio import alsa_file_home, read_wav

from .helpers import FIXTURES, REPO

LISTEN = """
import json
from demos.voice_assistant.audio import MicrophoneSource
from demos.voice_assistant.stt_sphinx import PocketSphinxRecognizer
from demos.voice_assistant.errors import AudioDeviceError
try:
    mic = MicrophoneSource(max_seconds=20)
except AudioDeviceError as exc:
    print(json.dumps({"error": str(exc)}))
    raise SystemExit(0)
recognizer = PocketSphinxRecognizer()
for chunk in mic.chunks():
    heard = recognizer.accept(chunk)
    if heard is not None and heard.is_final and heard.text:
        print(json.dumps({"text": heard.text, "rate": chunk.rate, "channels": chunk.channels}))
        break
"""


def _run(home, code: str = LISTEN, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *(args or ("-c", code))], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_microphone_through_alsa_file_plugin_is_recognized(tmp_path):
    raw = tmp_path / "speech.raw"
    raw.write_bytes(read_wav(FIXTURES / "en_what_time.wav").audio)
    done = _run(alsa_file_home(raw, tmp_path / "home"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"text": "what time is it", "rate": 16000, "channels": 1}


def test_no_capture_device_is_one_clear_error_suggesting_wav(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".asoundrc").write_text("pcm.!default { type hw card 97 }\n")  # a card that does not exist
    done = _run(home)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "no microphone" in result["error"] and "--wav" in result["error"]


def test_cli_without_a_device_exits_with_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".asoundrc").write_text("pcm.!default { type hw card 97 }\n")
    done = _run(home, args=("-m", "demos.voice_assistant", "--model", str(tmp_path)))
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--wav" in errors[0]
    assert "Traceback" not in done.stderr

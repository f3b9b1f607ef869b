"""The intent model on the real default model: hassil first, then a reading that always fits the schema."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest

from demos.voice_assistant.assistant import VoiceAssistant
from demos.voice_assistant.intent_model import LABELS, SUPPORTED_INTENTS, IntentModel, intent_schema
from demos.voice_assistant.intents import CommandRecognizer
from demos.voice_assistant.types import Transcript

from .helpers import REPO

SET = REPO / "demos" / "voice_assistant" / "data" / "intent_paraphrases.jsonl"


@pytest.fixture(scope="module")
def commands():
    return CommandRecognizer()


@pytest.fixture(scope="module")
def intent_model(llm, commands):
    return IntentModel(llm, commands)


def test_every_reading_fits_the_schema(intent_model):
    schema = intent_schema()
    rows = [json.loads(line) for line in SET.read_text().splitlines()][::6]  # 13 lines across every intent
    for row in rows:
        reading = intent_model.read(row["text"])
        jsonschema.validate(json.loads(reading.raw), schema)
        assert reading.intent in LABELS.values() and reading.ms > 0


def test_the_schema_allows_only_the_supported_intents():
    schema = intent_schema()
    jsonschema.validate({"intent": "set_brightness", "area": "kitchen", "brightness": 40}, schema)
    for bad in ({"intent": "set_brightness", "area": "garage", "brightness": 40},
                {"intent": "set_brightness", "area": "kitchen"}, {"intent": "HassTurnOn"},
                {"intent": "none", "area": "kitchen"}, {"intent": "set_volume", "volume_level": 140}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert set(SUPPORTED_INTENTS) >= {i for i in LABELS.values() if i}


def test_hassil_first_then_the_model_then_the_free_answer(sphinx, llm, commands, intent_model):
    shown: list[str] = []
    assistant = VoiceAssistant(sphinx, llm, commands, intent_model=intent_model, on_text=shown.append)
    hassil = assistant.respond(Transcript("what time is it", True), 0.0)
    assert hassil.route == "command" and hassil.intent == "HassGetCurrentTime"
    model = assistant.respond(Transcript("dim the kitchen lights to forty percent", True), 0.0)
    assert model.route == "model-command" and model.intent == "HassLightSet"
    assert model.reply.startswith("Setting the") and model.reply.endswith("to 40%.") and model.reply in "".join(shown)
    free = assistant.respond(Transcript("why is the sky blue", True), 0.0)
    assert free.route == "llm" and free.intent is None and free.reply


def test_score_intents_scores_any_jsonl(default_model_dir, tmp_path):
    lines = [{"text": "what time is it", "intent": "HassGetCurrentTime", "slots": {}},
             {"text": "dim the kitchen lights to forty percent", "intent": "HassLightSet",
              "slots": {"area": "kitchen", "brightness": 40}},
             {"text": "why is the sky blue", "intent": None, "slots": {}}]
    data = tmp_path / "set.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "scores.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "score_intents.py"), str(data), "--model",
                           str(default_model_dir), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    assert summary["lines"] == 3 and summary["hassil_matched"] == 1
    assert summary["hassil_alone"]["intent_accuracy"] == pytest.approx(2 / 3)  # time (hassil) + sky (not a command)
    assert summary["model_outputs_parsed"] == summary["model_outputs"] == 2
    assert doc["machine"]["cpu_model"] and len(doc["samples"]) == 3

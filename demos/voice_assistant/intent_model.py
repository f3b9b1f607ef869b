"""Commands hassil's templates miss, read by the model under a JSON schema (constrained decoding).

hassil stays first: it is instant and exact on the phrasings Home Assistant lists. When it finds nothing,
the model is asked for one JSON object whose schema allows exactly the intents this demo supports (with
their slots: areas and devices of the demo's home, numbers in range) plus an explicit "none" (not a
command: the free answer takes over). The model cannot answer anything else, so no reply is ever
almost-JSON; what it can still get wrong is which intent, and that is what scripts/score_intents.py
measures.

The schema shown to the model uses plain labels ("turn_on", "set_brightness", ...) a 135M model reads
more easily than Home Assistant's names; they map 1:1 to HA intents (LABELS).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .intents import DEFAULT_AREAS, DEFAULT_DEVICES, CommandMatch, CommandRecognizer

logger = logging.getLogger(__name__)

# model label → Home Assistant intent (None: not a command)
LABELS: dict[str, str | None] = {
    "turn_on": "HassTurnOn", "turn_off": "HassTurnOff", "set_brightness": "HassLightSet",
    "start_timer": "HassStartTimer", "cancel_timer": "HassCancelTimer", "weather": "HassGetWeather",
    "time": "HassGetCurrentTime", "date": "HassGetCurrentDate", "pause_media": "HassMediaPause",
    "resume_media": "HassMediaUnpause", "next_track": "HassMediaNext", "previous_track": "HassMediaPrevious",
    "set_volume": "HassSetVolume", "none": None,
}
SUPPORTED_INTENTS = tuple(i for i in LABELS.values() if i) + ("HassNevermind",)
PERCENT = {"type": "integer", "minimum": 0, "maximum": 100}
DOMAINS = ("light", "fan", "switch", "media_player")

SYSTEM_PROMPT = """You turn a smart-home request into JSON. Pick the intent:
turn_on, turn_off: switch lights or a device on/off (area = room, name = device, domain = light for lights)
set_brightness: set lights to a brightness percent
start_timer, cancel_timer: a timer or countdown (hours, minutes, seconds)
weather, time, date: questions about them
pause_media, resume_media, next_track, previous_track, set_volume: music, tv and volume
none: anything else (questions, chat): not a command
Rooms: {areas}. Devices: {devices}. Write numbers as digits."""
EXAMPLES = (  # one per label, none of them from the scored set
    ("switch the office lamp on", {"intent": "turn_on", "name": "lamp"}),
    ("lights off in the bathroom", {"intent": "turn_off", "area": "bathroom", "domain": "light"}),
    ("bedroom lights at sixty percent", {"intent": "set_brightness", "area": "bedroom", "brightness": 60}),
    ("wake me in eight minutes", {"intent": "start_timer", "minutes": 8}),
    ("never mind the timer", {"intent": "cancel_timer"}),
    ("will it snow tomorrow", {"intent": "weather"}),
    ("what time do we have", {"intent": "time"}),
    ("what's today's date", {"intent": "date"}),
    ("stop the music for now", {"intent": "pause_media"}),
    ("unpause the show", {"intent": "resume_media"}),
    ("play the next song", {"intent": "next_track"}),
    ("back to the last track", {"intent": "previous_track"}),
    ("set the volume to forty", {"intent": "set_volume", "volume_level": 40}),
    ("what is a black hole", {"intent": "none"}),
)


def intent_schema(areas: Sequence[str] = DEFAULT_AREAS,
                  devices: Sequence[tuple[str, str]] = DEFAULT_DEVICES) -> dict[str, Any]:
    """One JSON object per reply: {"intent": label, ...that intent's slots}; nothing else parses."""
    target = {"area": {"enum": list(areas)}, "name": {"enum": [name for name, _ in devices]}}
    slots: dict[str, tuple[dict[str, Any], list[str]]] = {  # label → (slot schemas, required)
        "turn_on": ({**target, "domain": {"enum": list(DOMAINS)}}, []),
        "turn_off": ({**target, "domain": {"enum": list(DOMAINS)}}, []),
        "set_brightness": ({**target, "brightness": PERCENT}, ["brightness"]),
        "start_timer": ({"hours": {"type": "integer", "minimum": 1, "maximum": 24},
                         "minutes": {"type": "integer", "minimum": 1, "maximum": 999},
                         "seconds": {"type": "integer", "minimum": 1, "maximum": 999}}, []),
        "set_volume": ({"volume_level": PERCENT}, ["volume_level"]),
    }
    branches = []
    for label in LABELS:
        props, required = slots.get(label, ({}, []))
        branches.append({"type": "object", "additionalProperties": False, "required": ["intent", *required],
                         "properties": {"intent": {"const": label}, **props}})
    return {"anyOf": branches}


@dataclass(frozen=True)
class IntentReading:
    """What the model read: the HA intent (None = not a command), its slots, the raw JSON and the time."""

    intent: str | None
    slots: dict[str, Any] = field(default_factory=dict)
    raw: str = ""
    ms: float = 0.0


class IntentModel:
    """Ask the LLM for an intent under intent_schema(); greedy, a few dozen tokens, prompt prefix cached."""

    def __init__(self, llm: Any, recognizer: CommandRecognizer | None = None,
                 areas: Sequence[str] = DEFAULT_AREAS, devices: Sequence[tuple[str, str]] = DEFAULT_DEVICES,
                 max_new_tokens: int = 48) -> None:
        import edgellm

        self.llm = llm
        self.recognizer = recognizer
        self.schema = intent_schema(areas, devices)
        self.params = edgellm.SamplingParams(json_schema=self.schema, temperature=0.0, max_new_tokens=max_new_tokens)
        system = SYSTEM_PROMPT.format(areas=", ".join(areas), devices=", ".join(name for name, _ in devices))
        self._prefix: list[dict[str, str]] = [{"role": "system", "content": system}]
        for text, answer in EXAMPLES:
            self._prefix += [{"role": "user", "content": text}, {"role": "assistant", "content": json.dumps(answer)}]
        llm.grammars.compile("json_schema", json.dumps(self.schema))  # compile once, at start-up

    def read(self, text: str) -> IntentReading:
        started = time.perf_counter()
        result = self.llm.generate(self._prefix + [{"role": "user", "content": text}], self.params)
        ms = (time.perf_counter() - started) * 1000
        if result.finish_reason != "stop":  # cut off: the budget is far above any valid answer's length
            logger.warning("intent model stopped with %s on %r: %r", result.finish_reason, text, result.text)
            return IntentReading(None, {}, result.text, ms)
        answer = json.loads(result.text)
        label = answer.pop("intent")
        return IntentReading(LABELS[label], answer, result.text, ms)

    def match(self, text: str) -> CommandMatch | None:
        """A command the model found (with the reply hassil's path would give), or None: answer freely."""
        reading = self.read(text)
        logger.info("intent model: %r → %s %s (%.0f ms)", text, reading.intent, reading.slots, reading.ms)
        if reading.intent is None:
            return None
        return CommandMatch(reading.intent, reading.slots, self.reply(reading.intent, reading.slots))

    def reply(self, intent: str, slots: dict[str, Any]) -> str:
        place = slots.get("name") or slots.get("area")
        if intent == "HassLightSet":
            return f"Setting the {place or 'lights'}{' lights' if 'area' in slots and 'name' not in slots else ''} " \
                   f"to {slots['brightness']}%."
        if intent == "HassSetVolume":
            return f"Volume {slots['volume_level']}%."
        if intent == "HassGetWeather":
            return "No weather service is connected to this demo."
        media = {"HassMediaPause": "Paused.", "HassMediaUnpause": "Resuming.", "HassMediaNext": "Next track.",
                 "HassMediaPrevious": "Previous track."}
        if intent in media:
            return media[intent]
        if self.recognizer is not None:
            return self.recognizer._reply(intent, slots)  # the same words hassil's path says
        return "Okay."

"""Smart-home commands answered without the LLM (hassil + Home Assistant's English sentence templates).

A command like "turn on the kitchen lights" needs an action and a fixed reply, not 50 generated tokens:
matching it takes about a millisecond, and a 135M model would only get it wrong.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgellm.errors import MissingDependencyError

from .errors import VoiceError

logger = logging.getLogger(__name__)

# The device's "home": what the demo pretends to control. Names carry the domain hassil's rules check.
DEFAULT_AREAS = ("kitchen", "living room", "bedroom", "bathroom", "office")
DEFAULT_DEVICES = (("lamp", "light"), ("ceiling light", "light"), ("fan", "fan"), ("coffee maker", "switch"),
                   ("tv", "media_player"))
DEFAULT_FLOORS = ("upstairs", "downstairs")
DOMAINS = ("light", "fan", "switch", "media_player", "cover", "lock", "climate", "scene", "script")
INTENTS = ("HassTurnOn", "HassTurnOff", "HassStartTimer", "HassCancelTimer", "HassGetCurrentTime",
           "HassGetCurrentDate", "HassNevermind")


@dataclass(frozen=True)
class CommandMatch:
    """A recognized command: the intent, its slot values (area, name, minutes, ...) and the spoken reply."""

    intent: str
    slots: dict[str, object] = field(default_factory=dict)
    reply: str = ""


class CommandRecognizer:
    """Match a transcript against a few Home Assistant intents; None means "ask the LLM"."""

    def __init__(self, areas: Sequence[str] = DEFAULT_AREAS,
                 devices: Sequence[tuple[str, str]] = DEFAULT_DEVICES, floors: Sequence[str] = DEFAULT_FLOORS,
                 language: str = "en", clock: Callable[[], dt.datetime] = dt.datetime.now,
                 intents: Sequence[str] = INTENTS) -> None:
        self.areas, self.devices, self.floors = check_home(areas, devices, floors)
        self._intents = load_intents(language, intents)
        self._lists = slot_lists(self.areas, self.devices, self.floors)
        self._clock = clock
        self.match("what time is it")  # the first match builds hassil's caches (~0.1 s); pay it at start-up

    def match(self, text: str) -> CommandMatch | None:
        from hassil import recognize
        from hassil.errors import HassilError

        try:
            result = recognize(text, self._intents, slot_lists=self._lists)
        except HassilError as exc:  # a template needing a list we do not have: not a command we handle
            logger.debug("hassil could not match %r: %s", text, exc)
            return None
        if result is None:
            return None
        slots = {name: entity.value for name, entity in result.entities.items()}
        return CommandMatch(result.intent.name, slots, self._reply(result.intent.name, slots))

    def _reply(self, intent: str, slots: dict[str, object]) -> str:
        if intent in ("HassTurnOn", "HassTurnOff"):
            action = "on" if intent == "HassTurnOn" else "off"
            if "name" in slots:
                target = f"the {slots['name']}"
            else:
                domain = str(slots.get("domain", ""))
                what = {"light": "lights", "fan": "fans", "cover": "covers"}.get(domain, "devices")
                place = slots.get("area") or slots.get("floor")
                target = f"the {place} {what}" if place else f"all the {what}"
            return f"Turning {action} {target}."
        if intent == "HassStartTimer":
            parts = [f"{_number(slots[unit])} {unit if _number(slots[unit]) != '1' else unit[:-1]}"
                     for unit in ("hours", "minutes", "seconds") if unit in slots]
            return f"Timer set for {' and '.join(parts) or 'you'}."
        if intent == "HassCancelTimer":
            return "Timer cancelled."
        now = self._clock()
        if intent == "HassGetCurrentTime":
            return f"It is {now.strftime('%I:%M %p').lstrip('0')}."
        if intent == "HassGetCurrentDate":
            return f"Today is {now.strftime('%A, %B')} {now.day}."
        return "Okay."


def check_home(areas: Sequence[str], devices: Sequence[tuple[str, str]],
               floors: Sequence[str]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], tuple[str, ...]]:
    """The configured home, lower-cased and checked: one clear error for a name hassil or a recognizer
    could not use (empty, punctuation, digits, a domain hassil does not know)."""
    def name(kind: str, value: object) -> str:
        text = " ".join(str(value).lower().split()) if isinstance(value, str) else ""
        if not re.fullmatch(r"[a-z][a-z' ]*", text):
            raise VoiceError(f"{kind} name {value!r} cannot be spoken as a command: names must be words (letters, "
                             "spaces, apostrophes). Fix: spell numbers and symbols out, e.g. 'tv two' for 'TV 2'.")
        return text
    checked = []
    for device in devices:
        if not (isinstance(device, (tuple, list)) and len(device) == 2 and device[1] in DOMAINS):
            raise VoiceError(f"device {device!r} is not a (name, domain) pair with a domain of {', '.join(DOMAINS)}. "
                             "Fix: write it as ('desk lamp', 'light').")
        checked.append((name("device", device[0]), device[1]))
    return tuple(name("area", a) for a in areas), tuple(checked), tuple(name("floor", f) for f in floors)


def load_intents(language: str = "en", intents: Sequence[str] = INTENTS) -> Any:
    """Home Assistant's sentence templates for `intents` (a hassil Intents object)."""
    try:
        from hassil import Intents
        from home_assistant_intents import get_intents
    except ImportError as exc:
        raise MissingDependencyError("hassil", "voice", "smart-home command matching") from exc
    data = get_intents(language)
    if data is None:
        raise MissingDependencyError("home-assistant-intents", "voice", f"commands in language {language!r}")
    data["intents"] = {name: spec for name, spec in data["intents"].items() if name in intents}
    return Intents.from_dict(data)


def slot_lists(areas: Sequence[str], devices: Sequence[tuple[str, str]], floors: Sequence[str]) -> dict[str, Any]:
    """hassil slot lists of the home: areas, floors and device names (each carrying its domain)."""
    from hassil import TextSlotList

    return {
        "area": TextSlotList.from_strings(list(areas)),
        "floor": TextSlotList.from_strings(list(floors)),
        "name": TextSlotList.from_tuples([(name, name, {"domain": domain}) for name, domain in devices]),
    }


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)

"""The assistant never says it did something it did not do.

Only the command path acts (and says so: "Turning on the kitchen lights."). A reply from the model path
acts on nothing, so it may not claim an action: issue #11's "The kitchen lights on the kitchen are on."
came after the recognizer misheard a command and the model played along. Every clause of a model reply
passes ClaimGuard before it is shown or spoken; a sentence that claims a device action is replaced by
an honest line and the rest of the reply is dropped.

A claim is recognized two ways, both built from the same intents and the same home as the commands:
- hassil itself: a reply sentence that is a command of our intents ("Turn on the kitchen lights.");
- a sentence that names something the home has (a configured area, floor or device, or what the
  intents act on: lights, fans, timers...) together with an action stated as done or under way
  ("are on", "is now off", "I've turned on", "Turning off", "Timer set").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .intents import DEFAULT_AREAS, DEFAULT_DEVICES, DEFAULT_FLOORS, check_home

HONEST_LINE = "I can't control devices from that request, so nothing was switched or set."
# what the intents act on (HassTurnOn/Off's domains, HassStartTimer/HassCancelTimer)
TARGETS = ("light", "lights", "lamp", "lamps", "lighting", "fan", "fans", "switch", "switches", "timer", "timers",
           "alarm", "tv", "television", "device", "devices", "heater", "heating", "thermostat", "music")
_VERBS = r"turn(?:ed|ing)?|switch(?:ed|ing)?|set(?:ting)?|start(?:ed|ing)?|cancel(?:l?ed|l?ing)?|" \
         r"dim(?:med|ming)?|activat(?:ed|ing)|deactivat(?:ed|ing)|stop(?:ped|ping)?|brighten(?:ed|ing)?|" \
         r"lower(?:ed|ing)?|rais(?:ed|ing)|put|shut(?:ting)?|enabl(?:ed|ing)|disabl(?:ed|ing)"
_STATE = re.compile(r"\b(?:is|are|was|were|'s|'re|has been|have been|been|now)\s+(?:now\s+|all\s+)?"
                    r"(?:turned\s+|switched\s+|been\s+)?(?:on|off|set|started|running|cancell?ed|dimmed|activated|"
                    r"deactivated|stopped|enabled|disabled)\b")
_FIRST_PERSON = re.compile(rf"\b(?:i|i've|i'll|i'm|we've|we'll)\s+(?:have\s+|will\s+|am\s+|just\s+|now\s+|already\s+)*"
                           rf"(?:{_VERBS})\b")
_UNDER_WAY = re.compile(rf"^(?:okay[, ]+|ok[, ]+|sure[, ]+|alright[, ]+|done[.!, ]+)*(?:{_VERBS}|done|"
                        r"lights? (?:on|off)|timer (?:set|started|cancell?ed))\b")
_TIMER = re.compile(r"\btimer\b.{0,20}\b(?:set|started|running|cancell?ed|stopped)\b|"
                    r"\b(?:set|started|cancell?ed)\b.{0,20}\btimer\b")
_PRONOUN = re.compile(rf"\b(?:i|i've|i'll|i'm|we've|we'll)\s+(?:have\s+|will\s+|just\s+|now\s+|already\s+)*"
                      rf"(?:{_VERBS})\s+(?:it|them|that|those|everything|all)\b")  # "I have turned them on"
_SENTENCE_END = re.compile(r"[.!?]\s*$")


@dataclass(frozen=True)
class ClaimGuard:
    """claims(text): whether a reply sentence states a device action. commands: a CommandRecognizer
    (hassil on the sentence); areas/devices/floors: the home, as the commands know it."""

    commands: Any = None
    areas: Sequence[str] = DEFAULT_AREAS
    devices: Sequence[tuple[str, str]] = DEFAULT_DEVICES
    floors: Sequence[str] = DEFAULT_FLOORS
    honest_line: str = HONEST_LINE
    _targets: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        home = (self.commands.areas, self.commands.devices, self.commands.floors) if self.commands is not None \
            else check_home(self.areas, self.devices, self.floors)
        names = {*home[0], *(n for n, _ in home[1]), *home[2], *TARGETS}
        pattern = r"\b(?:" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")\b"
        object.__setattr__(self, "_targets", re.compile(pattern))

    def claims(self, text: str) -> bool:
        sentence = " ".join(re.sub(r"[^a-z' ]", " ", text.lower().replace("’", "'")).split())
        if not sentence:
            return False
        if self.commands is not None and self.commands.match(sentence) is not None \
                and self.commands.match(sentence).intent in _ACTIONS:
            return True  # the reply is itself one of our commands
        if _PRONOUN.search(sentence):
            return True
        if not self._targets.search(sentence):
            return False
        return bool(_STATE.search(sentence) or _FIRST_PERSON.search(sentence) or _UNDER_WAY.search(sentence)
                     or _TIMER.search(sentence))

    def may_claim(self, text: str) -> bool:
        """Whether an unfinished sentence states an action, so that naming a device next would make it a claim."""
        sentence = " ".join(re.sub(r"[^a-z' ]", " ", text.lower().replace("’", "'")).split())
        return bool(_STATE.search(sentence) or _FIRST_PERSON.search(sentence) or _UNDER_WAY.search(sentence)
                    or _TIMER.search(sentence))

    def reply(self) -> GuardedReply:
        return GuardedReply(self)


_ACTIONS = ("HassTurnOn", "HassTurnOff", "HassStartTimer", "HassCancelTimer", "HassLightSet", "HassSetVolume",
            "HassMediaPause", "HassMediaUnpause", "HassMediaNext", "HassMediaPrevious")


class GuardedReply:
    """One reply's clauses, in order: clause() gives what may be said now (the clause; or None while a
    sentence that could still become a claim is held back until it ends; or the honest line once a
    sentence claims an action, and then nothing)."""

    def __init__(self, guard: ClaimGuard) -> None:
        self.guard = guard
        self.blocked = False
        self.said: list[str] = []
        self._sentence = ""
        self._held: list[str] = []

    def clause(self, clause: str, last: bool = False) -> str | None:
        """last: the reply's final piece (nothing is held back any more)."""
        if self.blocked:
            return None
        self._sentence = f"{self._sentence} {clause}".strip()
        self._held.append(clause)
        if self.guard.claims(self._sentence):
            self.blocked, self._held = True, []
            self.said.append(self.guard.honest_line)
            return self.guard.honest_line
        ended = bool(_SENTENCE_END.search(clause))
        if not (ended or last) and self.guard.may_claim(self._sentence):
            return None  # "Turning off the" is no claim yet, "... lights." would be: wait for the sentence's end
        out, self._held = " ".join(self._held), []
        if ended:
            self._sentence = ""
        self.said.append(out)
        return out

    @property
    def text(self) -> str:
        return " ".join(part.strip() for part in self.said if part.strip())

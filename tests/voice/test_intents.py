"""Smart-home commands through real hassil + home-assistant-intents; everything else goes to the LLM."""

from __future__ import annotations

import datetime as dt

import pytest

from demos.voice_assistant.intents import CommandRecognizer


@pytest.fixture(scope="module")
def commands():
    return CommandRecognizer(clock=lambda: dt.datetime(2025, 3, 7, 14, 5))


@pytest.mark.parametrize("text, intent, slots, reply", [
    ("turn on the kitchen lights", "HassTurnOn", {"area": "kitchen", "domain": "light"},
     "Turning on the kitchen lights."),
    ("Please turn off the lights in the bedroom", "HassTurnOff", {"area": "bedroom", "domain": "light"},
     "Turning off the bedroom lights."),
    ("turn on the lamp", "HassTurnOn", {"name": "lamp"}, "Turning on the lamp."),
    ("set a timer for five minutes", "HassStartTimer", {"minutes": 5}, "Timer set for 5 minutes."),
    ("set a timer for one hour and ten minutes", "HassStartTimer", {"hours": 1, "minutes": 10},
     "Timer set for 1 hour and 10 minutes."),
    ("cancel the timer", "HassCancelTimer", {}, "Timer cancelled."),
    ("What time is it", "HassGetCurrentTime", {}, "It is 2:05 PM."),
    ("what's the date today", "HassGetCurrentDate", {}, "Today is Friday, March 7."),
])
def test_commands_are_answered_without_the_llm(commands, text, intent, slots, reply):
    match = commands.match(text)
    assert match is not None
    assert (match.intent, match.slots, match.reply) == (intent, slots, reply)


@pytest.mark.parametrize("text", ["what is the capital of france", "tell me a joke", "turn on the toaster oven",
                                  "", "one zero zero zero one"])
def test_everything_else_goes_to_the_llm(commands, text):
    assert commands.match(text) is None

"""Hearing commands right (issue #11): the command grammar from hassil's templates, routing each utterance
between it and the open model, and the guard that keeps model replies from claiming device actions.

Real pocketsphinx, real hassil + home-assistant-intents, the real default model; recordings from
benchmarks/voice/commands/ (scripts/make_command_recordings.py).
"""

from __future__ import annotations

import pytest

from demos.voice_assistant.assistant import AssistantConfig, VoiceAssistant
from demos.voice_assistant.audio import WavSource
from demos.voice_assistant.claims import HONEST_LINE, ClaimGuard
from demos.voice_assistant.errors import SttModelError, VoiceError
from demos.voice_assistant.grammar import CommandGrammar
from demos.voice_assistant.intents import CommandRecognizer
from demos.voice_assistant.stt_sphinx import PocketSphinxRecognizer, pocketsphinx_vocabulary
from demos.voice_assistant.types import Transcript

from .helpers import REPO

RECORDINGS = REPO / "benchmarks" / "voice" / "commands"


@pytest.fixture(scope="module")
def commands():
    return CommandRecognizer()


@pytest.fixture(scope="module")
def grammar():
    return CommandGrammar.build(vocabulary=pocketsphinx_vocabulary())


def _final(recognizer, name: str) -> Transcript:
    recognizer.use_own_endpointer(False)  # as in the assistant: the turn detector ends the utterance
    for chunk in WavSource(RECORDINGS / name, fast=True, chunk_ms=32).chunks():
        recognizer.accept(chunk)
    return recognizer.finalize()


def test_grammar_holds_what_hassil_accepts_and_nothing_else(grammar, commands):
    for text in ("turn on the kitchen lights", "set a timer for five minutes", "set a timer for twenty five minutes",
                 "turn off the coffee maker", "turn on the lights upstairs", "what time is it", "cancel the timer"):
        assert grammar.accepts(text), text
        assert commands.match(text) is not None, text
    for text in ("on on the kitchen lights", "the timer for five minutes", "what is the capital of france",
                 "turn on the toaster"):  # the issue's mishearings; a question; a device the home lacks
        assert not grammar.accepts(text), text
    phrases = grammar.phrases()  # Vosk's list: every sentence holds only grammar words, and ends like one
    assert 500 < len(phrases) < 5000 and all(grammar.accepts(p) for p in phrases[::50])


@pytest.mark.parametrize("name, intent, slots", [
    # the open model hears "on on the kitchen lights" (the issue's very mishearing), "right on the ...",
    # "that timer for five minutes", "then it timer for five man acts"
    ("tune_piper_turn_on_the_kitchen_lights.wav", "HassTurnOn", {"area": "kitchen", "domain": "light"}),
    ("test_piper-high-slow_turn_on_the_kitchen_lights.wav", "HassTurnOn", {"area": "kitchen", "domain": "light"}),
    ("test_piper-mid_set_a_timer_for_five_minutes.wav", "HassStartTimer", {"minutes": 5}),
    ("test_piper-high-slow_set_a_timer_for_five_minutes.wav", "HassStartTimer", {"minutes": 5}),
])
def test_the_issues_misheard_commands_are_heard_right_with_the_grammar(commands, name, intent, slots):
    open_only = _final(PocketSphinxRecognizer(fast=True), name)
    routed = _final(PocketSphinxRecognizer.with_commands(commands, fast=True), name)
    assert commands.match(open_only.text) is None, f"the open model heard {open_only.text!r} right after all"
    assert routed.route is not None and routed.route.command, routed.route
    match = commands.match(routed.text)
    assert match is not None and (match.intent, match.slots) == (intent, slots), routed.route
    assert routed.route.open_text == open_only.text  # the same open model, the same audio


@pytest.mark.parametrize("name", ["tune_piper_turn_on_the_kitchen_lights.wav",
                                  "test_piper-mid_set_a_timer_for_five_minutes.wav",
                                  "test_piper-mid_what_is_the_capital_of_france.wav",
                                  "test_piper-high-slow_why_is_the_sky_blue.wav"])
def test_a_final_taken_at_the_pause_is_the_final_taken_at_the_end(commands, name):
    """The assistant takes the final at a pause that sounds final; the end of the turn returns that one."""
    plain = _final(PocketSphinxRecognizer.with_commands(commands, fast=True), name)
    recognizer = PocketSphinxRecognizer.with_commands(commands, fast=True)
    recognizer.use_own_endpointer(False)
    chunks = list(WavSource(RECORDINGS / name, fast=True, chunk_ms=32).chunks())
    for chunk in chunks[:-6]:  # every recording ends in 0.6 s of silence: the pause
        recognizer.accept(chunk)
    recognizer.prepare_final()
    for chunk in chunks[-6:]:  # the silence the turn detector waits
        recognizer.accept(chunk)
    early = recognizer.finalize()
    assert early.route.early and not plain.route.early
    # the same decision; the words may differ a little (the final no longer hears the trailing silence)
    assert early.route.command == plain.route.command, (early.route, plain.route)
    if plain.route.command:
        first, second = commands.match(early.text), commands.match(plain.text)
        assert (first.intent, first.slots) == (second.intent, second.slots)
    again = _final(recognizer, name)  # the next utterance decodes as usual (its cepstral mean has adapted)
    assert not again.route.early and again.route.command == plain.route.command


def test_speech_after_an_early_final_is_decoded_with_the_whole_utterance(commands):
    """A pause that sounded final, then the user goes on: the final is the one a single pass gives."""
    name = "test_piper-mid_set_a_timer_for_five_minutes.wav"
    plain = _final(PocketSphinxRecognizer.with_commands(commands, fast=True), name)
    recognizer = PocketSphinxRecognizer.with_commands(commands, fast=True)
    recognizer.use_own_endpointer(False)
    chunks = list(WavSource(RECORDINGS / name, fast=True, chunk_ms=32).chunks())
    half = len(chunks) // 2
    for chunk in chunks[:half]:
        recognizer.accept(chunk)
    recognizer.prepare_final()  # mid-sentence: "set a timer"
    recognizer.accept(chunks[half])  # the chunk where speech goes on arrives before the detector says so
    recognizer.resume()
    for chunk in chunks[half + 1:]:
        recognizer.accept(chunk)
    heard = recognizer.finalize()
    assert not heard.route.early
    assert (heard.text, heard.route.open_text, heard.route.score) == (plain.text, plain.route.open_text,
                                                                      plain.route.score)


@pytest.mark.parametrize("name", ["test_piper-mid_what_is_the_capital_of_france.wav",
                                  "test_piper-high-slow_why_is_the_sky_blue.wav",
                                  "test_piper-high-slow_what_are_kitchen_lights_made_of.wav"])
def test_a_question_still_goes_to_the_open_model(commands, name):
    heard = _final(PocketSphinxRecognizer.with_commands(commands, fast=True), name)
    route = heard.route
    assert not route.command and heard.text == route.open_text, route
    assert commands.match(heard.text) is None


def test_the_assistant_answers_the_misheard_command_as_a_command(commands, llm):
    stt = PocketSphinxRecognizer.with_commands(commands, fast=True)
    assistant = VoiceAssistant(stt, llm, commands, config=AssistantConfig(max_new_tokens=16))
    path = RECORDINGS / "tune_piper_turn_on_the_kitchen_lights.wav"
    (report,) = assistant.run(WavSource(path, fast=True, tail_silence=1.0, chunk_ms=32).chunks())
    assert (report.route, report.intent, report.reply) == ("command", "HassTurnOn", "Turning on the kitchen lights.")
    assert report.heard.command and report.to_dict()["heard"]["grammar_text"] == "turn on the kitchen lights"


@pytest.mark.parametrize("sentence", [
    "The kitchen lights on the kitchen are on.",  # issue #11's reply
    "I've set a timer for five minutes.", "Turning on the kitchen lights.", "Okay, the fan is now off.",
    "Sure, I have turned them on.", "Your timer is set for 5 minutes.", "Turn on the kitchen lights.",
])
def test_the_guard_blocks_claimed_actions(commands, sentence):
    assert ClaimGuard(commands).claims(sentence)


@pytest.mark.parametrize("sentence", [
    "The capital of France is Paris.", "To turn on a computer, press the power button.",
    "Kitchen lights are usually made of glass and metal.", "A timer is a device that counts down.",
    "I can't turn on the lights.",
])
def test_the_guard_lets_answers_through(commands, sentence):
    assert not ClaimGuard(commands).claims(sentence)


def test_a_blocked_clause_is_replaced_before_it_is_said_and_the_rest_dropped(commands):
    reply = ClaimGuard(commands).reply()
    said = [reply.clause(c) for c in ("The kitchen lights", "on the kitchen are on.", "Enjoy your evening.")]
    assert said == ["The kitchen lights", HONEST_LINE, None]
    assert reply.blocked and reply.text == f"The kitchen lights {HONEST_LINE}"


def test_a_sentence_that_starts_like_a_claim_is_held_until_it_ends(commands):
    reply = ClaimGuard(commands).reply()  # the first words are spoken early: "Turning off the" must wait
    assert [reply.clause(c) for c in ("Turning off the", "lights now.")] == [None, HONEST_LINE]
    reply = ClaimGuard(commands).reply()
    assert [reply.clause(c) for c in ("Turning off a computer", "takes a minute.")] == \
        [None, "Turning off a computer takes a minute."]
    reply = ClaimGuard(commands).reply()
    assert [reply.clause(c) for c in ("Paris is the", "capital of France.")] == ["Paris is the", "capital of France."]


def test_a_model_reply_that_claims_an_action_is_not_said(llm):
    # the default model echoes a misheard command back ("turn off the lights in the ah."): from the model
    # path, that would tell the user the lights are being turned off
    shown: list[str] = []
    assistant = VoiceAssistant(PocketSphinxRecognizer(fast=True), llm, None,
                               config=AssistantConfig(max_new_tokens=24), on_text=shown.append)
    report = assistant.respond(Transcript("turn off the lights in the ah the", is_final=True), 0.0)
    assert report.route == "llm" and report.claim_blocked, report.reply
    said = "".join(shown).split("assistant:", 1)[1]
    assert report.reply == HONEST_LINE and said.strip() == HONEST_LINE
    unguarded = VoiceAssistant(PocketSphinxRecognizer(fast=True), llm, None,
                               config=AssistantConfig(max_new_tokens=24, guard_claims=False))
    assert ClaimGuard().claims(unguarded.respond(Transcript("turn off the lights in the ah the", True), 0.0).reply)


@pytest.mark.parametrize("areas, devices, value, fix", [
    (["kitchen", "Büro 2"], None, "'Büro 2'", "spell numbers and symbols out"),
    (["kitchen"], [("sonos", "media_player")], "'sonos'", "dictionary words"),
    (["kitchen"], [("lamp", "toaster")], "('lamp', 'toaster')", "domain of light"),
])
def test_a_bad_home_is_one_clear_error(areas, devices, value, fix):
    home = {"areas": areas} if devices is None else {"areas": areas, "devices": devices}
    with pytest.raises(VoiceError) as err:
        CommandGrammar.build(**home, vocabulary=pocketsphinx_vocabulary())
    assert value in str(err.value) and fix in str(err.value)


def test_a_vosk_model_without_the_words_says_which(ko_model_dir, commands):
    from demos.voice_assistant.stt_vosk import VoskRecognizer

    with pytest.raises(VoiceError, match="area name 'kitchen': the recognizer's dictionary has no word 'kitchen'"):
        VoskRecognizer(ko_model_dir, commands=commands)


def test_a_vosk_model_with_a_static_graph_cannot_take_the_grammar(ko_model_dir, commands, tmp_path):
    from demos.voice_assistant.stt_vosk import VoskRecognizer

    static = tmp_path / "static-model"
    for entry in ko_model_dir.iterdir():
        if entry.name != "graph":
            (static / entry.name).parent.mkdir(parents=True, exist_ok=True)
            (static / entry.name).symlink_to(entry)
    (static / "graph").mkdir()
    for entry in (ko_model_dir / "graph").iterdir():
        if entry.name not in ("HCLr.fst", "Gr.fst"):
            (static / "graph" / entry.name).symlink_to(entry)
    (static / "graph" / "HCLG.fst").write_bytes(b"")  # the loader is never reached: the check comes first
    with pytest.raises(SttModelError, match="does not support grammar.*graph/HCLr.fst"):
        VoskRecognizer(static, commands=commands)


def test_a_route_threshold_out_of_range_is_refused(grammar):
    with pytest.raises(VoiceError, match="route threshold 3 is out of range"):
        PocketSphinxRecognizer(commands=grammar, route_threshold=3)

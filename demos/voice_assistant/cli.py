"""`python -m demos.voice_assistant`: talk to the model (microphone or --wav), or download a Vosk model.

Thin: it parses options, builds the parts and prints; the work happens in assistant.py.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from edgellm.errors import EdgeLLMError, ModelFormatError

from .assistant import AssistantConfig, TurnReport, VoiceAssistant
from .audio import MicrophoneSource, WavSource
from .stt import REPO_ROOT, open_recognizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL = REPO_ROOT / "models" / "smollm2-135m-instruct"
TAIL_SILENCE = 1.0  # seconds appended to --wav audio: a microphone keeps delivering silence after speech


def _model_dir(option: str | None) -> Path:
    path = Path(option or os.environ.get("EDGELLM_MODEL") or DEFAULT_MODEL)
    if not (path / "edgellm.json").is_file():
        raise ModelFormatError(f"no converted model in {path}. Fix: convert one there with `edgellm convert`, "
                               "or pass --model DIR (or set EDGELLM_MODEL).")
    return path


def _status(message: str) -> None:
    click.echo(message, err=True)  # on screen, and never mixed into --json output


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--wav", type=click.Path(dir_okay=False, path_type=Path),
              help="Replay a recording instead of the microphone.")
@click.option("--fast", is_flag=True, help="With --wav: push audio as fast as possible, not in real time.")
@click.option("--model", "model_opt",
              help="Converted model folder [default: models/smollm2-135m-instruct, or $EDGELLM_MODEL].")
@click.option("--threads", type=int, default=1, show_default=True,
              help="CPU threads for the model: one leaves a core to the audio loop (VAD, end of turn, recognizer).")
@click.option("--vosk-model", help="Vosk model folder [default: $VOSK_MODEL, then models/vosk*].")
@click.option("--stt", "engine", type=click.Choice(["auto", "vosk", "pocketsphinx"]), default="auto", show_default=True)
@click.option("--accurate-stt", is_flag=True,
              help="pocketsphinx: full search and second pass (slower final result; default: fast settings).")
@click.option("--grammar", multiple=True, help="Restrict recognition to this phrase (repeatable).")
@click.option("--endpoint-ms", type=float,
              help="Silence that ends an utterance [default: the Vosk model's rules; pocketsphinx 300].")
@click.option("--endpointing", type=click.Choice(["smart", "silence", "recognizer"]), default="smart",
              show_default=True, help="Who ends a turn: Silero VAD + Smart Turn, VAD + a fixed silence, or the "
              "recognizer's own endpointer.")
@click.option("--silence-ms", type=float, default=700.0, show_default=True,
              help="--endpointing silence: the silence that ends a turn.")
@click.option("--complete-ms", type=float, default=150.0, show_default=True,
              help="Silence that ends a turn once Smart Turn says it sounds complete.")
@click.option("--confident-ms", type=float, default=100.0, show_default=True,
              help="Silence that ends a turn when Smart Turn and the model's reading of the words both say complete.")
@click.option("--no-text-turn", is_flag=True,
              help="End turns on Smart Turn alone (without the model's probability that the words end the message).")
@click.option("--incomplete-ms", type=float, default=1000.0, show_default=True,
              help="Silence that ends a turn that sounds unfinished.")
@click.option("--max-turn-s", type=float, default=20.0, show_default=True, help="A longer turn is closed anyway.")
@click.option("--no-barge-in", is_flag=True,
              help="Keep answering when the user speaks meanwhile (use it with loudspeakers and no echo cancelling).")
@click.option("--speculative", is_flag=True,
              help="Start the reply in the background at a pause that sounds final (off by default: on a loaded "
                   "2-core machine it cost more than it saved, see benchmarks/voice_turns.json).")
@click.option("--no-incremental", is_flag=True, help="Do not prefill the user's words while they speak.")
@click.option("--no-memory", is_flag=True, help="Answer every turn on its own (no conversation history).")
@click.option("--runs", type=int, default=1, show_default=True,
              help="With --wav: repeat and report medians and p90.")
@click.option("--compare", is_flag=True, help="With --wav: run each turn-taking variant side by side "
              "(recognizer endpointer, fixed silence, Smart Turn without incremental prefill, Smart Turn alone, "
              "Smart Turn + the model's text signal, with speculative start, with whole-clause speech).")
@click.option("--budget-ms", type=float, default=200.0, show_default=True, help="Final result → first token budget.")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--no-commands", is_flag=True, help="Send everything to the LLM (no smart-home commands).")
@click.option("--command-grammar/--no-command-grammar", default=False, show_default=True,
              help="Also decode with a grammar of the command sentences and take its sentence when it explains "
                   "the audio as well: commands heard right 23% -> 54% on held-out voices "
                   "(benchmarks/commands.json), at ~100-170 ms more to the first token "
                   "(benchmarks/voice_turns.json: smart vs smart_no_grammar), hence off by default.")
@click.option("--intent-model", is_flag=True,
              help="When hassil finds no command, ask the model for one under a JSON schema first "
                   "(costs one short generation on free questions).")
@click.option("--speak", is_flag=True, help="Speak the reply (piper if installed, else espeak-ng).")
@click.option("--speak-wav", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the spoken reply to a WAV file.")
@click.option("--seconds", type=float, help="Microphone: stop after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON (one object per reply, or a summary).")
@click.option("-v", "--verbose", count=True)
@click.pass_context
def main(ctx: click.Context, verbose: int, **options: object) -> None:
    """Voice assistant: speech → Vosk → SmolLM2 (edgellm) → text and speech, with a latency report."""
    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2), format="%(levelname)s %(name)s: %(message)s")
    try:
        _run(RunOptions(**options))  # type: ignore[arg-type]
    except EdgeLLMError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        _status("stopped")


@dataclass(frozen=True)
class RunOptions:
    """The command line, typed (one field per option above)."""

    wav: Path | None
    fast: bool
    model_opt: str | None
    threads: int | None
    vosk_model: str | None
    engine: str
    accurate_stt: bool
    grammar: tuple[str, ...]
    endpoint_ms: float | None
    endpointing: str
    silence_ms: float
    complete_ms: float
    confident_ms: float
    no_text_turn: bool
    incomplete_ms: float
    max_turn_s: float
    speculative: bool
    no_barge_in: bool
    no_incremental: bool
    no_memory: bool
    runs: int
    compare: bool
    budget_ms: float
    max_tokens: int
    no_commands: bool
    command_grammar: bool
    intent_model: bool
    speak: bool
    speak_wav: Path | None
    seconds: float | None
    as_json: bool


# --compare: each variant changes one thing from its neighbour, so each piece's gain shows side by side.
COMPARE = {
    "recognizer_endpointer": {"endpointing": "recognizer", "speculative": False},
    "fixed_silence": {"endpointing": "silence", "speculative": False},
    "smart_no_incremental": {"endpointing": "smart", "speculative": False, "incremental": False},
    "smart_turn_only": {"endpointing": "smart", "speculative": False, "text_turn": False},
    "smart": {"endpointing": "smart", "speculative": False},
    "smart_speculative": {"endpointing": "smart", "speculative": True},
    # the speech out before: the espeak-ng command (a process a clause), and nothing said before a clause ends
    "smart_clause_speech": {"endpointing": "smart", "speculative": False, "first_words": 0,
                            "speaker": "espeak-command"},
}
STAGES = ("end_of_turn", "recognizer_final", "first_token", "first_audio", "final_to_first_token")


def _run(o: RunOptions) -> None:
    import edgellm

    from .conversation import MemoryConfig
    from .turn import SmartTurn, TurnConfig, TurnDetector
    from .vad import SileroVad

    if o.runs < 1 or ((o.runs > 1 or o.compare) and o.wav is None):
        raise click.UsageError("--runs N (N >= 1) and --compare need --wav FILE.")
    wav = o.wav
    turn = TurnConfig(complete_silence=o.complete_ms / 1000.0, incomplete_silence=o.incomplete_ms / 1000.0,
                      confident_silence=o.confident_ms / 1000.0,
                      fixed_silence=o.silence_ms / 1000.0, max_turn=o.max_turn_s)
    variants = COMPARE if o.compare else {o.endpointing: {"endpointing": o.endpointing,
                                                          "speculative": o.speculative,
                                                          "incremental": not o.no_incremental,
                                                          "text_turn": not o.no_text_turn}}
    chunk_ms = 100 if all(v["endpointing"] == "recognizer" for v in variants.values()) else 32
    source = (lambda: WavSource(wav, fast=o.fast, tail_silence=TAIL_SILENCE, chunk_ms=chunk_ms)) if wav else \
        (lambda: MicrophoneSource(max_seconds=o.seconds, chunk_ms=chunk_ms))
    source()  # a bad WAV or a missing microphone fails here, before the slow model loads
    vad = model = None
    if any(v["endpointing"] != "recognizer" for v in variants.values()):
        vad = SileroVad()  # a missing or corrupt model file fails here, before the slow LLM loads
        if any(v["endpointing"] == "smart" for v in variants.values()):
            model = SmartTurn()
    commands = intent_model = None
    if not o.no_commands:
        from .intents import CommandRecognizer
        commands = CommandRecognizer()
    stt = open_recognizer(o.vosk_model, o.grammar or None, o.engine,
                          None if o.endpoint_ms is None else o.endpoint_ms / 1000.0, announce=_status,
                          fast=not o.accurate_stt,
                          commands=commands if o.command_grammar and not o.grammar else None)
    llm = edgellm.load(_model_dir(o.model_opt), threads=o.threads)
    if commands is not None and o.intent_model:  # when hassil finds nothing: an intent under a JSON schema
        from .intent_model import IntentModel
        intent_model = IntentModel(llm, commands)
    speech = None
    if o.speak or o.speak_wav:
        from .speech import SpeechOutput, default_speaker
        # no loudspeaker but a microphone: the WAV file is written at playback speed, so barge-in can cut it
        speech = SpeechOutput(default_speaker(), wav_path=o.speak_wav, play=o.speak, realtime=o.wav is None)
    show = None if o.as_json else (lambda text: click.echo(text, nl=False))
    memory = MemoryConfig(max_exchanges=0) if o.no_memory or o.runs > 1 or o.compare else MemoryConfig()
    assistants = {}
    for name, change in variants.items():
        change = {k: v for k, v in change.items() if k != "speaker"}  # the speaker is shared here
        config = AssistantConfig(max_new_tokens=o.max_tokens, budget_ms=o.budget_ms, turn=turn, memory=memory,
                                 barge_in=not o.no_barge_in, **change)
        turns = None
        if config.endpointing != "recognizer":
            turns = TurnDetector(config.turn, vad, model)
        assistants[name] = VoiceAssistant(stt, llm, commands, speech, config, on_text=show, turns=turns,
                                          intent_model=intent_model)
    _warm_up(llm)
    reports: dict[str, list[TurnReport]] = {name: [] for name in variants}
    summary_only = o.runs > 1 or o.compare
    try:
        for _ in range(o.runs):
            for name, assistant in assistants.items():  # interleaved, so drift (heat, load) hits all alike
                for report in assistant.run(source().chunks()):
                    reports[name].append(report)
                    if not o.as_json:
                        click.echo(_latency_line(report))
                    elif not summary_only:
                        click.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    finally:
        if speech is not None:
            speech.wait()
            speech.close()
    if wav and not any(reports.values()):  # noise, music or silence: say so rather than end without a word
        click.echo(f"no speech heard in {wav}: the voice activity detector found no utterance to answer. "
                   "Fix: check that the recording holds speech (16 kHz mono is best).", err=True)
    if summary_only:
        summary = {name: summarize(reports[name]) for name in variants}
        summary["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        if o.as_json:
            click.echo(json.dumps(summary, ensure_ascii=False))
        else:
            for name in variants:
                stats = summary[name]
                cells = ", ".join(f"{stage} {stats['median_ms'][stage]}/{stats['p90_ms'][stage]}" for stage in STAGES)
                click.echo(f"{name} ({stats['replies']} replies, {stats['speculative']} speculative), "
                           f"ms after last voiced audio, median/p90: {cells}")


def _warm_up(llm: Any) -> None:
    """One tiny generation: onnxruntime's first run allocates; no user should wait for that."""
    import edgellm

    llm.generate("Hello", params=edgellm.SamplingParams(max_new_tokens=2, temperature=0.0))


def _latency_line(report: TurnReport) -> str:
    lat = report.latency_ms
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    return (f"  [{report.route}; {report.endpointing} ({report.end_reason}); ms after last voiced audio: "
            f"end of turn {fmt(lat.end_of_turn)}, final {fmt(lat.recognizer_final)}, first token "
            f"{fmt(lat.first_token)} (+{fmt(lat.final_to_first_token)}), first audio {fmt(lat.first_audio)}, "
            f"done {fmt(lat.reply_done)}"
            + ("; speculative" if report.speculative else "")
            + (f"; interrupted, stopped {report.barge_in_ms:.0f} ms after the user spoke" if report.interrupted else "")
            + (f"; cached {report.cached_tokens}/{report.prompt_tokens} prompt tokens" if report.prompt_tokens else "")
            + "]"
            + (" holding phrase said" if report.holding_phrase else ""))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if q == 0.5:
        return round(statistics.median(values), 1)
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))], 1)


def summarize(reports: list[TurnReport]) -> dict[str, Any]:
    """Medians and p90 (nearest rank) of each latency stage over the LLM replies, and the raw turns."""
    llm_turns = [r for r in reports if r.route == "llm"]
    by_stage = {stage: [getattr(r.latency_ms, stage) for r in llm_turns if getattr(r.latency_ms, stage) is not None]
                for stage in STAGES}
    return {
        "replies": len(llm_turns),
        "speculative": sum(r.speculative for r in llm_turns),
        "median_ms": {stage: _percentile(values, 0.5) for stage, values in by_stage.items()},
        "p90_ms": {stage: _percentile(values, 0.9) for stage, values in by_stage.items()},
        "median_cached_tokens": _percentile([r.cached_tokens for r in llm_turns if r.cached_tokens is not None], 0.5),
        "turns": [r.to_dict() for r in reports],
    }


@main.command("download-vosk-model")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=REPO_ROOT / "models",
              show_default=True, help="Folder to unpack the model into.")
@click.option("--force", is_flag=True, help="Replace an existing model folder.")
@click.option("--url", help="A mirror of the archive (it must still match --sha256).")
@click.option("--sha256", help="Expected sha256 of the archive at --url.")
def download_command(dest: Path, force: bool, url: str | None, sha256: str | None) -> None:
    """Download the official small English Vosk model (pinned sha256) and unpack it atomically."""
    from .download import SMALL_EN_US, ModelArchive, download_vosk_model

    archive = ModelArchive(url or SMALL_EN_US.url, (sha256 or SMALL_EN_US.sha256).lower(), SMALL_EN_US.name)
    try:
        path = download_vosk_model(dest, archive, force=force, progress=sys.stderr.isatty())
    except EdgeLLMError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Vosk model ready: {path}")

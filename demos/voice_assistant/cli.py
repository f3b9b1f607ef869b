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
@click.option("--threads", type=int, help="CPU threads for the model.")
@click.option("--vosk-model", help="Vosk model folder [default: $VOSK_MODEL, then models/vosk*].")
@click.option("--stt", "engine", type=click.Choice(["auto", "vosk", "pocketsphinx"]), default="auto", show_default=True)
@click.option("--grammar", multiple=True, help="Restrict recognition to this phrase (repeatable).")
@click.option("--endpoint-ms", type=float,
              help="Silence that ends an utterance [default: the Vosk model's rules; pocketsphinx 300].")
@click.option("--no-incremental", is_flag=True, help="Do not prefill the user's words while they speak.")
@click.option("--runs", type=int, default=1, show_default=True, help="With --wav: repeat and report medians.")
@click.option("--compare", is_flag=True, help="With --runs: run with and without incremental prefill.")
@click.option("--budget-ms", type=float, default=200.0, show_default=True, help="Final result → first token budget.")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--no-commands", is_flag=True, help="Send everything to the LLM (no smart-home commands).")
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
    grammar: tuple[str, ...]
    endpoint_ms: float | None
    no_incremental: bool
    runs: int
    compare: bool
    budget_ms: float
    max_tokens: int
    no_commands: bool
    intent_model: bool
    speak: bool
    speak_wav: Path | None
    seconds: float | None
    as_json: bool


def _run(o: RunOptions) -> None:
    import edgellm

    if o.runs < 1 or ((o.runs > 1 or o.compare) and o.wav is None):
        raise click.UsageError("--runs N (N >= 1) and --compare need --wav FILE.")
    wav = o.wav
    source = (lambda: WavSource(wav, fast=o.fast, tail_silence=TAIL_SILENCE)) if wav else \
        (lambda: MicrophoneSource(max_seconds=o.seconds))
    source()  # a bad WAV or a missing microphone fails here, before the slow model loads
    stt = open_recognizer(o.vosk_model, o.grammar or None, o.engine,
                          None if o.endpoint_ms is None else o.endpoint_ms / 1000.0, announce=_status)
    llm = edgellm.load(_model_dir(o.model_opt), threads=o.threads)
    commands = intent_model = None
    if not o.no_commands:
        from .intent_model import IntentModel
        from .intents import CommandRecognizer
        commands = CommandRecognizer()
        if o.intent_model:  # when hassil finds nothing: an intent under a JSON schema
            intent_model = IntentModel(llm, commands)
    speech = None
    if o.speak or o.speak_wav:
        from .speech import SpeechOutput, default_speaker
        speech = SpeechOutput(default_speaker(), wav_path=o.speak_wav, play=o.speak)
    show = None if o.as_json else (lambda text: click.echo(text, nl=False))
    modes = [True, False] if o.compare else [not o.no_incremental]
    assistants = {mode: VoiceAssistant(stt, llm, commands, speech, AssistantConfig(
        max_new_tokens=o.max_tokens, budget_ms=o.budget_ms, incremental=mode), on_text=show,
        intent_model=intent_model) for mode in modes}
    _warm_up(llm)
    reports: dict[bool, list[TurnReport]] = {mode: [] for mode in modes}
    summary_only = o.runs > 1 or o.compare
    try:
        for _ in range(o.runs):
            for mode in modes:  # interleaved, so drift (heat, other load) hits both modes alike
                for report in assistants[mode].run(source().chunks()):
                    reports[mode].append(report)
                    if not o.as_json:
                        click.echo(_latency_line(report))
                    elif not summary_only:
                        click.echo(json.dumps(report.to_dict(), ensure_ascii=False))
    finally:
        if speech is not None:
            speech.wait()
            speech.close()
    if summary_only:
        summary = {("incremental" if mode else "no_incremental"): _summary(reports[mode]) for mode in modes}
        if o.as_json:
            click.echo(json.dumps(summary, ensure_ascii=False))
        else:
            for name, stats in summary.items():
                median = stats["median_final_to_first_token_ms"]
                click.echo(f"{name}: recognizer final → first token median {median} ms over {stats['replies']} replies")


def _warm_up(llm: Any) -> None:
    """One tiny generation: onnxruntime's first run allocates; no user should wait for that."""
    import edgellm

    llm.generate("Hello", params=edgellm.SamplingParams(max_new_tokens=2, temperature=0.0))


def _latency_line(report: TurnReport) -> str:
    lat = report.latency_ms
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    return (f"  [{report.route}; ms after last voiced audio: final {fmt(lat.recognizer_final)}, first token "
            f"{fmt(lat.first_token)} (+{fmt(lat.final_to_first_token)}), first clause {fmt(lat.first_clause_spoken)}, "
            f"done {fmt(lat.reply_done)}"
            + (f"; cached {report.cached_tokens}/{report.prompt_tokens} prompt tokens" if report.prompt_tokens else "")
            + "]"
            + (" holding phrase said" if report.holding_phrase else ""))


def _summary(reports: list[TurnReport]) -> dict[str, object]:
    llm_turns = [r for r in reports if r.latency_ms.final_to_first_token is not None]
    med = lambda values: round(statistics.median(values), 1) if values else None  # noqa: E731
    return {
        "replies": len(llm_turns),
        "median_final_to_first_token_ms": med([r.latency_ms.final_to_first_token for r in llm_turns]),
        "median_recognizer_final_ms": med([r.latency_ms.recognizer_final for r in reports]),
        "median_first_token_ms": med([r.latency_ms.first_token for r in llm_turns]),
        "median_cached_tokens": med([r.cached_tokens for r in llm_turns if r.cached_tokens is not None]),
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

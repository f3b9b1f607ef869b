"""Command accuracy with and without the command grammar, on the recordings in benchmarks/voice/commands/.

    python scripts/bench_commands.py                     # → benchmarks/commands.json
    python scripts/bench_commands.py --model DIR         # also: the model's replies to the misheard commands

Every recording is streamed (32 ms chunks, as fast as it decodes) through two pocketsphinx recognizers
side by side, fast profile as the assistant uses it: the open model alone (what the assistant did
before), and the open model + command grammar with routing (grammar.py, stt_sphinx.py). Each final goes
through hassil (the assistant's CommandRecognizer). An utterance counts as right when the intent and
every slot equal the manifest's (commands.json); for a question (no intent), right means no command.
"Without grammar" is the open recognizer's final, "with grammar" the routed one.

The routing threshold is chosen on the tune_* recordings (the middle of the widest score gap that
gives the best accuracy there) and accuracy is reported on the test_* recordings, whose voices the
tune set does not have. Latency: what the grammar adds to the final (its end of utterance + the two
alignments that score the results) and to decoding each second of audio (CPU), measured around the
same calls of the two recognizers.

--model: the misheard commands (hassil found nothing in the open final) are put to the model as the
assistant would (greedy, its system prompt); each reply is checked by the claim guard: how many
replies claim an action nobody performed, and whether the guard stops each one.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECORDINGS = REPO / "benchmarks" / "voice" / "commands"


def slots_of(match) -> dict:
    out = {}
    for key, value in (match.slots if match else {}).items():
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        out[key] = value.lower() if isinstance(value, str) else value
    return out


def right(match, row: dict) -> bool:
    if row["intent"] is None:
        return match is None
    return match is not None and match.intent == row["intent"] and slots_of(match) == row["slots"]


def decode(recognizer, path: Path) -> tuple[object, float, float]:
    """(final transcript, seconds spent in accept(), seconds in finalize())."""
    from demos.voice_assistant.audio import WavSource

    accept = 0.0
    for chunk in WavSource(path, fast=True, chunk_ms=32).chunks():
        started = time.perf_counter()
        recognizer.accept(chunk)
        accept += time.perf_counter() - started
    started = time.perf_counter()
    final = recognizer.finalize()
    return final, accept, time.perf_counter() - started


def tune(rows: list[dict]) -> tuple[float, int]:
    """Threshold with the best tune-set accuracy: the middle of the widest gap between sorted scores."""
    scores = sorted({r["score"] for r in rows if r["score"] is not None})
    candidates = [(a + b) / 2 for a, b in zip(scores, scores[1:])] + [scores[0] - 1.0, scores[-1] + 1.0]

    def correct(threshold: float) -> int:
        return sum(r["right_if_command"] if r["score"] is not None and r["score"] >= threshold else r["right_if_open"]
                   for r in rows)

    best = max(correct(t) for t in candidates)
    gaps = [(b - a, (a + b) / 2) for a, b in zip(scores, scores[1:]) if correct((a + b) / 2) == best]
    return (max(gaps)[1] if gaps else candidates[0]), best


def pct(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100.0 * part / whole:.0f}%)" if whole else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "commands.json")
    ap.add_argument("--model", type=Path, help="converted model folder: also ask it the misheard commands")
    args = ap.parse_args()

    from demos.voice_assistant.audio import read_wav
    from demos.voice_assistant.claims import ClaimGuard
    from demos.voice_assistant.intents import CommandRecognizer
    from demos.voice_assistant.stt_sphinx import ROUTE_THRESHOLD, PocketSphinxRecognizer
    from edgellm.record import Recorder, Table

    manifest = json.loads((RECORDINGS / "commands.json").read_text())
    recorder = Recorder("bench_commands", parameters={**vars(args), "recordings": len(manifest),
                                                      "shipped_threshold": ROUTE_THRESHOLD})
    commands = CommandRecognizer()
    plain = PocketSphinxRecognizer(fast=True)
    routed = PocketSphinxRecognizer.with_commands(commands, fast=True)
    for rec in (plain, routed):
        rec.use_own_endpointer(False)  # the assistant's turn detector ends utterances (finalize)
    rows = []
    for name, info in manifest.items():
        path = RECORDINGS / name
        base, base_accept, base_final = decode(plain, path)
        final, accept, finalize = decode(routed, path)
        route = final.route
        open_match = commands.match(base.text)
        grammar_match = commands.match(route.grammar_text) if route.grammar_text else None
        if route.open_text != base.text:  # both decoders are the same open model on the same audio
            print(f"warning: {name}: open finals differ ({base.text!r} vs {route.open_text!r})", file=sys.stderr)
        seconds = read_wav(path).seconds
        rows.append({
            "file": name, "set": info["set"], "voice": info["voice"], "text": info["text"], "intent": info["intent"],
            "slots": info["slots"], "open_text": base.text, "grammar_text": route.grammar_text, "score": route.score,
            "open_intent": open_match.intent if open_match else None, "open_slots": slots_of(open_match),
            "grammar_intent": grammar_match.intent if grammar_match else None, "grammar_slots": slots_of(grammar_match),
            "right_if_open": right(open_match, info), "right_if_command": right(grammar_match, info),
            "audio_s": round(seconds, 3),
            "accept_ms_open": round(base_accept * 1000, 2), "accept_ms_routed": round(accept * 1000, 2),
            "final_ms_open": round(base_final * 1000, 2), "final_ms_routed": round(finalize * 1000, 2),
            "route_ms": route.ms,
        })
        print(f"{name}: open {base.text!r} grammar {route.grammar_text!r} score {route.score}", file=sys.stderr)
    threshold, _ = tune([r for r in rows if r["set"] == "tune"])
    for r in rows:
        r["command_route"] = r["score"] is not None and r["score"] >= threshold
        r["right_without"] = r["right_if_open"]
        r["right_with"] = r["right_if_command"] if r["command_route"] else r["right_if_open"]

    def stats(subset: list[dict]) -> dict:
        cmds = [r for r in subset if r["intent"] is not None]
        qs = [r for r in subset if r["intent"] is None]
        return {"commands": len(cmds), "questions": len(qs),
                "command_right_without": sum(r["right_without"] for r in cmds),
                "command_right_with": sum(r["right_with"] for r in cmds),
                "false_command_without": sum(not r["right_without"] for r in qs),
                "false_command_with": sum(not r["right_with"] for r in qs)}

    summary = {"threshold": round(threshold, 3), "shipped_threshold": ROUTE_THRESHOLD,
               "tune": stats([r for r in rows if r["set"] == "tune"]),
               "test": stats([r for r in rows if r["set"] == "test"]),
               "test_by_voice": {v: stats([r for r in rows if r["set"] == "test" and r["voice"] == v])
                                 for v in sorted({r["voice"] for r in rows if r["set"] == "test"})}}
    extra_final = [r["final_ms_routed"] - r["final_ms_open"] for r in rows]
    extra_cpu = [(r["accept_ms_routed"] - r["accept_ms_open"]) / r["audio_s"] for r in rows]
    q = lambda v, p: sorted(v)[min(len(v) - 1, int(round(p * (len(v) - 1))))]  # noqa: E731
    summary["latency"] = {"final_extra_ms_median": round(statistics.median(extra_final), 1),
                          "final_extra_ms_p90": round(q(extra_final, 0.9), 1),
                          "final_ms_open_median": round(statistics.median(r["final_ms_open"] for r in rows), 1),
                          "decode_extra_ms_per_audio_s_median": round(statistics.median(extra_cpu), 1),
                          "decode_ms_per_audio_s_open_median": round(statistics.median(
                              r["accept_ms_open"] / r["audio_s"] for r in rows), 1)}
    if args.model:
        summary["model_replies"] = ask_model(args.model, rows, ClaimGuard(commands))
    t, lat = summary["test"], summary["latency"]
    by = summary["test_by_voice"]
    table = Table(["recordings (test set)", "commands right, open model only", "commands right, + command grammar",
                   "questions taken as commands (without → with)"],
                  [[f"all {t['commands'] + t['questions']} ({len(by)} voices)",
                    pct(t["command_right_without"], t["commands"]), pct(t["command_right_with"], t["commands"]),
                    f"{t['false_command_without']} → {t['false_command_with']} of {t['questions']}"]]
                  + [[v, pct(s["command_right_without"], s["commands"]), pct(s["command_right_with"], s["commands"]),
                      f"{s['false_command_without']} → {s['false_command_with']} of {s['questions']}"]
                     for v, s in by.items()])
    latency = Table(["cost of the command grammar", "median", "p90"],
                    [["extra ms at the final (grammar end of utterance + scoring alignments)",
                      lat["final_extra_ms_median"], lat["final_extra_ms_p90"]],
                     ["extra decoding CPU, ms per second of audio (open model alone: "
                      f"{lat['decode_ms_per_audio_s_open_median']})", lat["decode_extra_ms_per_audio_s_median"], "-"]])
    recorder.write(args.out, samples=rows, summary=summary, table=table, tables={"latency": latency},
                   extra_versions=("pocketsphinx", "hassil", "home-assistant-intents"))
    print(json.dumps(summary, indent=1))


def ask_model(model: Path, rows: list[dict], guard) -> dict:
    """The model's replies to what the open recognizer heard where hassil found no command."""
    import edgellm
    from demos.voice_assistant.prefill import DEFAULT_SYSTEM_PROMPT

    llm = edgellm.load(model, threads=1)
    params = edgellm.SamplingParams(max_new_tokens=64, temperature=0.0)
    asked, seen = [], set()
    for r in rows:
        if r["intent"] is None or r["open_intent"] is not None or not r["open_text"] or r["open_text"] in seen:
            continue
        seen.add(r["open_text"])
        reply = llm.generate([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                              {"role": "user", "content": r["open_text"]}], params).text.strip()
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", reply) if s]
        asked.append({"heard": r["open_text"], "meant": r["text"], "reply": reply,
                      "blocked": any(guard.claims(s) for s in sentences)})
    return {"asked": len(asked), "blocked": sum(a["blocked"] for a in asked), "replies": asked}


if __name__ == "__main__":
    main()

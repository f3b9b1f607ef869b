"""Score smart-home intent recognition: hassil alone vs hassil + the constrained model.

    python scripts/score_intents.py demos/voice_assistant/data/intent_paraphrases.jsonl \
        --model .cache/models/smollm2-135m-instruct --out benchmarks/intents.json

Input: any JSONL file of {"text": ..., "intent": HA intent name or null (not a command), "slots": {...}}.
An utterance is right when the intent is right and the scored slots (area, name, domain, brightness,
hours, minutes, seconds, volume_level) are equal; "domain" only counts where the line names one.
hassil runs with every intent the model schema supports (the fairest hassil baseline); the model is
asked only where hassil finds nothing. Latency of the model path: one greedy constrained generation per
utterance (prompt prefix cached, as in the demo), median and p90 in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCORED = ("area", "name", "domain", "brightness", "hours", "minutes", "seconds", "volume_level")


def normalize(slots: dict, expected: dict) -> dict:
    out = {}
    for key in SCORED:
        if key not in slots or (key == "domain" and "domain" not in expected):
            continue
        value = slots[key]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        out[key] = value.strip().lower() if isinstance(value, str) else value
    return out


def correct(intent, slots, row) -> tuple[bool, bool]:
    """(intent right, intent and slots right)."""
    if intent != row["intent"]:
        return False, False
    return True, normalize(slots, row["slots"]) == normalize(row["slots"], row["slots"])


def load_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("text"), str) or "intent" not in row or not isinstance(row.get("slots", {}), dict):
            raise SystemExit(f"error: {path}:{number}: need {{\"text\": str, \"intent\": str|null, \"slots\": {{}}}}")
        row.setdefault("slots", {})
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jsonl", type=Path, nargs="?", default=REPO / "demos/voice_assistant/data/intent_paraphrases.jsonl")
    ap.add_argument("--model", type=Path, default=REPO / ".cache/models/smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/intents.json")
    args = ap.parse_args()

    import edgellm
    from demos.voice_assistant.intent_model import SUPPORTED_INTENTS, IntentModel
    from demos.voice_assistant.intents import CommandRecognizer
    from edgellm.record import Recorder, Table

    rows = load_rows(args.jsonl)
    recorder = Recorder("score_intents", parameters={"jsonl": str(args.jsonl), "model": str(args.model),
                                                     "threads": args.threads, "lines": len(rows)})
    hassil = CommandRecognizer(intents=SUPPORTED_INTENTS)
    llm = edgellm.load(args.model, threads=args.threads)
    started = time.perf_counter()
    model = IntentModel(llm, hassil)
    compile_ms = (time.perf_counter() - started) * 1000
    model.read("hello")  # warm-up (first-call allocations), not scored

    samples = []
    for row in rows:
        t0 = time.perf_counter()
        match = hassil.match(row["text"])
        hassil_ms = (time.perf_counter() - t0) * 1000
        h_intent, h_slots = (match.intent, match.slots) if match else (None, {})
        h_ok = correct(h_intent, h_slots, row) if match else correct(None, {}, row)
        sample = {"text": row["text"], "expected": {"intent": row["intent"], "slots": row["slots"]},
                  "hassil": {"intent": h_intent, "slots": h_slots, "ms": round(hassil_ms, 2)} if match else None}
        if match is not None:
            c_intent, c_slots, c_ok = h_intent, h_slots, h_ok
        else:
            reading = model.read(row["text"])
            c_intent, c_slots = reading.intent, reading.slots
            c_ok = correct(c_intent, c_slots, row)
            sample["model"] = {"intent": c_intent, "slots": c_slots, "raw": reading.raw, "ms": round(reading.ms, 1)}
        sample.update(hassil_ok=h_ok, combined_ok=c_ok)
        samples.append(sample)
        mark = "ok " if c_ok[1] else ("int" if c_ok[0] else "XX ")
        print(f"{mark} {row['text']!r:60} → {c_intent} {c_slots}", flush=True)

    n = len(rows)
    model_ms = [s["model"]["ms"] for s in samples if "model" in s]
    raws = [s["model"]["raw"] for s in samples if "model" in s]
    summary = {
        "lines": n,
        "hassil_matched": sum(s["hassil"] is not None for s in samples),
        "hassil_alone": {"intent_accuracy": sum(s["hassil_ok"][0] for s in samples) / n,
                         "full_accuracy": sum(s["hassil_ok"][1] for s in samples) / n},
        "hassil_plus_model": {"intent_accuracy": sum(s["combined_ok"][0] for s in samples) / n,
                              "full_accuracy": sum(s["combined_ok"][1] for s in samples) / n},
        "model_path_ms": {"median": statistics.median(model_ms) if model_ms else None,
                          "p90": sorted(model_ms)[int(0.9 * (len(model_ms) - 1))] if model_ms else None,
                          "n": len(model_ms)},
        "model_outputs_parsed": sum(_parses(r) for r in raws), "model_outputs": len(raws),
        "schema_compile_ms": round(compile_ms, 1),
    }
    h, c = summary["hassil_alone"], summary["hassil_plus_model"]
    table = Table(["recognizer", "intent right", "intent + slots right", "model path ms (median)"], [
        ["hassil alone", f"{h['intent_accuracy']:.0%}", f"{h['full_accuracy']:.0%}", "–"],
        ["hassil + constrained model", f"{c['intent_accuracy']:.0%}", f"{c['full_accuracy']:.0%}",
         f"{summary['model_path_ms']['median']:.0f}" if model_ms else "–"],
    ], caption=f"{n} utterances from {args.jsonl.name}; hassil matched {summary['hassil_matched']}")
    out = recorder.write(args.out, samples=samples, summary=summary, table=table,
                         extra_versions=("hassil", "home-assistant-intents", "llguidance"))
    print(table.markdown())
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()

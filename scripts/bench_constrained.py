"""Constrained decoding on the default model: what the mask costs, and whether every output is valid.

    python scripts/bench_constrained.py overhead --model .cache/models/smollm2-135m-instruct \
        --out benchmarks/constrained_overhead.json
    python scripts/bench_constrained.py validity --model .cache/models/smollm2-135m-instruct \
        --out benchmarks/constrained_validity.json

overhead: the same prompt decoded free and under a JSON schema, interleaved, R rounds; ms/token of each
(side by side in one process), the mask's own ms/token (llguidance mask + unpacking, measured inside the
generator) as a share of a free decode step, and grammar compile times (cold, cache missed on purpose).
validity: N constrained generations (schemas × sampling settings × seeds): how many parse as JSON and
validate against their schema (jsonschema), and how they ended.
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

PROMPT = [{"role": "user", "content": "Describe a fictional person as JSON: name, age, city, hobbies and whether "
                                      "they have a pet."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
        "has_pet": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "hobbies", "has_pet"],
    "additionalProperties": False,
}
EVENT = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "day": {"enum": ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]},
        "start": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
        "attendees": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 30}, "role": {"enum": ["host", "guest"]}},
            "required": ["name", "role"], "additionalProperties": False}, "maxItems": 3},
        "priority": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["title", "day", "start", "attendees"],
    "additionalProperties": False,
}
VALIDITY_PROMPTS = {
    "person": PROMPT,
    "event": [{"role": "user", "content": "Plan a team meeting next week and give it as JSON."}],
    "intent": [{"role": "user", "content": "Turn the kitchen lights down to forty percent, as JSON."}],
}
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "t0.7_top_k40": dict(temperature=0.7, top_k=40),
    "t1.0_top_p0.9": dict(temperature=1.0, top_p=0.9),
    "t1.3_rep1.2": dict(temperature=1.3, repetition_penalty=1.2),
}


def overhead(args) -> None:
    import edgellm
    from edgellm import SamplingParams
    from edgellm.record import Recorder, Table
    from edgellm.runtime.constraint import GrammarCompiler
    from demos.voice_assistant.intent_model import intent_schema

    recorder = Recorder("bench_constrained_overhead", parameters=vars(args) | {"model": str(args.model)})
    llm = edgellm.load(args.model, threads=args.threads)
    started = time.perf_counter()
    grammars = llm.grammars
    tokenizer_ms = (time.perf_counter() - started) * 1000
    compile_ms: dict[str, list[float]] = {}
    tool_grammar = _tool_grammar()
    sources = {"person_schema": ("json_schema", json.dumps(PERSON)),
               "event_schema": ("json_schema", json.dumps(EVENT)),
               "intent_schema (demo, 14 intents)": ("json_schema", json.dumps(intent_schema())),
               "regex": ("regex", r"(yes|no), [0-9]{1,3} (cats|dogs)\."),
               "tool_grammar (lark, 2 tools)": ("grammar", tool_grammar)}
    for name, (kind, source) in sources.items():
        for _ in range(args.compile_repeats):  # a fresh compiler each time: no cache, cold compile
            fresh = GrammarCompiler(llm.tokenizer, llm.session.vocab_size, sorted(llm.manifest.generation.eos_token_ids))
            compile_ms.setdefault(name, []).append(fresh.compile(kind, source).compile_ms)

    constrained = SamplingParams(json_schema=PERSON, temperature=0.0, max_new_tokens=args.max_new_tokens)
    warm = llm.stream(PROMPT, constrained)  # warm-up: compiles (cached); llguidance builds lexer states lazily
    reply = [token for chunk in warm for token in chunk.token_ids]
    first_use_mask_ms = warm.constraint.mask_ms
    samples: dict[str, list] = {"free_ms_per_token": [], "constrained_ms_per_token": [], "mask_ms_per_token": [],
                                "constrained_tokens": [], "cache_hit_start_ms": []}
    for _ in range(args.rounds):
        llm.reset()
        t0 = time.perf_counter()
        stream = llm.stream(PROMPT, constrained)  # compile is a cache hit here: what a repeated schema costs
        samples["cache_hit_start_ms"].append((time.perf_counter() - t0) * 1000)
        text = "".join(chunk.text for chunk in stream)
        result = stream.result
        json.loads(text)
        samples["constrained_ms_per_token"].append(result.timings.decode_ms_per_token)
        samples["mask_ms_per_token"].append(stream.constraint.mask_ms / stream.constraint.steps)
        samples["constrained_tokens"].append(len(result.token_ids))
        llm.reset()
        free = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=len(result.token_ids),
                                                   ignore_eos=True))
        samples["free_ms_per_token"].append(free.timings.decode_ms_per_token)

    # The mask alone, replayed over the reply's tokens without the model (no other work in the window, so the
    # machine's load shows less): per-token times, every token of every replay.
    import numpy as np
    replay_ms = []
    for _ in range(args.replays):
        state = grammars.start("json_schema", json.dumps(PERSON))
        for token in reply:
            t0 = time.perf_counter()
            allowed = state.allowed()
            replay_ms.append((time.perf_counter() - t0) * 1000)
            assert allowed[token]
            state.advance(token)
    samples["replay_mask_ms"] = replay_ms
    med = {k: statistics.median(v) for k, v in samples.items()}
    replay_mean = float(np.mean(replay_ms))
    summary = {
        "free_ms_per_token": med["free_ms_per_token"],
        "constrained_ms_per_token": med["constrained_ms_per_token"],
        "constrained_over_free": med["constrained_ms_per_token"] / med["free_ms_per_token"],
        "mask_ms_per_token_in_generation": med["mask_ms_per_token"],
        "mask_share_of_free_step_in_generation": med["mask_ms_per_token"] / med["free_ms_per_token"],
        "mask_ms_per_token_replay_mean": replay_mean,
        "mask_ms_per_token_replay_median": med["replay_mask_ms"],
        "mask_share_of_free_step_replay": replay_mean / med["free_ms_per_token"],
        "first_use_mask_ms_total": first_use_mask_ms,
        "tokens_per_reply": med["constrained_tokens"],
        "llguidance_tokenizer_ms": tokenizer_ms,
        "compile_ms_median": {k: statistics.median(v) for k, v in compile_ms.items()},
        "cache_hit_start_ms_median": med["cache_hit_start_ms"],
    }
    rows = [["free decoding", f"{summary['free_ms_per_token']:.1f}", "–", "–", "1.00"],
            ["JSON schema (person)", f"{summary['constrained_ms_per_token']:.1f}",
             f"{summary['mask_ms_per_token_in_generation']:.3f} "
             f"({summary['mask_share_of_free_step_in_generation']:.1%})",
             f"{replay_mean:.3f} ({summary['mask_share_of_free_step_replay']:.1%})",
             f"{summary['constrained_over_free']:.2f}"]]
    table = Table(["decoding", "ms/token (median)", "mask ms/token in generation (share of a free step)",
                   "mask ms/token, replayed (share)", "vs free"], rows,
                  caption=f"{args.rounds} interleaved rounds, {summary['tokens_per_reply']:.0f} tokens per reply")
    out = recorder.write(args.out, samples={"rounds": samples, "compile_ms": compile_ms}, summary=summary,
                         table=table, extra_versions=("llguidance",))
    print(table.markdown())
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


def validity(args) -> None:
    import jsonschema

    import edgellm
    from edgellm import SamplingParams
    from edgellm.record import Recorder, Table
    from demos.voice_assistant.intent_model import intent_schema

    recorder = Recorder("bench_constrained_validity", parameters=vars(args) | {"model": str(args.model)})
    llm = edgellm.load(args.model, threads=args.threads)
    schemas = {"person": PERSON, "event": EVENT, "intent": intent_schema()}
    samples, counts = [], {}
    for seed in range(args.seeds):
        for setting, options in SETTINGS.items():
            for name, schema in schemas.items():
                params = SamplingParams(json_schema=schema, seed=seed, max_new_tokens=args.max_new_tokens, **options)
                result = llm.generate(VALIDITY_PROMPTS[name], params)
                parsed = valid = False
                error = None
                try:
                    value = json.loads(result.text)
                    parsed = True
                    jsonschema.validate(value, schema)
                    valid = True
                except (ValueError, jsonschema.ValidationError) as exc:
                    error = str(exc)[:200]
                samples.append({"schema": name, "setting": setting, "seed": seed, "text": result.text,
                                "finish_reason": result.finish_reason, "tokens": len(result.token_ids),
                                "parsed": parsed, "valid": valid, "error": error})
                counts[result.finish_reason] = counts.get(result.finish_reason, 0) + 1
                print(f"{'ok ' if valid else 'BAD'} {name:7} {setting:14} seed {seed}: {result.text[:90]!r}", flush=True)
    n = len(samples)
    summary = {"generations": n, "parsed": sum(s["parsed"] for s in samples),
               "valid": sum(s["valid"] for s in samples), "finish_reasons": counts,
               "valid_rate": sum(s["valid"] for s in samples) / n,
               "valid_when_finished": (sum(s["valid"] for s in samples if s["finish_reason"] == "stop"),
                                       counts.get("stop", 0)),
               "by_schema": {k: sum(s["valid"] for s in samples if s["schema"] == k) for k in schemas}}
    table = Table(["generations", "parse as JSON", "validate against the schema", "finish_reason stop"],
                  [[n, f"{summary['parsed']} ({summary['parsed'] / n:.1%})",
                    f"{summary['valid']} ({summary['valid_rate']:.1%})", counts.get("stop", 0)]],
                  caption=f"{len(schemas)} schemas × {len(SETTINGS)} sampling settings × {args.seeds} seeds")
    out = recorder.write(args.out, samples=samples, summary=summary, table=table,
                         extra_versions=("llguidance", "jsonschema"))
    print(table.markdown())
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


def _tool_grammar() -> str:
    from edgellm.runtime.tools import ToolSet

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
             {"type": "function", "function": {"name": "set_timer", "parameters": {
                 "type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1}},
                 "required": ["minutes"]}}}]
    return ToolSet.parse(tools).grammar()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["overhead", "validity"])
    ap.add_argument("--model", type=Path, default=REPO / ".cache/models/smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=10, help="overhead: interleaved free/constrained rounds")
    ap.add_argument("--compile-repeats", type=int, default=3)
    ap.add_argument("--replays", type=int, default=50, help="overhead: replays of the reply through the mask alone")
    ap.add_argument("--seeds", type=int, default=17, help="validity: seeds per (schema, setting); 17 → 204 runs")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.out = args.out or REPO / "benchmarks" / f"constrained_{args.what}.json"
    overhead(args) if args.what == "overhead" else validity(args)


if __name__ == "__main__":
    main()

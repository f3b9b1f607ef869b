"""Speculative decoding on held-out prompts: same tokens as plain greedy decoding? how much faster?

    python scripts/bench_speculative.py --teacher .cache/models/smollm2-135m-instruct \
        --draft .cache/models/smollm2-distilled-10l --draft .cache/models/smollm2-distilled-10l-h8k \
        --prompts 20 --threads 1 --out benchmarks/speculative.json

For each prompt, plain and speculative generation run back to back (order alternating), so load
from other processes hits both alike. Reports per-mode total and decode time, the speed-up, the
acceptance rate, and whether every output equals plain greedy decoding token for token.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import edgellm
from edgellm.convert import corpus
from edgellm.record import Recorder
from edgellm.runtime.speculative import SpeculativeConfig, enable_speculation


def run(llm, prompts, params):
    out = []
    for p in prompts:
        llm.reset()  # every prompt from a cold cache, in every mode
        r = llm.generate([{"role": "user", "content": p}], params)
        out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--draft", action="append", default=[],
                    help="draft model folder (same tokenizer); repeat to compare drafts in the same run")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--fixed-k", type=int, default=None, help="no adaptation: always draft this many")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "benchmarks" /
                    "speculative.json", help="results file (edgellm.record)")
    args = ap.parse_args()
    rec = Recorder("bench_speculative", parameters=vars(args))

    prompts = corpus.prompts(corpus.load_split(("chitchat", "chatterbot", "intents")).heldout, args.prompts)
    params = edgellm.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    teacher = edgellm.load(args.teacher, threads=args.threads)
    modes = {"plain": None, "prompt-lookup": "prompt-lookup"}
    drafts = {}
    for folder in args.draft:
        name = "draft:" + Path(folder).name
        drafts[name] = modes[name] = edgellm.load(folder, threads=args.threads)
    config = SpeculativeConfig(max_draft=args.fixed_k, adaptive=False) if args.fixed_k else SpeculativeConfig()

    sessions = {m: enable_speculation(teacher, d, config) for m, d in modes.items() if d is not None}
    raw = teacher.session.target
    results = {m: [[] for _ in range(args.repeats)] for m in modes}
    for mode in modes:  # warm-up, and first estimates for the adaptive sessions
        teacher.session = sessions.get(mode, raw)
        run(teacher, prompts[:2], params)
    # Per prompt, every mode back to back in a rotating order: load from other processes hits all alike.
    for repeat in range(args.repeats):
        for i, prompt in enumerate(prompts):
            names = list(modes)
            shift = (i + repeat) % len(names)
            for mode in names[shift:] + names[:shift]:
                teacher.session = sessions.get(mode, raw)
                results[mode][repeat].extend(run(teacher, [prompt], params))
    teacher.session = raw

    reference = [r.token_ids for r in results["plain"][0]]
    summary = {"threads": args.threads,
               "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "modes": {}}
    plain_total = None
    for mode, runs in results.items():
        identical = all([r.token_ids for r in run_] == reference for run_ in runs)
        same_prompts = sum(r.token_ids == ref for r, ref in zip(runs[0], reference))
        total = statistics.median(sum(r.timings.total_ms for r in run_) for run_ in runs)
        tokens = sum(r.timings.generated_tokens for r in runs[0])
        decode = statistics.median(sum(r.timings.decode_ms_per_token * max(0, r.timings.generated_tokens - 1)
                                       for r in run_) / max(1, tokens - len(run_)) for run_ in runs)
        plain_total = plain_total or total
        entry = {"identical_to_plain": identical, "identical_prompts": same_prompts, "total_ms": round(total, 1), "tokens": tokens,
                 "decode_ms_per_token": round(decode, 2), "speedup_end_to_end": round(plain_total / total, 3)}
        if mode in sessions:
            entry["stats"] = sessions[mode].stats.__dict__
        summary["modes"][mode] = entry
    for name, draft in drafts.items():  # each draft alone, as a model: its decode cost next to the teacher's
        draft_runs = run(draft, prompts, params)
        tokens = sum(max(0, r.timings.generated_tokens - 1) for r in draft_runs)
        summary["modes"][name]["draft_alone_decode_ms_per_token"] = round(
            sum(r.timings.decode_ms_per_token * max(0, r.timings.generated_tokens - 1) for r in draft_runs)
            / max(1, tokens), 2)
    print(json.dumps(summary, indent=1, default=float))
    samples = {mode: [[{"token_ids": r.token_ids, "timings": r.timings} for r in run_] for run_ in runs]
               for mode, runs in results.items()}
    print(f"wrote {rec.write(args.out, samples=samples, summary=summary)}")


if __name__ == "__main__":
    main()

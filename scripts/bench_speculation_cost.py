"""Speculation never costs: decode with a drafter vs plain decoding, side by side, on every kind of prompt.

    python scripts/bench_speculation_cost.py -m .cache/models/smollm2-135m-instruct --draft prompt-lookup \
        --threads 2 --out benchmarks/speculation_cost.json

The model is loaded once, and three sessions share its weights and KV cache: plain decoding, the
drafter (its controller learns across requests, as in an app), and the drafter with its cost model alone
(no realized-rate veto). Sharing one copy matters: three loaded copies sit in different memory (huge pages
or not, cache placement) and differ by a few percent on their own, as much as the goal's margin. For
each round and prompt type (chat, code, repetition, long context, edit-a-quote), all three generate the
same number of greedy tokens (EOS ignored) back to back, in a rotating order, from a cold cache. The figure is each prompt type's median over rounds of
decode ms/token with the drafter / without it (goal: <= 1.02 everywhere), plus the controller's stats.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import edgellm
from edgellm.record import Recorder, Table
from edgellm.runtime.speculative import ModelDrafter, PromptLookupDrafter, SpeculativeSession

HERE = Path(__file__).resolve().parent.parent


def prompts() -> dict[str, str]:
    heldout = (HERE / "edgellm" / "data" / "heldout_en.txt").read_text(encoding="utf-8")
    long_text = " ".join(heldout.split()[:700])
    return {
        "chat": "Give me three short tips for staying focused while working from home.",
        "code": "Write a Python function that returns the n-th Fibonacci number, with a docstring and a test.",
        "repetition": "Repeat this sentence five times, one per line: the quick brown fox jumps over the lazy dog.",
        "long-context": long_text + "\n\nSummarize the text above in three sentences.",
        "edit-quote": ("Fix the spelling in this paragraph and give it back in full: Teh weather was nice yesterday, "
                       "so we whent to the park and had a picnick with our freinds. Everyone brougt some food."),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=".cache/models/smollm2-135m-instruct")
    parser.add_argument("--draft", default="prompt-lookup", help="'prompt-lookup' or a draft model folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/speculation_cost.json")
    args = parser.parse_args()
    recorder = Recorder("bench_speculation_cost", parameters=vars(args))

    llm = edgellm.load(args.model, threads=args.threads)
    target = llm.session

    def speculative() -> SpeculativeSession:  # what load(..., draft=) builds, on the shared target
        if args.draft == "prompt-lookup":
            return SpeculativeSession(target, PromptLookupDrafter())
        draft = edgellm.load(args.draft, threads=args.threads, spin=False)  # as load(..., draft=DIR) loads it
        return SpeculativeSession(target, ModelDrafter(draft.session, llm.manifest.generation.eos_token_ids))

    drafted = speculative()
    unguarded = speculative()  # "before": the cost model alone (no realized-rate guard)
    unguarded._realized_says_no = lambda: False
    params = edgellm.SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    cases = {name: [{"role": "user", "content": text}] for name, text in prompts().items()}
    ids = {name: llm.encode(messages) for name, messages in cases.items()}
    modes = {"plain": target, "draft": drafted, "draft_unguarded": unguarded}

    def run(mode: str, name: str) -> float:
        with llm._lock:  # as enable_speculation / disable_speculation swap it
            llm.session = modes[mode]
        llm.reset()
        result = llm.generate(ids[name], params)
        return result.timings.decode_ms_per_token

    for name in cases:  # warm-up; the drafter's controller starts learning here, as it would in an app
        for mode in modes:
            run(mode, name)
    samples: dict[str, dict[str, list[float]]] = {
        n: {"plain": [], "draft": [], "draft_unguarded": [], "ratio": [], "ratio_unguarded": []} for n in cases}
    order = list(modes)
    for r in range(args.rounds):
        for i, name in enumerate(cases):
            shift = (r + i) % len(order)
            got = {mode: run(mode, name) for mode in order[shift:] + order[:shift]}
            for mode, value in got.items():
                samples[name][mode].append(value)
            samples[name]["ratio"].append(got["draft"] / got["plain"])
            samples[name]["ratio_unguarded"].append(got["draft_unguarded"] / got["plain"])
        print(f"round {r + 1}/{args.rounds} load {os.getloadavg()[0]:.1f}: " + ", ".join(
            f"{n} {s['ratio'][-1]:.3f} (unguarded {s['ratio_unguarded'][-1]:.3f})" for n, s in samples.items()))

    summary = {}
    rows = []
    for name, s in samples.items():
        ratio, before = statistics.median(s["ratio"]), statistics.median(s["ratio_unguarded"])
        summary[name] = {"plain_ms_per_token": round(statistics.median(s["plain"]), 2),
                         "draft_ms_per_token": round(statistics.median(s["draft"]), 2),
                         "draft_over_plain_median": round(ratio, 3), "within_1_02": ratio <= 1.02,
                         # the mean counts the rare costly round (a probe that catches a draft model up) in full
                         "draft_over_plain_mean": round(statistics.fmean(s["ratio"]), 3),
                         "unguarded_over_plain_median": round(before, 3)}
        rows.append([name, summary[name]["plain_ms_per_token"], summary[name]["draft_ms_per_token"], round(ratio, 3),
                     round(before, 3)])
    stats = drafted.stats
    summary["controller"] = stats
    summary["controller_unguarded"] = unguarded.stats
    table = Table(["prompt", "plain ms/token", f"--draft {args.draft} ms/token", "draft / plain (median of rounds)",
                   "cost model alone (no realized-rate veto) / plain"],
                  rows)  # no caption: docs paste the bare table
    recorder.write(args.out, samples=samples, summary=summary, table=table,
                   notes=f"{llm.manifest.name} {llm.manifest.precision}, {args.threads} threads, "
                         f"{args.new_tokens} greedy tokens, {args.rounds} rounds; one loaded copy shared by the "
                         "three sessions")
    print(table.markdown())
    print(stats)


if __name__ == "__main__":
    main()

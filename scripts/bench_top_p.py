"""top_p without top_k: the old 200-candidate cap vs the exact sampler, side by side on real logits.

    python scripts/bench_top_p.py -m models/smollm2-135m-instruct --out benchmarks/top_p.json

The old sampler silently narrowed top_p to the 200 most likely tokens; the exact one sorts the
top 64, 256, ... until they hold top_p of the mass. Both are timed on the same logits (64 decode
steps of the model's own greedy reply, at temperatures 0.7 and 1.0), interleaved. Also written: how
often the exact nucleus has more than 200 tokens (where the cap changed the distribution) and the
probability mass the cap cut off there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import edgellm
from edgellm.record import Recorder, Table
from edgellm.runtime import measure
from edgellm.runtime.sampling import ResolvedSampling, Sampler

QUESTION = "Write a short story about a lighthouse keeper."


def capped(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The previous sampler's path for top_p alone (argpartition to 200, sort, softmax, cut)."""
    k = 200
    candidates = np.argpartition(logits, -k)[-k:]
    scores = logits[candidates].astype(np.float64) / temperature
    order = np.argsort(-scores)
    candidates, scores = candidates[order], scores[order]
    probs = np.exp(scores - scores[0])
    probs /= probs.sum()
    cutoff = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
    candidates, probs = candidates[:cutoff], probs[:cutoff] / probs[:cutoff].sum()
    return int(candidates[rng.choice(len(candidates), p=probs)])


def nucleus(logits: np.ndarray, temperature: float, top_p: float) -> tuple[int, float]:
    """Exact nucleus size and the mass outside the top 200."""
    p = np.exp((logits.astype(np.float64) - logits.max()) / temperature)
    p /= p.sum()
    order = np.sort(p)[::-1]
    return int(np.searchsorted(np.cumsum(order), top_p)) + 1, float(order[200:].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--out", default="benchmarks/top_p.json")
    args = parser.parse_args()
    recorder = Recorder("bench_top_p", parameters=vars(args))

    llm = edgellm.load(args.model)
    ids = llm.encode([{"role": "user", "content": QUESTION}])
    logits_rows = list(measure.greedy(llm.session, ids, args.steps, record=True).logits)  # a greedy reply's rows

    samples: dict[str, dict[str, list[float]]] = {}
    summary: dict[str, dict] = {}
    rows = []
    for temperature in (0.7, 1.0):
        exact = Sampler(ResolvedSampling(max_new_tokens=1, temperature=temperature, top_k=None, top_p=args.top_p,
                                         repetition_penalty=None, seed=0, stop=()))
        rng = np.random.default_rng(0)
        timings: dict[str, list[float]] = {"capped_200_us": [], "exact_us": []}
        for _ in range(args.repeats):  # interleaved: both see the same machine load
            for row in logits_rows:
                start = time.perf_counter()
                capped(row, temperature, args.top_p, rng)
                timings["capped_200_us"].append((time.perf_counter() - start) * 1e6)
                start = time.perf_counter()
                exact(row, [])
                timings["exact_us"].append((time.perf_counter() - start) * 1e6)
        sizes = [nucleus(row, temperature, args.top_p) for row in logits_rows]
        over = [s for s in sizes if s[0] > 200]
        key = f"temperature_{temperature}"
        samples[key] = {**timings, "nucleus_sizes": [s[0] for s in sizes]}
        med = {name: statistics.median(values) for name, values in timings.items()}
        summary[key] = {**{f"median_{k}": round(v, 1) for k, v in med.items()},
                        "exact_over_capped": round(med["exact_us"] / med["capped_200_us"], 3),
                        "steps_with_nucleus_over_200": len(over), "steps": len(sizes),
                        "max_mass_cut_by_cap": round(max((s[1] for s in over), default=0.0), 4)}
        rows.append([temperature, round(med["capped_200_us"], 1), round(med["exact_us"], 1),
                     f"{len(over)}/{len(sizes)}", round(summary[key]["max_mass_cut_by_cap"], 4)])
    table = Table(["temperature", "capped at 200 (µs/token)", "exact (µs/token)", "steps where nucleus > 200",
                   "largest mass the cap cut"], rows, caption=f"top_p={args.top_p} alone, {llm.manifest.name}")
    recorder.write(args.out, samples=samples, summary=summary, table=table)
    print(table.markdown())


if __name__ == "__main__":
    main()

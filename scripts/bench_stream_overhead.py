"""What `LLM.stream()` costs per token beyond the model: stream vs the bare session, side by side in one process.

    python scripts/bench_stream_overhead.py -m .cache/models/smollm2-135m-instruct --threads 1,2 \
        --out benchmarks/stream_overhead.json

The model is loaded once per thread count (--threads 1,2: both in this one process). Every round runs,
for each thread count, interleaved and in a rotating order, on the same prompt token ids (the bench chat
request) and the same number of new tokens (EOS ignored):

  probe      edgellm.runtime.measure.greedy on the bare DecoderSession (argmax, no text): the floor
  stream     LLM.stream() greedy, every chunk consumed (sampling, detokenizing, stop matching, chunks)
  stream+stop  the same with two stop strings that never match (stop matching holds text back each token)
  sampled    LLM.stream() with temperature 0.7, top_k 40, top_p 0.9, repetition_penalty 1.1, seed 0

The time inside onnxruntime (run_with_iobinding) is clocked apart in every run, so "outside the model,
ms/token" = (wall - time in onnxruntime) / tokens: the generator's own cost. Its CPU twin counts the calling
thread's CPU time (time.thread_time) outside onnxruntime: what the Python side costs, which machine load
(time the process waits for a core) does not inflate. Decode ms/token is stream timing's own definition (first token to last).

The goal column, "× bench graph-only decode", is each path's decode ms/token over the probe's at the same
thread count (`edgellm bench` reports the probe as "decode, graph only"): streaming should stay within
1.15x of it, i.e. spend at most ~0.6 ms per token outside the model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import edgellm
from edgellm.bench import BENCH_MESSAGES
from edgellm.record import Recorder, Table
from edgellm.runtime import measure


class ClockedSession:
    """Wraps onnxruntime's InferenceSession; adds up the seconds spent in run_with_iobinding."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # this thread's CPU time inside onnxruntime
        self.calls = 0

    def run_with_iobinding(self, binding, *args):
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return self.inner.run_with_iobinding(binding, *args)
        finally:
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.thread_time() - cpu
            self.calls += 1

    def __getattr__(self, name):
        return getattr(self.inner, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=".cache/models/smollm2-135m-instruct")
    parser.add_argument("--threads", default="1,2", help="comma list; each thread count gets its own model")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default="benchmarks/stream_overhead.json")
    args = parser.parse_args()
    recorder = Recorder("bench_stream_overhead", parameters=vars(args))

    thread_counts = [int(t) for t in str(args.threads).split(",")]
    n = args.new_tokens
    greedy = edgellm.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    stops = edgellm.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True,
                                   stop=("<never-stop-1>", "\n\nUser:::"))
    sampled = edgellm.SamplingParams(max_new_tokens=n, temperature=0.7, top_k=40, top_p=0.9,
                                     repetition_penalty=1.1, seed=0, ignore_eos=True)
    variants, clocks = {}, {}
    for threads in thread_counts:
        llm = edgellm.load(args.model, threads=threads)
        clock = ClockedSession(llm.session.session)
        llm.session.session = clock
        ids = llm.encode(BENCH_MESSAGES)

        def probe(llm=llm, ids=ids) -> float:
            return measure.greedy(llm.session, ids, n).decode_ms_per_token

        def streamed(params, llm=llm, ids=ids):
            def go() -> float:
                llm.reset()
                stream = llm.stream(ids, params)
                for _ in stream:
                    pass
                t = stream.result.timings
                if t.generated_tokens != n:
                    raise RuntimeError(f"made {t.generated_tokens} tokens, not {n}")
                return t.decode_ms_per_token
            return go

        for name, fn in (("probe", probe), ("stream", streamed(greedy)), ("stream+stop", streamed(stops)),
                         ("sampled", streamed(sampled))):
            variants[(threads, name)] = fn
            clocks[(threads, name)] = clock
    for fn in variants.values():  # warm-up
        fn()
    key = lambda k: f"{k[1]} @{k[0]}t"  # noqa: E731
    samples = {key(k): {"decode_ms_per_token": [], "outside_model_ms_per_token": [],
                        "outside_model_cpu_ms_per_token": [], "wall_ms": []} for k in variants}
    names = list(variants)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            clock = clocks[k]
            before, cpu_before = clock.seconds, clock.cpu_seconds
            start, cpu = time.perf_counter(), time.thread_time()
            decode = variants[k]()
            wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
            inside, cpu_inside = clock.seconds - before, clock.cpu_seconds - cpu_before
            s = samples[key(k)]
            s["decode_ms_per_token"].append(decode)
            s["outside_model_ms_per_token"].append((wall - inside) * 1000 / n)
            s["outside_model_cpu_ms_per_token"].append((cpu - cpu_inside) * 1000 / n)
            s["wall_ms"].append(wall * 1000)
        print(f"round {r + 1}/{args.rounds} load {os.getloadavg()[0]:.1f}: " + ", ".join(
            f"{k} {v['decode_ms_per_token'][-1]:.2f}" for k, v in samples.items()))

    med = {k: {m: statistics.median(v) for m, v in s.items()} for k, s in samples.items()}
    summary = {}
    for threads, name in variants:
        m = med[key((threads, name))]
        base = med[key((threads, "probe"))]["decode_ms_per_token"]
        # Per round, this path over the probe of the same round (both in the same stretch of machine load).
        ratios = [a / b for a, b in zip(samples[key((threads, name))]["decode_ms_per_token"],
                                        samples[key((threads, "probe"))]["decode_ms_per_token"])]
        summary[key((threads, name))] = {
            "threads": threads, "path": name,
            "decode_ms_per_token_median": round(m["decode_ms_per_token"], 3),
            "outside_model_ms_per_token_median": round(m["outside_model_ms_per_token"], 3),
            "outside_model_cpu_ms_per_token_median": round(m["outside_model_cpu_ms_per_token"], 3),
            "decode_vs_probe": round(m["decode_ms_per_token"] / base, 3),
            "decode_vs_probe_median_of_rounds": round(statistics.median(ratios), 3),
            "within_1_15": statistics.median(ratios) <= 1.15}
    rows = [[v["path"], v["threads"], v["decode_ms_per_token_median"], v["decode_vs_probe_median_of_rounds"],
             v["outside_model_ms_per_token_median"], v["outside_model_cpu_ms_per_token_median"]]
            for v in summary.values()]
    table = Table(["path", "threads", "decode ms/token (median)", "× bench graph-only decode (median of rounds)",
                   "outside the model, wall ms/token", "outside the model, CPU ms/token"], rows)
    setting = (f"{llm.manifest.name} {llm.manifest.precision}, threads {args.threads}, {len(ids)}-token prompt, "
               f"{n} tokens, {args.rounds} interleaved rounds. ")
    recorder.write(args.out, samples=samples, summary=summary, table=table,
                   notes=setting + "outside_model = wall (or the calling thread's CPU time) minus the same inside "
                                   "onnxruntime's run_with_iobinding, per generated token; the ratio is per round, "
                                   "this path over the probe at the same thread count")
    print(table.markdown())


if __name__ == "__main__":
    main()

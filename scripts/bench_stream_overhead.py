"""What `LLM.stream()` costs per token beyond the model: stream vs the bare session, side by side in one process.

    python scripts/bench_stream_overhead.py -m .cache/models/smollm2-135m-instruct --threads 2 \
        --out benchmarks/stream_overhead.json

Every round runs, interleaved and in a rotating order, on the same prompt token ids (the bench chat
request) and the same number of new tokens (EOS ignored):

  probe      edgellm.runtime.measure.greedy on the bare DecoderSession (argmax, no text): the floor
  stream     LLM.stream() greedy, every chunk consumed (sampling, detokenizing, stop matching, chunks)
  stream+stop  the same with two stop strings that never match (stop matching holds text back each token)
  sampled    LLM.stream() with temperature 0.7, top_k 40, top_p 0.9, repetition_penalty 1.1, seed 0

The time inside onnxruntime (run_with_iobinding) is clocked apart in every run, so "outside the model,
ms/token" = (wall - time in onnxruntime) / tokens: the generator's own cost. Its CPU twin counts the calling
thread's CPU time (time.thread_time) outside onnxruntime: what the Python side costs, which machine load
(time the process waits for a core) does not inflate. Decode ms/token is stream timing's own definition (first token to last).
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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default="benchmarks/stream_overhead.json")
    args = parser.parse_args()
    recorder = Recorder("bench_stream_overhead", parameters=vars(args))

    llm = edgellm.load(args.model, threads=args.threads)
    clock = ClockedSession(llm.session.session)
    llm.session.session = clock
    ids = llm.encode(BENCH_MESSAGES)
    n = args.new_tokens
    greedy = edgellm.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    stops = edgellm.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True,
                                   stop=("<never-stop-1>", "\n\nUser:::"))
    sampled = edgellm.SamplingParams(max_new_tokens=n, temperature=0.7, top_k=40, top_p=0.9,
                                     repetition_penalty=1.1, seed=0, ignore_eos=True)
    def probe() -> tuple[float, float]:
        run = measure.greedy(llm.session, ids, n)
        return run.decode_ms_per_token, run.prefill_ms + run.decode_ms

    def streamed(params):
        def go() -> tuple[float, float]:
            llm.reset()
            stream = llm.stream(ids, params)
            for _ in stream:
                pass
            t = stream.result.timings
            if t.generated_tokens != n:
                raise RuntimeError(f"made {t.generated_tokens} tokens, not {n}")
            return t.decode_ms_per_token, t.total_ms
        return go

    variants = {"probe": probe, "stream": streamed(greedy), "stream+stop": streamed(stops),
                "sampled": streamed(sampled)}
    for fn in variants.values():  # warm-up
        fn()
    samples = {name: {"decode_ms_per_token": [], "outside_model_ms_per_token": [],
                      "outside_model_cpu_ms_per_token": [], "wall_ms": []} for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            before, cpu_before = clock.seconds, clock.cpu_seconds
            start, cpu = time.perf_counter(), time.thread_time()
            decode, _ = variants[name]()
            wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
            inside, cpu_inside = clock.seconds - before, clock.cpu_seconds - cpu_before
            s = samples[name]
            s["decode_ms_per_token"].append(decode)
            s["outside_model_ms_per_token"].append((wall - inside) * 1000 / n)
            s["outside_model_cpu_ms_per_token"].append((cpu - cpu_inside) * 1000 / n)
            s["wall_ms"].append(wall * 1000)
        print(f"round {r + 1}/{args.rounds} load {os.getloadavg()[0]:.1f}: " + ", ".join(
            f"{k} {v['decode_ms_per_token'][-1]:.2f}" for k, v in samples.items()))

    med = {k: {m: statistics.median(v) for m, v in s.items()} for k, s in samples.items()}
    base = med["probe"]["decode_ms_per_token"]
    summary = {k: {"decode_ms_per_token_median": round(m["decode_ms_per_token"], 3),
                   "outside_model_ms_per_token_median": round(m["outside_model_ms_per_token"], 3),
                   "outside_model_cpu_ms_per_token_median": round(m["outside_model_cpu_ms_per_token"], 3),
                   "decode_vs_probe": round(m["decode_ms_per_token"] / base, 3)} for k, m in med.items()}
    rows = [[k, v["decode_ms_per_token_median"], v["decode_vs_probe"], v["outside_model_ms_per_token_median"],
             v["outside_model_cpu_ms_per_token_median"]] for k, v in summary.items()]
    table = Table(["path", "decode ms/token (median)", "× bare session", "outside the model, wall ms/token",
                   "outside the model, CPU ms/token"], rows)  # no caption: docs paste the bare table
    setting = (f"{llm.manifest.name} {llm.manifest.precision}, {args.threads} threads, {len(ids)}-token prompt, "
               f"{n} tokens, {args.rounds} interleaved rounds. ")
    recorder.write(args.out, samples=samples, summary=summary, table=table,
                   notes=setting + "outside_model = wall (or the calling thread's CPU time) minus the same inside "
                                   "onnxruntime's run_with_iobinding, per generated token")
    print(table.markdown())


if __name__ == "__main__":
    main()

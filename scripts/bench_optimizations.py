"""Before/after figures for each runtime optimization, measured side by side in one process.

    python scripts/bench_optimizations.py --int8 models/smollm2-135m-instruct --fp32 /tmp/fp32-model

Rows (all greedy, same prompt, medians of interleaved repeats):
- fp32 vs int8 weights (same runtime);
- a plain `session.run` loop with numpy feeds and a KV cache that grows by concatenation
  (what a first ONNX loop looks like) vs IO binding with the in-place KV buffers we use;
- prefill computing logits for every prompt position vs only the last (`num_logits_to_keep`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort

from edgellm.manifest import read_manifest
from edgellm.runtime import measure
from edgellm.runtime.generator import PREFILL_CHUNK
from edgellm.runtime.session import DecoderSession

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
          2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def plain_loop(path, manifest, threads: int, steps: int, prompt: list[int]) -> tuple[float, float]:
    """session.run with dict feeds; past grows by concatenation each step (allocates every token)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    io, d = manifest.io, manifest.dims
    empty = np.zeros((1, d.num_kv_heads, 0, d.head_dim), np.float32)
    past = {name: empty for name in io.past_key + io.past_value}
    outputs = list(io.outputs)

    def run(ids, total, keep):
        feed = {io.input_ids: np.array([ids], np.int64), io.attention_mask: np.ones((1, total), np.int64),
                io.num_logits_to_keep: np.array(keep, np.int64), **past}
        result = session.run(outputs, feed)
        for name, value in zip(io.past_key + io.past_value, result[1:]):
            past[name] = value
        return result[0][0, -1]

    start = time.perf_counter()
    logits = run(prompt, len(prompt), 1)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    total = len(prompt)
    for _ in range(steps):
        total += 1
        logits = run([int(logits.argmax())], total, 1)
    return ttft * 1000, (time.perf_counter() - start) * 1000 / steps


def bound_loop(session: DecoderSession, steps: int, prompt: list[int], keep_all: bool = False) -> tuple[float, float]:
    """The shipped path (edgellm.runtime.measure.greedy: the runtime's chunked prefill, then one-token steps);
    keep_all: the same prefill chunks, but each computing logits for all its positions."""
    if not keep_all:
        run = measure.greedy(session, prompt, steps + 1)
        return run.prefill_ms, run.decode_ms_per_token
    session.truncate(0)
    start = time.perf_counter()
    for i in range(0, len(prompt), PREFILL_CHUNK):
        chunk = prompt[i:i + PREFILL_CHUNK]
        session.forward(chunk, keep=len(chunk))
    ttft = (time.perf_counter() - start) * 1000
    run = measure.greedy(session, prompt, steps + 1, reuse_cache=True)  # recomputes only the last prompt token
    return ttft, run.decode_ms_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--int8", required=True)
    parser.add_argument("--fp32", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--context", type=int, default=len(PROMPT),
                        help="prompt tokens (the chat prompt repeated): per-step costs that grow with context show here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    prompt = (PROMPT * (args.context // len(PROMPT) + 1))[:args.context]
    capacity = args.context + args.steps + 8

    manifests = {k: read_manifest(p) for k, p in (("int8", args.int8), ("fp32", args.fp32))}
    paths = {k: f"{p}/model.onnx" for k, p in (("int8", args.int8), ("fp32", args.fp32))}
    sessions = {k: DecoderSession(paths[k], m.io, m.dims, capacity, threads=args.threads, graph=m.graph)
                for k, m in manifests.items()}
    cases = {
        "fp32, plain session.run loop": lambda: plain_loop(paths["fp32"], manifests["fp32"], args.threads, args.steps, prompt),
        "fp32, IO binding + in-place KV": lambda: bound_loop(sessions["fp32"], args.steps, prompt),
        "int8, plain session.run loop": lambda: plain_loop(paths["int8"], manifests["int8"], args.threads, args.steps, prompt),
        "int8, IO binding + in-place KV": lambda: bound_loop(sessions["int8"], args.steps, prompt),
        "int8, prefill logits for all positions": lambda: bound_loop(sessions["int8"], args.steps, prompt, keep_all=True),
    }
    for run in cases.values():  # warm-up
        run()
    samples = {name: ([], []) for name in cases}
    for _ in range(args.repeats):
        for name, run in cases.items():
            ttft, decode = run()
            samples[name][0].append(ttft)
            samples[name][1].append(decode)
    rows = {name: {"ttft_ms": round(statistics.median(t), 2), "decode_ms_per_token": round(statistics.median(d), 2)}
            for name, (t, d) in samples.items()}
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{len(prompt)}-token prompt, {args.steps} greedy steps, {args.threads} threads, medians of {args.repeats}")
    print(f"| {'variant':<40} | TTFT ms | decode ms/token |")
    print(f"| {'-' * 40} | ------- | --------------- |")
    for name, row in rows.items():
        print(f"| {name:<40} | {row['ttft_ms']:7.1f} | {row['decode_ms_per_token']:15.2f} |")


if __name__ == "__main__":
    main()

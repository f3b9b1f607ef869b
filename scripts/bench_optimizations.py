"""Before/after figures for each runtime optimization, measured side by side in one process.

    python scripts/bench_optimizations.py --int8 INT8_DIR --fp32 FP32_DIR --contexts 37,1024 \
        --out benchmarks/optimizations.json

Rows (all greedy, same prompt, medians of interleaved repeats; every session, baseline or not, is
created once and warmed up before timing, so no row pays a first run):
- fp32 vs int8 weights (same runtime);
- a plain `session.run` loop with numpy feeds and a KV cache that grows by concatenation
  (what a first ONNX loop looks like) vs IO binding with the in-place KV buffers we use;
- prefill computing logits for every prompt position vs only the last (`num_logits_to_keep`).
TTFT here is the prefill of the prompt token ids (no template, no tokenizer). The plain loop
prefills the prompt in one call, the shipped path in the runtime's 64-token chunks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgellm.manifest import read_manifest
from edgellm.record import Recorder, Table
from edgellm.runtime import measure
from edgellm.runtime.generator import PREFILL_CHUNK
from edgellm.runtime.session import DecoderSession

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
          2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


class PlainLoop:
    """session.run with dict feeds; past grows by concatenation each step (allocates every token).
    The session is created once (same options as the runtime's) and reused, like the shipped path's."""

    def __init__(self, path: str, manifest, threads: int) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.io, self.dims = manifest.io, manifest.dims

    def __call__(self, steps: int, prompt: list[int]) -> tuple[float, float]:
        io, d = self.io, self.dims
        empty = np.zeros((1, d.num_kv_heads, 0, d.head_dim), np.float32)
        past = {name: empty for name in io.past_key + io.past_value}
        outputs = list(io.outputs)

        def run(ids, total, keep):
            feed = {io.input_ids: np.array([ids], np.int64), io.attention_mask: np.ones((1, total), np.int64),
                    io.num_logits_to_keep: np.array(keep, np.int64), **past}
            result = self.session.run(outputs, feed)
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
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contexts", default=str(len(PROMPT)),
                        help="comma list of prompt lengths (the chat prompt repeated): per-step costs that grow "
                             "with context show at the long ones")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "benchmarks" /
                        "optimizations.json", help="results file (edgellm.record)")
    args = parser.parse_args()
    rec = Recorder("bench_optimizations", parameters=vars(args))
    contexts = [int(c) for c in args.contexts.split(",")]
    capacity = max(contexts) + args.steps + 8

    manifests = {k: read_manifest(p) for k, p in (("int8", args.int8), ("fp32", args.fp32))}
    paths = {k: f"{p}/model.onnx" for k, p in (("int8", args.int8), ("fp32", args.fp32))}
    sessions = {k: DecoderSession(paths[k], m.io, m.dims, capacity, threads=args.threads, graph=m.graph)
                for k, m in manifests.items()}
    plain = {k: PlainLoop(paths[k], manifests[k], args.threads) for k in manifests}
    cases = {
        "fp32, plain `session.run` loop, KV grown by concatenation": lambda p: plain["fp32"](args.steps, p),
        "fp32, IO binding + in-place KV buffers": lambda p: bound_loop(sessions["fp32"], args.steps, p),
        "int8, plain `session.run` loop": lambda p: plain["int8"](args.steps, p),
        "**int8, IO binding + in-place KV buffers (what we ship)**": lambda p: bound_loop(sessions["int8"], args.steps, p),
        "int8, prefill computes logits for every position (no `num_logits_to_keep`)":
            lambda p: bound_loop(sessions["int8"], args.steps, p, keep_all=True),
    }
    samples = {c: {name: {"ttft_ms": [], "decode_ms_per_token": []} for name in cases} for c in contexts}
    for context in contexts:
        prompt = (PROMPT * (context // len(PROMPT) + 1))[:context]
        for run in cases.values():  # warm-up: every session has run this context once before timing
            run(prompt)
        for _ in range(args.repeats):
            for name, run in cases.items():
                ttft, decode = run(prompt)
                samples[context][name]["ttft_ms"].append(ttft)
                samples[context][name]["decode_ms_per_token"].append(decode)
        print(f"[{context} tokens] done, loadavg {os.getloadavg()[0]:.1f}", file=sys.stderr)
    summary = {c: {name: {k: round(statistics.median(v), 2) for k, v in row.items()} for name, row in rows.items()}
               for c, rows in samples.items()}
    columns = ["variant"] + [f"{c}-token context: TTFT ms / decode ms/token" for c in contexts]
    body = [[name] + [f"{summary[c][name]['ttft_ms']:.1f} / {summary[c][name]['decode_ms_per_token']:.2f}"
                      for c in contexts] for name in cases]
    table = Table(columns, body)
    path = rec.write(args.out, samples=samples, summary=summary, table=table)
    print(table.markdown())
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

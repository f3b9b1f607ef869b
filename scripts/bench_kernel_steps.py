#!/usr/bin/env python
"""What each step of the kernel graph buys: decode and prompt time, one optimization at a time, side by side.

    python scripts/bench_kernel_steps.py --model .cache/models/smollm2-135m-instruct --threads 1,2 \
        --out benchmarks/kernel_steps.json

Any int8 CPU folder, a --draft-head one included (its logits cover the head's tokens only).

Variants of the same int8 folder, each built from its model.onnx with the functions convert uses
(edgellm/convert/kernel_graph.py, fuse_layers.py, half_scales.py) into a scratch copy of the folder:

  onnxruntime      model.onnx: MatMulNBits, GroupQueryAttention, onnxruntime's kernels (the "before")
  MatMulQ8         every 8-bit MatMulNBits as ai.edgellm.MatMulQ8 (edgellm's int8 kernel; the op takes its block
                   scales as fp16, so this step includes them: 143 MB read per token instead of 151)
  + Q8Mlp          each layer's o_proj .. next-norm tail folded into one node (11 nodes a layer become 3)
  + CachedAttention  GroupQueryAttention as edgellm's attention op
  + huge pages     the same graph with its weights copied into 2 MB pages at load (edgellm/kernels/weight_arena.h);
                   every variant before this one runs with EDGELLM_KERNEL_HUGEPAGES=0
  + packed tiles   the same graph with its weights packed at load into 16-row tiles with inline scales (q8_kernel.c,
                   PACK_PAIR); every variant before this one runs with EDGELLM_KERNEL_PACK=0
  + Q8Layer        each layer's qkv MatMulQ8, CachedAttention and Q8Mlp as one node (3 nodes a layer become 1),
                   each of its four matmuls handed to the intra-op pool on its own
  + one region     the same graph, a decode step's layer handed to the pool once (ort_op.cc, LayerStep);
                   every variant before this one runs with EDGELLM_KERNEL_LAYER_REGION=0
  + prefetch       the same graph, the packed kernels prefetching the weight stream 4352 bytes ahead of a decode
                   step (simd_avx512.h, edgellm_prefetch_distance): the shipped default on Intel CPUs; on AMD's the
                   default is no prefetch, so there "+ one region" is what load runs. Every variant before this one
                   runs with EDGELLM_KERNEL_PREFETCH=0

Each (variant, thread count) runs in a fresh process of its own (no two sessions share a process or
its caches), in a rotating order every round: edgellm.runtime.measure.decode_probe on the bare
DecoderSession, the bench chat request (38 tokens) prefilled, then --steps greedy tokens, --probes
times per process. Medians over all probes of all rounds; "× onnxruntime" is the ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edgellm.record import Recorder, Table  # noqa: E402

VARIANTS = ("onnxruntime", "MatMulQ8", "+ Q8Mlp", "+ CachedAttention", "+ huge pages", "+ packed tiles", "+ Q8Layer",
            "+ one region", "+ prefetch")
HUGEPAGES_FROM = "+ huge pages"  # the first variant that places its weights in huge pages
PACKED_FROM = "+ packed tiles"  # the first variant whose weights are packed into the kernel's own layout
REGION_FROM = "+ one region"  # the first variant whose decode step hands each layer to the pool once
PREFETCH_FROM = "+ prefetch"  # the first variant whose kernels prefetch the weight stream
PREFETCH_BYTES = "4352"  # its distance: the default on Intel CPUs (AMD's default is 0)


def build_variants(folder: Path) -> dict[str, str | None]:
    """Write each variant's graph into `folder`; {variant: graph file, None for model.onnx}."""
    import onnx

    from edgellm.convert.fuse_layers import fuse_decoder_layers, fuse_layer_nodes, replace_attention
    from edgellm.convert.half_scales import halve_scales
    from edgellm.convert.kernel_graph import build_kernel_graph

    source = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    twin = build_kernel_graph(source, fuse=False, rewrite=False)[0]  # then each step by hand
    files: dict[str, str | None] = {"onnxruntime": None}
    halve_scales(twin, folder)
    steps = [("MatMulQ8", None), ("+ Q8Mlp", fuse_decoder_layers), ("+ CachedAttention", replace_attention)]
    for index, (name, step) in enumerate(steps):
        if step is not None:
            step(twin.graph)
        file = f"variant{index}.onnx"
        (folder / file).write_bytes(twin.SerializeToString())
        files[name] = file
    files[HUGEPAGES_FROM] = files[PACKED_FROM] = files["+ CachedAttention"]
    fuse_layer_nodes(twin.graph)
    (folder / "variant3.onnx").write_bytes(twin.SerializeToString())
    files["+ Q8Layer"] = files[REGION_FROM] = files[PREFETCH_FROM] = "variant3.onnx"
    return files


def worker(folder: str, graph: str | None, threads: int, prompt: list[int], steps: int, probes: int) -> None:
    from edgellm.manifest import read_manifest
    from edgellm.runtime import measure
    from edgellm.runtime.session import DecoderSession

    manifest = read_manifest(Path(folder))
    head = manifest.graph.head_tokens  # a --draft-head folder: its logits cover these tokens only
    session = DecoderSession(Path(folder) / manifest.files["model"], io=manifest.io, dims=manifest.dims,
                             capacity=len(prompt) + steps + 8, threads=threads, graph=manifest.graph,
                             head_tokens=np.load(Path(folder) / head) if head else None,
                             kernel_path=Path(folder) / graph if graph else None, kernels=graph is not None)
    measure.decode_probe(session, prompt, 4)  # warm-up: first-run allocations, page faults
    runs = [measure.decode_probe(session, prompt, steps) for _ in range(probes)]
    memory = memory_kb()
    print(json.dumps({"prefill_ms": [r.prefill_ms for r in runs],
                      "decode_ms_per_token": [r.decode_ms_per_token for r in runs],
                      "rss_kb": [memory.get("Rss", 0)], "anon_huge_kb": [memory.get("AnonHugePages", 0)]}))


def memory_kb() -> dict[str, int]:
    """This process's resident memory and the part of it in transparent huge pages (Linux), in kB."""
    try:
        lines = Path("/proc/self/smaps_rollup").read_text().splitlines()
    except OSError:
        return {}
    return {f.split(":")[0]: int(f.split()[1]) for f in lines if f.endswith(" kB")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "smollm2-135m-instruct")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--probes", type=int, default=3, help="probes per process")
    ap.add_argument("--steps", type=int, default=64, help="greedy tokens per probe")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "kernel_steps.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        cfg = json.loads(args.worker)
        worker(cfg["folder"], cfg["graph"], cfg["threads"], cfg["prompt"], cfg["steps"], cfg["probes"])
        return

    import edgellm
    from edgellm import kernels
    from edgellm.bench import BENCH_MESSAGES

    if kernels.library_path() is None:
        sys.exit("edgellm's kernel library is not built here. Fix: python -m edgellm.kernels build")
    threads = [int(t) for t in args.threads.split(",")]
    recorder = Recorder("bench_kernel_steps", vars(args))
    prompt = edgellm.load(args.model, kernels=False).encode(BENCH_MESSAGES)
    samples: dict[str, dict[str, dict[str, list[float]]]] = {
        str(t): {v: {"prefill_ms": [], "decode_ms_per_token": [], "rss_kb": [], "anon_huge_kb": []}
                   for v in VARIANTS} for t in threads}
    with tempfile.TemporaryDirectory(prefix="edgellm-kernel-steps-") as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(args.model, folder)
        files = build_variants(folder)
        for round_ in range(args.rounds):
            for t in threads:
                order = VARIANTS[round_ % len(VARIANTS):] + VARIANTS[:round_ % len(VARIANTS)]
                for variant in order:
                    cfg = {"folder": str(folder), "graph": files[variant], "threads": t, "prompt": prompt,
                           "steps": args.steps, "probes": args.probes}
                    step = VARIANTS.index(variant)
                    env = {**os.environ, **{name: "1" if step >= VARIANTS.index(first) else "0" for name, first in (
                        ("EDGELLM_KERNEL_HUGEPAGES", HUGEPAGES_FROM), ("EDGELLM_KERNEL_PACK", PACKED_FROM),
                        ("EDGELLM_KERNEL_LAYER_REGION", REGION_FROM))}}
                    env["EDGELLM_KERNEL_PREFETCH"] = PREFETCH_BYTES if step >= VARIANTS.index(PREFETCH_FROM) else "0"
                    run = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                                         text=True, timeout=600, env=env)
                    if run.returncode != 0:
                        sys.exit(f"{variant} at {t} threads failed:\n{run.stderr[-3000:]}")
                    result = json.loads(run.stdout.strip().splitlines()[-1])
                    for key, values in result.items():
                        samples[str(t)][variant][key] += values
                    print(f"round {round_ + 1} threads {t} {variant}: decode "
                          f"{statistics.median(result['decode_ms_per_token']):.2f} ms/token, prefill "
                          f"{statistics.median(result['prefill_ms']):.1f} ms", flush=True)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    rows = []
    for t in threads:
        base = samples[str(t)]["onnxruntime"]
        base_decode, base_prefill = (statistics.median(base["decode_ms_per_token"]),
                                     statistics.median(base["prefill_ms"]))
        summary[str(t)] = {}
        for variant in VARIANTS:
            decode = statistics.median(samples[str(t)][variant]["decode_ms_per_token"])
            prefill = statistics.median(samples[str(t)][variant]["prefill_ms"])
            summary[str(t)][variant] = {"decode_ms_per_token": round(decode, 3), "prefill_ms": round(prefill, 2),
                                        "decode_vs_onnxruntime": round(decode / base_decode, 3),
                                        "prefill_vs_onnxruntime": round(prefill / base_prefill, 3),
                                        "rss_mb": round(max(samples[str(t)][variant]["rss_kb"]) / 1024, 1),
                                        "huge_pages_mb": round(max(samples[str(t)][variant]["anon_huge_kb"]) / 1024, 1)}
            rows.append([t, variant, round(decode, 2), round(decode / base_decode, 2), round(prefill, 1),
                         round(prefill / base_prefill, 2)])
    table = Table(["threads", "graph", "decode ms/token", "× onnxruntime", f"prompt ({len(prompt)} tokens) ms",
                   "× onnxruntime"], rows)
    recorder.write(args.out, samples, summary, table)
    print(table.markdown())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

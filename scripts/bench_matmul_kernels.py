"""onnxruntime's quantized MatMul kernels side by side, on SmolLM2-135M's layer shapes. Manual only (never CI).

    python scripts/bench_matmul_kernels.py --threads 1,2 --out benchmarks/matmul_kernels.json

One node per session, random weights, rows M = 1 (a decode step) and M = --rows (a prompt: 38 = the bench
prompt), every variant interleaved over --rounds rounds, best round kept (the kernels' speed, not the load's).
The variants answer two questions:
  - why prompts run on a QGEMM graph (convert --prefill-graph): MatMulNBits 8-bit with accuracy_level 4 is
    as fast as MLAS's int8 GEMM for one row, but several times slower for many;
  - whether an exact Q4_1 transcoding is usable: llama.cpp's Q4_1 stores a float minimum per block, which
    MatMulNBits can only hold as float zero points (T1 zero_points); with uint4 zero points it cannot be exact.
Shapes: qkv 576x960, gate_up 576x3072, down 1536x576 (o_proj 576x576 is like qkv). Weights are at most 1.8 MB,
so they sit in the cache: this measures compute, not memory (scripts/bench_bandwidth.py measures that).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edgellm.record import Recorder, Table  # noqa: E402

SHAPES = {"qkv 576x960": (576, 960), "gate_up 576x3072": (576, 3072), "down 1536x576": (1536, 576)}


def session(kind: str, K: int, N: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    ins, inits = ["A"], []

    def init(name, array):
        inits.append(numpy_helper.from_array(array, name))
        ins.append(name)

    if kind.startswith("MatMulNBits"):
        bits = 8 if "8-bit" in kind else 4
        accuracy = 4 if "acc 4" in kind else 0
        blocks = K // 32
        init("B", rng.integers(0, 256, (N, blocks, 32 * bits // 8), dtype=np.uint8))
        init("S", (rng.random(N * blocks, dtype=np.float32) + 0.5) * 1e-3)
        if "float zero points" in kind:
            init("Z", rng.random(N * blocks, dtype=np.float32) * 15)
        elif "uint4 zero points" in kind:
            init("Z", rng.integers(0, 256, N * ((blocks * 4 + 7) // 8), dtype=np.uint8))
        node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", K=K, N=N, bits=bits,
                                block_size=32, accuracy_level=accuracy)
    elif kind.startswith("QGEMM"):
        init("B", rng.integers(-127, 128, (K, N), dtype=np.int8))
        init("S", np.full(N, 1e-3, np.float32))
        node = helper.make_node("DynamicQuantizeMatMul", ins, ["Y"], domain="com.microsoft")
    else:
        init("B", rng.standard_normal((K, N)).astype(np.float32))
        node = helper.make_node("MatMul", ins, ["Y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


VARIANTS = (
    "MatMulNBits 8-bit, acc 4 (edgellm int8)",
    "MatMulNBits 4-bit, uint4 zero points, acc 4 (edgellm int4)",
    "MatMulNBits 4-bit, float zero points, acc 4 (exact Q4_1)",
    "MatMulNBits 4-bit, float zero points, acc 0 (exact Q4_1)",
    "QGEMM int8 per-channel (DynamicQuantizeMatMul)",
    "fp32 MatMul",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", type=int, default=38, help="M of the prompt case")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "matmul_kernels.json")
    args = ap.parse_args()
    recorder = Recorder("bench_matmul_kernels", parameters={k: str(v) for k, v in vars(args).items()})
    threads = [int(t) for t in args.threads.split(",")]
    sessions = {(v, s, t): session(v, *SHAPES[s], t) for v in VARIANTS for s in SHAPES for t in threads}
    rng = np.random.default_rng(1)
    inputs = {(s, m): rng.standard_normal((m, SHAPES[s][0])).astype(np.float32) for s in SHAPES for m in (1, args.rows)}
    samples: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for (v, s, t), sess in sessions.items():
            for m in (1, args.rows):
                a = inputs[(s, m)]
                sess.run(None, {"A": a})
                reps = max(3, 2000 // (m * 10))
                start = time.perf_counter()
                for _ in range(reps):
                    sess.run(None, {"A": a})
                samples.setdefault(f"{v} | {s} | M={m} | {t}t", []).append((time.perf_counter() - start) / reps * 1e6)
        print(f"round {r + 1}/{args.rounds} load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    best = {k: min(v) for k, v in samples.items()}
    rows, summary = [], {}
    for t in threads:
        for m in (1, args.rows):
            base = sum(best[f"{VARIANTS[0]} | {s} | M={m} | {t}t"] for s in SHAPES)
            for v in VARIANTS:
                per = [best[f"{v} | {s} | M={m} | {t}t"] for s in SHAPES]
                total = sum(per)
                summary[f"{v} | M={m} | {t}t"] = {"us_per_shape": dict(zip(SHAPES, per)), "us_sum": total,
                                                   "vs_int8_nbits": total / base}
                rows.append([t, m, v] + [round(x, 1) for x in per] + [round(total / base, 2)])
    table = Table(["threads", "rows M", "kernel"] + [f"{s} µs" for s in SHAPES] + ["sum × MatMulNBits 8-bit"], rows)
    print(table.markdown())
    recorder.write(args.out, samples=samples, summary=summary, table=table,
                   notes="best of rounds, µs per call; random weights and inputs; one node per session")


if __name__ == "__main__":
    main()

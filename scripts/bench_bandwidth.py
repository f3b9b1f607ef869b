"""How close each engine's decode is to the machine's memory-bandwidth floor. Manual only (never CI).

    python scripts/bench_bandwidth.py --peers benchmarks/peers.json --peers benchmarks/peers_t1.json \
        --out benchmarks/bandwidth.json

Decoding one token of a small model at batch 1 reads every weight once (plus the KV cache so far), so
its time is bounded below by bytes read / read bandwidth. This script measures:

1. the machine's achievable read bandwidth at 1 and 2 threads, three ways, interleaved over --rounds,
   best round kept (a floor must use the fastest the machine can read):
     numpy     threads summing disjoint slices of a --buffer-mb uint64 buffer (numpy drops the GIL)
     ort-nbits onnxruntime MatMulNBits, 8-bit, block 32, accuracy_level 4, M=1, on a weight of the same
               size: the kernel edgellm decodes with, on data that cannot sit in the cache
     ort-qgemm onnxruntime DynamicQuantizeMatMul (int8 per-channel, MLAS QGEMM), M=1, same size
2. the bytes each engine reads per decoded token, from its model files: edgellm's MatMulNBits
   weights + scales (+ zero points) of the ONNX graph (the embedding gather reads one row), llama.cpp's
   GGUF tensors (token_embd counted whole: SmolLM2 ties it as the output matrix), plus the KV cache read
   at the benchmark's mean context (prompt + half the new tokens);
3. each engine's decode ms/token from bench_peers results files (--peers, any thread count), as a
   multiple of its floor (bytes / best bandwidth at that thread count).

A ratio near 1 means the engine is bandwidth-bound: it can only get faster by reading fewer bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edgellm.record import Recorder, Table  # noqa: E402

MB = 1e6


def numpy_read_gbs(buffer: np.ndarray, threads: int, repeats: int = 3) -> float:
    """GB/s of `threads` Python threads each summing its slice of `buffer` (numpy releases the GIL)."""
    parts = np.array_split(buffer, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best / 1e9


def ort_session(kind: str, K: int, N: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "ort-nbits":
        blocks = K // 32
        inits = [numpy_helper.from_array(rng.integers(0, 256, (N, blocks, 32), dtype=np.uint8), "B"),
                 numpy_helper.from_array((rng.random(N * blocks, dtype=np.float32) + 0.5) * 1e-3, "S")]
        node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=8,
                                block_size=32, accuracy_level=4)
        nbytes = N * K + N * blocks * 4
    else:
        inits = [numpy_helper.from_array(rng.integers(-127, 128, (K, N), dtype=np.int8), "B"),
                 numpy_helper.from_array(np.full(N, 1e-3, np.float32), "S")]
        node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "S"], ["Y"], domain="com.microsoft")
        nbytes = N * K + N * 4
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), nbytes


def ort_read_gbs(session, nbytes: int, K: int, repeats: int = 5) -> float:
    a = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
    session.run(None, {"A": a})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"A": a})
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


# Weight inputs (besides the activations) of the ops a decode step runs, and each op's matmul parameters:
# MatMulNBits / MatMulQ8 read B, scales (and zero points); Q8Mlp reads o_proj, gate_up and down_proj; Q8Layer
# reads qkv and then Q8Mlp's three.
WEIGHT_INPUTS = {"MatMulNBits": (1, 2, 3), "MatMulQ8": (1, 2), "Q8Mlp": (2, 3, 5, 6, 7, 8),
                 "Q8Layer": (2, 3, 9, 10, 12, 13, 14, 15)}


def _params(op: str, attrs: dict) -> int:
    if op in ("Q8Mlp", "Q8Layer"):
        tail = attrs["attn"] * attrs["hidden"] + attrs["hidden"] * 2 * attrs["intermediate"] \
            + attrs["intermediate"] * attrs["hidden"]
        if op == "Q8Mlp":
            return tail
        qkv = (attrs["num_heads"] + 2 * attrs["kv_num_heads"]) * (attrs["attn"] // attrs["num_heads"])
        return tail + attrs["hidden"] * qkv
    return attrs["K"] * attrs["N"]


def onnx_bytes_per_token(model: Path) -> dict:
    """Bytes of the weights a one-token step of this graph reads: every matmul op's weights, scales and zero
    points (model.onnx: MatMulNBits; the kernel twin: MatMulQ8, Q8Mlp and Q8Layer, with fp16 scales)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model), load_external_data=True)
    inits = {i.name: i for i in m.graph.initializer}

    def size(name: str) -> int:
        return numpy_helper.to_array(inits[name]).nbytes if name in inits else 0

    weights = lm_head = 0
    params = 0
    for node in m.graph.node:
        if node.op_type not in WEIGHT_INPUTS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        nbytes = sum(size(node.input[i]) for i in WEIGHT_INPUTS[node.op_type] if i < len(node.input) and node.input[i])
        params += _params(node.op_type, attrs)
        if node.name.startswith("lm_head"):
            lm_head += nbytes
        else:
            weights += nbytes
    return {"weights_bytes": weights + lm_head, "lm_head_bytes": lm_head, "matmul_params": params,
            "bits_per_weight": round(8 * (weights + lm_head) / params, 3), "graph": model.name}


def gguf_bytes_per_token(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    total = head = params = 0
    for t in reader.tensors:
        if t.name.endswith("norm.weight"):
            continue  # a few KB
        total += int(t.n_bytes)
        params += int(np.prod(t.shape))
        if t.name in ("token_embd.weight", "output.weight"):
            head += int(t.n_bytes)
    return {"weights_bytes": total, "lm_head_bytes": head, "matmul_params": params,
            "bits_per_weight": round(8 * total / params, 3)}


def kv_bytes(layers: int, kv_heads: int, head_dim: int, positions: int, bytes_per_value: int) -> int:
    return 2 * layers * kv_heads * head_dim * positions * bytes_per_value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", action="append", default=[], help="bench_peers results file(s) (any thread count)")
    ap.add_argument("--model", type=Path, default=None, help="edgellm int8 folder (default: the peers file's)")
    ap.add_argument("--model-int4", type=Path, default=None, help="edgellm int4 folder (default: the peers file's)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--buffer-mb", type=int, default=256, help="bytes read per probe (well above the L3 cache)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bandwidth.json")
    args = ap.parse_args()
    recorder = Recorder("bench_bandwidth", parameters={k: str(v) for k, v in vars(args).items()})
    threads = [int(t) for t in args.threads.split(",")]

    # 1. Bandwidth, interleaved over rounds.
    buffer = np.ones(args.buffer_mb * 1_000_000 // 8, dtype=np.uint64)
    K = 2048
    N = args.buffer_mb * 1_000_000 // K // 32 * 32
    sessions = {(kind, t): ort_session(kind, K, N, t) for kind in ("ort-nbits", "ort-qgemm") for t in threads}
    samples: dict[str, dict[str, list[float]]] = {k: {str(t): [] for t in threads}
                                                  for k in ("numpy", "ort-nbits", "ort-qgemm")}
    for r in range(args.rounds):
        for t in threads:
            samples["numpy"][str(t)].append(numpy_read_gbs(buffer, t))
            for kind in ("ort-nbits", "ort-qgemm"):
                session, nbytes = sessions[(kind, t)]
                samples[kind][str(t)].append(ort_read_gbs(session, nbytes, K))
        print(f"round {r + 1}/{args.rounds} load {os.getloadavg()[0]:.1f}: " + ", ".join(
            f"{k} {t}t {v[str(t)][-1]:.1f} GB/s" for k, v in samples.items() for t in threads), file=sys.stderr)
    del buffer, sessions
    best = {str(t): max(max(v[str(t)]) for v in samples.values()) for t in threads}
    bandwidth = {k: {t: {"best_gbs": round(max(v), 2), "median_gbs": round(statistics.median(v), 2)}
                     for t, v in per.items()} for k, per in samples.items()}

    # 2. + 3. Bytes per token and decode times from the peers files.
    engines: dict[str, dict] = {}
    rows = []
    for peers_path in args.peers:
        doc = json.loads(Path(peers_path).read_text())
        params, summary = doc["parameters"], doc["summary"]
        t = str(params["threads"])
        settings = doc["samples"].get("settings", {})
        positions = settings.get("prompt_tokens", 38) + params.get("new_tokens", 64) // 2
        for engine, row in summary.items():
            ran = doc["samples"].get("runs", {}).get(engine, {}).get("info", {}).get("graph") or {}
            key = f"{engine}|{ran.get('graph', '')}"
            if key not in engines:
                if engine in ("edgellm", "edgellm-ort", "edgellm-warm"):
                    folder = args.model or Path(params["model"])
                elif engine == "edgellm-int4":
                    folder = args.model_int4 or Path(params["model_int4"])
                elif engine == "edgellm-prefill":  # decodes on model.onnx, like edgellm
                    folder = Path(params["model_prefill"])
                else:
                    folder = None
                if folder is not None:
                    manifest = json.loads((folder / "edgellm.json").read_text())
                    d = manifest["dims"]
                    # the graph the row ran (its results say: model.kernels.onnx on edgellm's kernels, else model.onnx)
                    graph = ran.get("graph") if ran.get("kernels") else manifest["files"]["model"]
                    info = onnx_bytes_per_token(folder / graph)
                    info["kv_bytes_per_position"] = kv_bytes(d["num_layers"], d["num_kv_heads"], d["head_dim"], 1, 4)
                    info["source"] = str(folder)
                elif engine.startswith("llama-"):
                    gguf = Path(doc["samples"]["assets"][engine.removeprefix("llama-")])
                    info = gguf_bytes_per_token(gguf)
                    info["kv_bytes_per_position"] = kv_bytes(30, 3, 64, 1, 2)  # llama.cpp's default f16 cache
                    info["source"] = str(gguf)
                else:
                    continue
                engines[key] = info
            info = engines[key]
            if t not in best:
                continue
            nbytes = info["weights_bytes"] + info["kv_bytes_per_position"] * positions
            floor_ms = nbytes / (best[t] * 1e9) * 1000
            decode = row["decode_ms_per_token_p50"]
            rows.append([engine, int(t), round(nbytes / MB, 1), info["bits_per_weight"], round(best[t], 1),
                         round(floor_ms, 2), round(decode, 2), round(decode / floor_ms, 2),
                         round(nbytes / decode / 1e6, 1), Path(peers_path).name])
    table = Table(["engine", "threads", "MB read per token", "bits per weight", "best read GB/s", "floor ms/token",
                   "decode ms/token (p50)", "decode / floor", "achieved GB/s", "decode from"], rows)
    print(table.markdown())
    recorder.write(args.out, samples={"bandwidth_gbs": samples}, summary={
        "bandwidth": bandwidth, "best_gbs": best, "engines": engines,
        "rows": [dict(zip(table.columns, r)) for r in rows]}, table=table,
        notes="floor = (weights + KV cache at the mean context) / best measured read bandwidth at the same thread "
              "count; decode figures come from the bench_peers files named per row")


if __name__ == "__main__":
    main()

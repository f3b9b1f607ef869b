"""`edgellm serve` through the real `openai` client, against a server process on 127.0.0.1 (tiny model)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import openai
import pytest

import edgellm
from edgellm import SamplingParams

from .conftest import start_server

QUESTION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def local(tiny_fp32_dir):
    """The same model in this process: what the server must answer, token for token."""
    return edgellm.load(tiny_fp32_dir)


def fresh_ids(local, messages) -> list[int]:
    return local.tokenizer.encode(local.render_chat(messages), add_special_tokens=False).ids


def test_chat_non_streaming_equals_the_runtime_and_usage_is_exact(server, local):
    reply = server.client().chat.completions.create(model="any", messages=QUESTION, max_tokens=12, temperature=0)
    expected = local.generate(QUESTION, SamplingParams(max_new_tokens=12, temperature=0))
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(fresh_ids(local, QUESTION))
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_chat_concatenates_to_the_same_answer_with_usage(server, local):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    params = dict(model="any", messages=messages, max_tokens=20, temperature=0.9, seed=11)
    chunks = list(server.client().chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                          **params))
    expected = local.generate(messages, SamplingParams(max_new_tokens=20, temperature=0.9, seed=11))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it really streamed
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [expected.finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.prompt_tokens == len(fresh_ids(local, messages))
    assert usage.completion_tokens == len(expected.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_raw_prompt_streaming_and_not(server, local):
    client = server.client()
    expected = local.generate("The weather today", SamplingParams(max_new_tokens=10, temperature=0))
    whole = client.completions.create(model="any", prompt="The weather today", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text == expected.text
    assert whole.usage.prompt_tokens == len(local.encode("The weather today"))
    assert whole.usage.completion_tokens == len(expected.token_ids)
    streamed = client.completions.create(model="any", prompt="The weather today", max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_stop_strings_end_the_answer_before_them(server, local):
    messages = [{"role": "user", "content": "Say something long."}]
    free = local.generate(messages, SamplingParams(max_new_tokens=40, temperature=1.0, seed=5)).text
    stop = next(free[i:i + 3] for i in range(4, len(free) - 3) if free.find(free[i:i + 3]) == i and free[i:i + 3].strip())
    client = server.client()
    for stream in (False, True):
        reply = client.chat.completions.create(model="any", messages=messages, max_tokens=40, temperature=1.0,
                                               seed=5, stop=[stop, "never-appears"], stream=stream)
        if stream:
            chunks = list(reply)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert text == free[:free.find(stop)] and reason == "stop"


def test_models_and_health(server, local):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [local.manifest.name]
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert server.metrics()["edgellm_ready"] == 1.0


def error_of(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


@pytest.mark.parametrize("field,value", [("temperature", "hot"), ("max_tokens", 1.5), ("max_tokens", True),
                                         ("stream", "yes"), ("stop", 3), ("seed", -1), ("top_p", 0),
                                         ("n", 2), ("logprobs", True), ("stream_options", 1)])
def test_wrong_fields_get_a_400_naming_the_field(server, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model="any", messages=QUESTION, extra_body={field: value})
    error = error_of(caught.value)
    assert caught.value.status_code == 400 and error["param"] == field
    assert error["type"] == "invalid_request_error" and field in error["message"]


def test_bad_messages_and_bad_json_are_400s_and_unknown_fields_are_ignored(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="any", messages=[{"role": "wizard", "content": "hi"}])
    assert error_of(caught.value)["param"] == "messages[0].role"
    raw = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    missing = httpx.post(server.url + "/v1/nowhere", json={})
    assert missing.status_code == 404 and "error" in missing.json()
    reply = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=3,
                                           extra_body={"frobnicate": {"x": 1}, "user": "u1"})
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_response_cache_and_prefix_cache_show_in_usage_headers_and_metrics(server):
    client = server.client()
    before = server.metrics()
    ask = dict(model="any", messages=[{"role": "user", "content": "Is the cache warm?"}], max_tokens=8, temperature=0)
    first = client.chat.completions.with_raw_response.create(**ask)
    second = client.chat.completions.with_raw_response.create(**ask)
    assert first.headers["x-edgellm-response-cache"] == "miss" and second.headers["x-edgellm-response-cache"] == "hit"
    assert first.parse().choices[0].message.content == second.parse().choices[0].message.content
    assert first.parse().usage.completion_tokens == second.parse().usage.completion_tokens
    sampled = client.chat.completions.with_raw_response.create(**(ask | {"temperature": 0.8}))  # no seed: not cached
    assert sampled.headers["x-edgellm-response-cache"] == "off"
    after = server.metrics()
    assert after["edgellm_response_cache_hits_total"] - before["edgellm_response_cache_hits_total"] == 1
    assert after["edgellm_response_cache_entries"] >= 1
    # The prefix cache: a second question after the same long system prompt prefills only its own tokens.
    system = {"role": "system", "content": "You are the kiosk assistant of the city museum. " * 4}
    one = client.chat.completions.create(model="any", messages=[system, {"role": "user", "content": "Hours?"}],
                                         max_tokens=4, temperature=0)
    two = client.chat.completions.create(model="any", messages=[system, {"role": "user", "content": "Tickets?"}],
                                         max_tokens=4, temperature=0)
    cached = two.usage.prompt_tokens_details.cached_tokens
    assert cached >= 40 and cached < two.usage.prompt_tokens
    final = server.metrics()
    assert final["edgellm_prefix_cache_tokens_total"] - after["edgellm_prefix_cache_tokens_total"] >= cached
    assert final["edgellm_prefix_cache_hits_total"] > after["edgellm_prefix_cache_hits_total"]
    assert one.usage.prompt_tokens < two.usage.prompt_tokens + 5


def test_deadline_header_ends_with_the_fallback_and_says_so(server):
    client = server.client(default_headers={"X-Edgellm-Deadline-Ms": "60"})
    reply = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=1800, temperature=0,
                                           extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.finish_reason == "deadline"
    assert choice.message.content.endswith("Sorry, I ran out of time to answer that.")
    assert 0 < reply.usage.completion_tokens < 1800
    with pytest.raises(openai.BadRequestError) as caught:
        server.client(default_headers={"X-Edgellm-Deadline-Ms": "soon"}).chat.completions.create(
            model="any", messages=QUESTION)
    assert error_of(caught.value)["param"] == "X-Edgellm-Deadline-Ms"


LONG = dict(model="any", messages=QUESTION, max_tokens=1900, temperature=0, extra_body={"ignore_eos": True})


def test_client_disconnect_cancels_its_generation(server):
    before = server.metrics()
    with httpx.Client(timeout=30) as raw:
        with raw.stream("POST", server.url + "/v1/chat/completions",
                        json={**{k: v for k, v in LONG.items() if k != "extra_body"}, "ignore_eos": True,
                              "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # generation has started
        # leaving the block closes the connection mid-stream
    started = time.perf_counter()
    reply = server.client().chat.completions.create(model="any", messages=[{"role": "user", "content": "Next!"}],
                                                    max_tokens=2, temperature=0)
    waited = time.perf_counter() - started
    assert reply.choices[0].finish_reason in ("stop", "length")
    after = server.metrics()
    assert after["edgellm_cancelled_total"] - before["edgellm_cancelled_total"] == 1
    generated = after["edgellm_generated_tokens_total"] - before["edgellm_generated_tokens_total"]
    assert generated < 1900 * 0.5, f"the abandoned generation ran on for {generated} tokens"
    assert waited < 5


def test_auth_cors_and_limits(strict_server):
    url = strict_server.url
    with pytest.raises(openai.AuthenticationError) as caught:
        strict_server.client(api_key="wrong").chat.completions.create(model="any", messages=QUESTION, max_tokens=2)
    assert caught.value.status_code == 401 and error_of(caught.value)["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401
    good = strict_server.client(api_key="sesame")
    assert good.chat.completions.create(model="any", messages=QUESTION, max_tokens=2).choices[0].message.content is not None
    assert httpx.get(url + "/health").status_code == 200  # health stays open for supervisors
    preflight = {"Origin": "http://kiosk.local", "Access-Control-Request-Method": "POST"}
    assert httpx.options(url + "/v1/chat/completions", headers=preflight).headers.get(
        "access-control-allow-origin") == "http://kiosk.local"
    other = httpx.options(url + "/v1/chat/completions", headers=preflight | {"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    big = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer sesame"},
                     json={"messages": [{"role": "user", "content": "x" * 5000}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError) as caught:
        good.chat.completions.create(model="any", messages=[{"role": "user", "content": "word " * 200}])
    assert error_of(caught.value)["code"] == "context_length_exceeded" and "64" in error_of(caught.value)["message"]
    with strict_server.client(api_key="sesame").with_options() as client:
        reply = client.chat.completions.with_raw_response.create(model="any", messages=QUESTION, max_tokens=2,
                                                                 temperature=0)
        assert reply.headers["x-edgellm-response-cache"] == "off"


def test_cors_is_off_by_default(server):
    preflight = {"Origin": "http://kiosk.local", "Access-Control-Request-Method": "POST"}
    response = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in response.headers


def test_full_queue_answers_503_with_retry_after(strict_server):
    """Queue of one: one running, one waiting, the third is refused at once."""
    client = strict_server.client(api_key="sesame")
    running = client.chat.completions.create(stream=True, **LONG)
    next(iter(running))  # the long one holds the model
    waiting: dict = {}
    worker = threading.Thread(target=lambda: waiting.setdefault(
        "reply", client.chat.completions.create(model="any", messages=QUESTION, max_tokens=2, temperature=0)))
    worker.start()
    deadline = time.monotonic() + 10
    while strict_server.metrics()["edgellm_queue_depth"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="any", messages=QUESTION, max_tokens=2)
    assert caught.value.status_code == 503 and int(caught.value.response.headers["retry-after"]) >= 1
    assert error_of(caught.value)["code"] == "queue_full"
    running.close()  # frees the model: the waiting request runs next
    worker.join(30)
    assert waiting["reply"].choices[0].finish_reason in ("stop", "length")
    assert strict_server.metrics()["edgellm_rejected_total"] == 1


def test_ctrl_c_ends_open_streams_with_a_final_event(tiny_fp32_dir):
    server = start_server(tiny_fp32_dir)
    assert "curl " + server.url + "/v1/chat/completions" in "".join(server.first_lines)
    try:
        with httpx.Client(timeout=30) as raw, raw.stream(
                "POST", server.url + "/v1/chat/completions",
                json={"messages": QUESTION, "max_tokens": 1900, "ignore_eos": True, "stream": True}) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            server.process.send_signal(signal.SIGINT)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        final = json.loads(rest[-2][len("data:"):])
        assert final["choices"][0]["finish_reason"] == "shutdown"
        assert server.process.wait(20) == 0
        assert "stopped" in server.process.stdout.read()
    finally:
        server.stop()


def test_import_edgellm_leaves_the_server_stack_out():
    code = ("import sys, edgellm, edgellm.cli; "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'prometheus_client', 'edgellm.serve') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def run_cli(*code_or_args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, timeout=120)


def test_missing_serve_extra_and_a_bad_folder_are_one_line_errors(tmp_path):
    blocked = run_cli("-c", "import sys; sys.modules['starlette'] = None; from edgellm.cli import main; "
                            f"main(['serve', '-m', {str(tmp_path)!r}])")
    assert blocked.returncode == 1
    assert blocked.stderr.strip().splitlines() == [
        "error: edgellm serve needs the 'starlette' package, which is not installed. Fix: pip install 'edgellm[serve]'"]
    missing = run_cli("-m", "edgellm.cli", "serve", "-m", str(tmp_path / "nowhere"), "--port", "0")
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1


def test_a_pool_of_sessions_keeps_each_interleaved_conversation_cached(tiny_fp32_dir):
    """--sessions 2: two conversations taking turns each find their whole history cached; one KV cache
    (the default server) finds only the shared system prompt."""
    def converse(server) -> list[int]:
        client = server.client()
        histories = [[{"role": "system", "content": "You are a helpful assistant. " * 3}] for _ in (1, 2)]
        cached, previous = [], {}
        for turn in range(3):
            for n, history in enumerate(histories):
                history.append({"role": "user", "content": f"Question {turn} of person {n}?"})
                reply = client.chat.completions.create(model="any", messages=history, max_tokens=5, temperature=0)
                history.append({"role": "assistant", "content": reply.choices[0].message.content})
                cached.append((turn, previous.get(id(history), 0), reply.usage.prompt_tokens_details.cached_tokens))
                previous[id(history)] = reply.usage.prompt_tokens
        return cached

    pool = start_server(tiny_fp32_dir, "--sessions", "2", "--no-response-cache")
    single = start_server(tiny_fp32_dir, "--no-response-cache")
    try:
        with_pool, without = converse(pool), converse(single)
    finally:
        pool.stop(), single.stop()
    # (turn, the conversation's previous prompt length, cached tokens now): with the pool, at least the whole
    # previous prompt is cached; with one cache, the other conversation's turn left only the shared start.
    assert all(cached >= before for turn, before, cached in with_pool if turn > 0), with_pool
    assert all(cached < before for turn, before, cached in without if turn > 0), without


def test_stream_options_include_usage_must_be_a_boolean(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model="any", messages=QUESTION, stream=True,
                                                stream_options={"include_usage": "yes"})
    assert error_of(caught.value)["param"] == "stream_options.include_usage"


def test_health_waits_for_warm_up_and_the_server_default_deadline_applies(tiny_fp32_dir):
    """In process: uvicorn serving the app before the engine's worker has warmed the model up."""
    import uvicorn

    from edgellm.serve.app import HttpSettings, create_app
    from edgellm.serve.engine import Engine, EngineConfig
    from edgellm.serve.metrics import Metrics
    from edgellm.serve.pool import SessionPool

    engine = Engine(SessionPool([edgellm.load(tiny_fp32_dir)]), EngineConfig(deadline_ms=40, fallback_text="(late)"),
                    Metrics(), "tiny")
    server = uvicorn.Server(uvicorn.Config(create_app(engine, HttpSettings()), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        url = "http://127.0.0.1:%d" % server.servers[0].sockets[0].getsockname()[1]
        loading = httpx.get(url + "/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading" and loading.headers["retry-after"]
        engine.start()
        assert engine.wait_ready(30)
        assert httpx.get(url + "/health").status_code == 200
        reply = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="tiny", messages=QUESTION, max_tokens=1800, temperature=0, extra_body={"ignore_eos": True})
        assert reply.choices[0].finish_reason == "deadline" and reply.choices[0].message.content.endswith("(late)")
    finally:
        engine.shutdown()
        server.should_exit = True
        thread.join(10)
        engine.join(10)

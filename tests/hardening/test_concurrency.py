"""One LLM, many threads: generations are serialized and correct; abandoned streams never keep the model."""

from __future__ import annotations

import gc
import threading
import time

import pytest

import edgellm
from edgellm import CancelToken, SamplingParams

CHAT = [{"role": "user", "content": "Hello"}]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


@pytest.fixture
def llm(tiny_int8_dir):
    return edgellm.load(tiny_int8_dir, context_length=256)


def _in_thread(work, timeout: float = 30.0):
    box = {}
    thread = threading.Thread(target=lambda: box.update(value=work()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the call hung: the model was never given back"
    return box["value"]


def test_eight_threads_on_one_llm_get_the_same_answers_as_alone(llm):
    prompts = [[{"role": "user", "content": f"Question number {i}"}] for i in range(8)]
    alone = [llm.generate(p, GREEDY).token_ids for p in prompts]
    results: dict[int, tuple] = {}
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            stream = llm.stream(prompts[i], GREEDY)
            tokens = [t for chunk in stream for t in chunk.token_ids]
            assert tuple(tokens) == stream.result.token_ids
            results.setdefault(i, stream.result.token_ids)
            assert stream.result.token_ids == results[i]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert [results[i] for i in range(8)] == alone


def test_stream_made_in_a_thread_that_exits_never_holds_the_model(llm):
    made = []
    _in_thread(lambda: made.append(llm.stream(CHAT, GREEDY)))  # never iterated; the thread is gone
    assert len(_in_thread(lambda: llm.generate(CHAT, GREEDY)).token_ids) == 24
    assert len(made) == 1  # still referenced, still harmless


def test_stream_dropped_half_way_in_another_thread_gives_the_model_back(llm):
    def start_and_drop():
        stream = llm.stream(CHAT, SamplingParams(max_new_tokens=200, ignore_eos=True))
        next(stream)  # holds the model now
        return None  # the last reference goes with this frame

    _in_thread(start_and_drop)
    gc.collect()
    assert len(_in_thread(lambda: llm.generate(CHAT, GREEDY)).token_ids) == 24


def test_same_thread_new_stream_replaces_its_own_half_read_one(llm):
    first = llm.stream(CHAT, SamplingParams(max_new_tokens=200, ignore_eos=True))
    next(first)
    assert len(llm.generate(CHAT, GREEDY).token_ids) == 24  # would deadlock if `first` kept the model
    assert first.result is not None and first.result.finish_reason == "cancelled"


def test_waiting_for_a_busy_model_respects_deadline_and_cancel(llm):
    holder = llm.stream(CHAT, SamplingParams(max_new_tokens=200, ignore_eos=True))
    next(holder)  # this thread holds the model while others wait
    started = time.perf_counter()
    result = _in_thread(lambda: llm.generate(CHAT, GREEDY, deadline=0.3))
    assert result.finish_reason == "deadline" and result.token_ids == ()
    assert 0.25 < time.perf_counter() - started < 2.0
    token = CancelToken()
    threading.Timer(0.2, token.cancel).start()
    result = _in_thread(lambda: llm.generate(CHAT, GREEDY, cancel=token))
    assert result.finish_reason == "cancelled" and result.token_ids == ()
    holder.close()
    assert len(_in_thread(lambda: llm.generate(CHAT, GREEDY)).token_ids) == 24


def test_cancel_from_another_thread_stops_within_a_step(llm):
    token = CancelToken()
    stream = llm.stream(CHAT, SamplingParams(max_new_tokens=2000, ignore_eos=True), cancel=token)
    next(stream)
    token.cancel()
    rest = list(stream)
    assert stream.result.finish_reason == "cancelled" and len(rest) <= 2
    assert len(llm.generate(CHAT, GREEDY).token_ids) == 24

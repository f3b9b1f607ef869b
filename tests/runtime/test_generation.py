"""The runtime on a tiny fp32 model, where cached, streamed and fresh paths must agree exactly."""

import threading

import pytest

import edgellm
from edgellm import CancelToken, ContextLengthError, InvalidParameterError, ModelFormatError, ProviderError, SamplingParams

CHAT = [{"role": "user", "content": "Tell me about the Congress."}]


@pytest.fixture(scope="module")
def llm(tiny_fp32_dir):
    return edgellm.load(tiny_fp32_dir, threads=1)


def test_stream_concatenated_equals_generate(llm):
    params = SamplingParams(max_new_tokens=40, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    result = llm.generate(CHAT, params)
    stream = llm.stream(CHAT, params)
    chunks = list(stream)
    assert "".join(c.text for c in chunks) == result.text
    assert stream.result.token_ids == result.token_ids
    assert sum(len(c.token_ids) for c in chunks) == len(result.token_ids)
    assert result.finish_reason in ("stop", "length")


def test_cached_prefix_gives_the_same_tokens_as_fresh(llm):
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    llm.reset()
    fresh = llm.generate(CHAT, params)
    assert fresh.timings.cached_tokens == 0
    again = llm.generate(CHAT, params)
    assert again.timings.cached_tokens == again.timings.prompt_tokens - 1
    assert again.token_ids == fresh.token_ids
    turn2 = CHAT + [{"role": "assistant", "content": fresh.text}, {"role": "user", "content": "More."}]
    cached = llm.generate(turn2, params)
    llm.reset()
    assert llm.generate(turn2, params).token_ids == cached.token_ids
    assert cached.timings.cached_tokens >= fresh.timings.prompt_tokens


def test_prefill_warms_the_prefix(llm):
    llm.reset()
    system = [{"role": "system", "content": "You are brief."}]
    cached = llm.prefill(system)
    result = llm.generate(system + [{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=4))
    assert cached > 0 and result.timings.cached_tokens == cached


def test_stop_string_is_never_emitted(llm):
    sampled = SamplingParams(max_new_tokens=40, temperature=1.0, seed=3, ignore_eos=True)
    base = llm.generate(CHAT, sampled)
    assert len(base.text) > 12
    stop = base.text[6:9]
    stream = llm.stream(CHAT, SamplingParams(max_new_tokens=40, temperature=1.0, seed=3, ignore_eos=True, stop=(stop,)))
    text = "".join(c.text for c in stream)
    assert stop not in text
    assert text == base.text[:base.text.index(stop)]
    assert stream.result.finish_reason == "stop"


def test_length_finish_and_ignore_eos(llm):
    result = llm.generate(CHAT, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert len(result.token_ids) == 5 and result.finish_reason == "length"


def test_cancel_before_start_returns_cancelled(llm):
    cancel = CancelToken()
    cancel.cancel()
    result = llm.generate(CHAT, SamplingParams(max_new_tokens=50), cancel=cancel)
    assert result.finish_reason == "cancelled" and result.token_ids == ()


def test_cancel_from_another_thread_stops_within_a_step(llm):
    cancel = CancelToken()
    stream = llm.stream(CHAT, SamplingParams(max_new_tokens=500, ignore_eos=True), cancel=cancel)
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 3:
            threading.Thread(target=cancel.cancel).start()
    assert stream.result.finish_reason == "cancelled"
    assert len(stream.result.token_ids) < 50


def test_abandoned_stream_frees_the_model(llm):
    stream = llm.stream(CHAT, SamplingParams(max_new_tokens=50, ignore_eos=True))
    next(iter(stream))
    result = llm.generate(CHAT, SamplingParams(max_new_tokens=3))  # would deadlock if the lock stayed held
    assert len(result.token_ids) <= 3


@pytest.mark.parametrize("kwargs, name", [
    ({"top_p": 2.0}, "top_p"), ({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
])
def test_bad_sampling_settings_name_the_value(kwargs, name):
    with pytest.raises(InvalidParameterError, match=name):
        SamplingParams(**kwargs)


def test_bad_requests(llm, tiny_fp32_dir):
    with pytest.raises(InvalidParameterError, match="messages is empty"):
        llm.generate([], SamplingParams(max_new_tokens=2))
    with pytest.raises(InvalidParameterError, match="role"):
        llm.generate([{"role": "wizard", "content": "x"}])
    with pytest.raises(ContextLengthError, match=r"the prompt has \d+ tokens; the context window holds 2048"):
        llm.generate("word " * 3000)
    with pytest.raises(ProviderError, match="not available"):
        edgellm.load(tiny_fp32_dir, providers=["nosuch"])
    with pytest.raises(InvalidParameterError, match="deadline"):
        llm.generate(CHAT, deadline=-1)


def test_tampered_or_missing_file_is_refused(tiny_fp32_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_fp32_dir, copy)
    with open(copy / "tokenizer.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(ModelFormatError, match="tokenizer.json does not match its sha256"):
        edgellm.load(copy)
    (copy / "model.onnx.data").unlink()
    with pytest.raises(ModelFormatError, match="model.onnx.data is missing"):
        edgellm.load(copy)
    with pytest.raises(ModelFormatError, match="has no edgellm.json"):
        edgellm.load(tmp_path)


def test_repeated_generations_do_not_grow_memory(llm):
    import resource

    params = SamplingParams(max_new_tokens=8, temperature=0.7, seed=1)
    for _ in range(50):
        llm.generate(CHAT, params)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(500):
        llm.generate([{"role": "user", "content": f"question {i}"}], params)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 20

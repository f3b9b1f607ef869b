"""A hostile chat_template.jinja is stopped by size and time limits, at load or at the call, as one clear error."""

from __future__ import annotations

import resource
import time

import pytest

import edgellm
from edgellm.errors import ChatTemplateError, InvalidParameterError, ModelFormatError
from edgellm.runtime.chat import TEMPLATE_SECONDS, ChatTemplate

# (case, template source, fragment of the error)
HOSTILE = [
    ("string times 4e9", "{{ 'A' * 4000000000 }}", "of 4,000,000,000 characters; the limit is 4,000,000"),
    ("list times 1e9", "{{ [1] * 1000000000 }}", "a list (`*`)"),
    ("1e5 x 1e5 loop", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "took more than 1 s"),
    ("exponential macro recursion",
     "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}", "took more than 1 s"),
    ("doubling through a namespace",
     "{% set ns = namespace(s='A') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "a string (`~`)"),
    ("center filter", "{{ 'a'|center(4000000000) }}", "(|center)"),
    ("str method", "{{ 'a'.rjust(4000000000) }}", "(.rjust)"),
    ("format width", "{{ '{:>4000000000}'.format(1) }}", "(.format)"),
    ("percent width", "{{ '%4000000000s' % 'a' }}", "(`%`)"),
    ("star width", "{{ '%*s' % (4000000000, 'a') }}", "(`%`)"),
    ("join separator over a generator", "{{ range(100000)|map('string')|join('A' * 1000000) }}", "(|join)"),
    ("replace blow-up", "{{ ('a' * 1000000)|replace('a', 'b' * 1000) }}", "(|replace)"),
    ("huge power", "{{ 10 ** 100000000 }}", "(`**`)"),
    ("endless output", "{% for i in range(100000) %}{{ 'B' * 100 }}{% endfor %}", "a prompt of"),
    ("recursive loop bomb", "{% for x in [1] recursive %}{{ loop([1, 2]) }}{% endfor %}", "RecursionError"),
    ("lipsum removed", "{{ lipsum(n=1000000000) }}", "'lipsum' is undefined"),
    ("does not compile", "{% for %}", "does not compile"),
]


@pytest.mark.parametrize("case,source,fragment", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_template_is_refused_at_load(model_copy, case, source, fragment):
    (model_copy.path / "chat_template.jinja").write_text(source)
    model_copy.recompute_checksums()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(ChatTemplateError) as info:
        edgellm.load(model_copy.path)
    elapsed = time.perf_counter() - started
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert fragment in str(info.value) and "Fix:" in str(info.value) and "\n" not in str(info.value)
    assert len(str(info.value)) < 400  # one line, not a 2 GB traceback
    assert elapsed < TEMPLATE_SECONDS + 2.0 and grown_mb < 200
    assert isinstance(info.value, ModelFormatError)


# Fine on the load-time probe, hostile for one particular message: caught at the call.
SLOW_FOR_ONE_MESSAGE = (
    "{% for m in messages %}{% if m.content == 'slow' %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}{% endif %}{{ m.content }}{% endfor %}")
BIG_FOR_ONE_MESSAGE = "{% for m in messages %}{{ m.content * (4000000 if m.content == 'big' else 1) }}{% endfor %}"


@pytest.fixture
def sneaky(model_copy):
    def load(source):
        (model_copy.path / "chat_template.jinja").write_text(source)
        model_copy.recompute_checksums()
        return edgellm.load(model_copy.path, context_length=128)
    return load


def test_rendering_counts_against_the_deadline(sneaky):
    llm = sneaky(SLOW_FOR_ONE_MESSAGE)
    assert llm.generate([{"role": "user", "content": "fast"}], edgellm.SamplingParams(max_new_tokens=2)).text \
        is not None
    started = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="what was left of the deadline"):
        llm.stream([{"role": "user", "content": "slow"}], deadline=0.2)
    assert time.perf_counter() - started < 0.6
    started = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="the template time limit"):
        llm.stream([{"role": "user", "content": "slow"}])
    assert time.perf_counter() - started < TEMPLATE_SECONDS + 0.5


def test_output_limit_at_the_call(sneaky):
    llm = sneaky(BIG_FOR_ONE_MESSAGE)
    with pytest.raises(ChatTemplateError, match="a str"):
        llm.stream([{"role": "user", "content": "big"}])


def test_template_refusals_stay_parameter_errors():
    template = ChatTemplate("{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                            "{{ messages[0].content }}", {})
    assert template.render([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(InvalidParameterError, match="refused the messages: no system role"):
        template.render([{"role": "system", "content": "x"}])


def test_real_template_renders_like_the_plain_sandbox(default_model_dir):
    """The limits change nothing for a real template: same text as jinja's own sandbox, and still fast."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    llm = edgellm.load(default_model_dir)
    source = (default_model_dir / "chat_template.jinja").read_text()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ~ {{ x }} 100%"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 plus 2?"}]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                          extensions=["jinja2.ext.loopcontrols"]).from_string(source)
    expected = plain.render(messages=messages, add_generation_prompt=True,
                            **llm.manifest.special_tokens.get("template_vars", {}))
    assert llm.render_chat(messages) == expected
    started = time.perf_counter()
    for _ in range(100):
        llm.render_chat(messages)
    assert (time.perf_counter() - started) / 100 < 0.01


# Idioms of real templates (Llama 3, Mistral, Qwen 2 with tools, Zephyr): the limits must not change their output.
REAL_IDIOMS = {
    "llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
              " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
              "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "mistral": "{{ bos_token }}{% for message in messages if message['role'] != 'system' %}"
               "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
               "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}",
    "qwen2-tools": "{%- if tools %}{{- '<|im_start|>system\n' }}{%- for tool in tools %}{{- '\n' }}"
                   "{{- tool | tojson }}{%- endfor %}{{- '<|im_end|>\n' }}{%- endif %}"
                   "{%- for message in messages %}{{- '<|im_start|>' ~ message.role ~ '\n' ~ message.content ~ "
                   "'<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
                   "{%- endif %}",
    "zephyr": "{% set ns = namespace(n=0) %}{% for message in messages %}{% set ns.n = ns.n + 1 %}"
              "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ eos_token ~ '\n' }}"
              "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' ~ ns.n }}{% endif %}{% endfor %}"
              "{{ '%d messages, %s' % (messages|length, messages[-1]['content'][:5]) }}"
              "{{ messages|map(attribute='role')|join(', ') }}{{ ' x'|center(6) }}{{ 'a\tb'.expandtabs(4) }}",
}


@pytest.mark.parametrize("name", sorted(REAL_IDIOMS))
def test_real_template_idioms_render_as_in_the_plain_sandbox(name):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source = REAL_IDIOMS[name]
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    messages = [{"role": "user", "content": "Hi ~ {{ x }} 100%"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What is 2 plus 2?"}]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    plain.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))
    tools = [{"name": "add", "parameters": {"a": "int"}}]
    expected = plain.from_string(source).render(messages=messages, add_generation_prompt=True, tools=tools, **tokens)
    ours = ChatTemplate(source, {**tokens, "tools": tools})
    assert ours.render(messages) == expected and len(expected) > 40

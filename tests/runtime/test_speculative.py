"""Speculative decoding returns exactly the tokens plain decoding returns, whatever the drafter proposes."""

from __future__ import annotations

import numpy as np
import pytest

import edgellm
from edgellm.runtime.speculative import (ModelDrafter, PromptLookupDrafter, SpeculativeConfig, disable_speculation,
                                         enable_speculation)

from ..conftest import DRAFT_LAYERS, DRAFT_SEED, _convert, _prebuilt, build_tiny_hf_model

PROMPTS = [
    [{"role": "user", "content": "Turn on the kitchen light and tell me the time."}],
    "the cat sat on the mat, the cat sat on the mat, the cat sat on the",
    [{"role": "user", "content": "Repeat after me: one two three four five six seven."}],
]
GREEDY = edgellm.SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
SAMPLED = edgellm.SamplingParams(max_new_tokens=40, temperature=0.8, top_k=50, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A different random model (1 layer, other seed) with the same tokenizer."""
    prebuilt = _prebuilt("draft-fp32")
    if prebuilt is not None:
        return prebuilt
    hf = build_tiny_hf_model(tmp_path_factory.mktemp("draft-hf") / "draft", layers=DRAFT_LAYERS, seed=DRAFT_SEED)
    return _convert(hf, tmp_path_factory.mktemp("draft-fp32") / "model", "fp32")


def plain_tokens(model_dir, params):
    llm = edgellm.load(model_dir, threads=1)
    return [llm.generate(p, params).token_ids for p in PROMPTS]


def speculative_tokens(model_dir, draft, params, config):
    llm = edgellm.load(model_dir, threads=1)
    draft_llm = edgellm.load(draft, threads=1) if draft != "prompt-lookup" else draft
    session = enable_speculation(llm, draft_llm, config)
    out = [llm.generate(p, params).token_ids for p in PROMPTS]
    # A second pass over the same prompts re-uses cached prefixes with drafts in flight: still exact.
    out2 = [llm.generate(p, params).token_ids for p in PROMPTS]
    assert out2 == out
    return out, session.stats


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("k", [1, 4])
def test_self_draft_is_exact_and_accepts_nearly_everything(tiny_fp32_dir, params, k):
    expected = plain_tokens(tiny_fp32_dir, params)
    config = SpeculativeConfig(max_draft=k, adaptive=False)
    got, stats = speculative_tokens(tiny_fp32_dir, tiny_fp32_dir, params, config)
    assert got == expected
    if params.temperature == 0:
        assert stats.acceptance_rate > 0.9 and stats.tokens_per_pass > 1 + 0.5 * k


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("teacher", ["tiny_fp32_dir", "tiny_int8_invariant_dir"])
def test_a_bad_draft_is_rolled_back_exactly(request, teacher, draft_dir, params):
    teacher_dir = request.getfixturevalue(teacher)  # int8: exact because it was converted --batch-invariant
    expected = plain_tokens(teacher_dir, params)
    got, stats = speculative_tokens(teacher_dir, draft_dir, params, SpeculativeConfig(max_draft=3, adaptive=False))
    assert got == expected
    assert stats.drafted > 50 and stats.accepted < stats.drafted  # rejections happened and were rolled back


def test_prompt_lookup_is_exact(tiny_fp32_dir):
    expected = plain_tokens(tiny_fp32_dir, GREEDY)
    config = SpeculativeConfig(max_draft=4, adaptive=False)
    got, stats = speculative_tokens(tiny_fp32_dir, "prompt-lookup", GREEDY, config)
    assert got == expected
    assert stats.cycles > 0


def test_adaptive_switches_off_when_drafts_are_rejected(tiny_fp32_dir, draft_dir):
    llm = edgellm.load(tiny_fp32_dir, threads=1)
    session = enable_speculation(llm, edgellm.load(draft_dir, threads=1), SpeculativeConfig(probe_every=1000))
    expected = plain_tokens(tiny_fp32_dir, GREEDY)
    assert [llm.generate(p, GREEDY).token_ids for p in PROMPTS] == expected
    stats = session.stats
    assert stats.acceptance_rate < 0.3  # a random 1-layer draft rarely agrees with a random 2-layer model
    assert stats.current_k == 0 and stats.plain_steps > 3 * stats.cycles
    disable_speculation(llm)
    assert llm.session is session.target
    assert [llm.generate(p, GREEDY).token_ids for p in PROMPTS] == expected


def test_prompt_lookup_finds_the_latest_match():
    drafter = PromptLookupDrafter(max_ngram=3, min_ngram=1)
    assert drafter.propose([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 7], 3) == [1, 2, 5]
    assert drafter.propose([1, 2, 3, 4], 3) == []
    assert PromptLookupDrafter(max_ngram=2, min_ngram=2).propose([9, 4, 9, 8, 4], 2) == []
    assert drafter.propose([3, 4, 3], 5) == [4, 3]


def test_a_draft_with_another_tokenizer_is_refused(tiny_fp32_dir):
    from edgellm.errors import ModelFormatError

    llm = edgellm.load(tiny_fp32_dir, threads=1)
    other = edgellm.load(tiny_fp32_dir, threads=1)
    other.tokenizer.add_tokens(["<something-new>"])
    with pytest.raises(ModelFormatError, match="different tokenizer"):
        enable_speculation(llm, other)
    assert np.isfinite(llm.generate(PROMPTS[0], GREEDY).timings.total_ms)


@pytest.mark.parametrize("draft", ["model", "prompt-lookup"])
def test_load_with_a_draft_speculates_and_reports(tiny_fp32_dir, draft_dir, draft):
    expected = plain_tokens(tiny_fp32_dir, GREEDY)
    llm = edgellm.load(tiny_fp32_dir, threads=1, draft=draft_dir if draft == "model" else draft)
    assert [llm.generate(p, GREEDY).token_ids for p in PROMPTS] == expected
    stats = llm.speculation
    assert stats is not None and stats.cycles + stats.plain_steps > 0
    assert edgellm.load(tiny_fp32_dir, threads=1).speculation is None


def test_cli_generate_with_a_draft_reports_speculation(tiny_fp32_dir, draft_dir):
    import json

    from click.testing import CliRunner

    from edgellm.cli import main

    args = ["generate", "-m", str(tiny_fp32_dir), "--draft", str(draft_dir), "--max-new-tokens", "12", "--json", "hi"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["speculation"]["cycles"] + report["speculation"]["plain_steps"] > 0
    bad = CliRunner().invoke(main, ["generate", "-m", str(tiny_fp32_dir), "--draft", "no/such/folder", "hi"])
    assert bad.exit_code == 1 and "no/such/folder" in bad.output


def test_speculation_warns_unless_the_model_is_batch_invariant(tiny_fp32_dir, tiny_int8_invariant_dir, caplog):
    with caplog.at_level("WARNING", logger="edgellm.runtime.speculative"):
        enable_speculation(edgellm.load(tiny_fp32_dir, threads=1), "prompt-lookup")
        assert "--batch-invariant" in caplog.text
        caplog.clear()
        enable_speculation(edgellm.load(tiny_int8_invariant_dir, threads=1), "prompt-lookup")
        assert caplog.text == ""


class SlowSelfDrafter:
    """A real drafter (the model itself, so nearly every draft is accepted) that is slow in a way the cost
    model cannot see: it books its whole time as one-off cache catch-up (sync_ms), so the model believes
    drafting is free and speculation a big win, while every cycle really costs the sleep."""

    def __init__(self, session, sleep_s: float) -> None:
        from edgellm.runtime.speculative import ModelDrafter

        self.inner = ModelDrafter(session)
        self.sleep_s = sleep_s
        self.sync_ms = 0.0

    def propose(self, context, k):
        import time

        started = time.perf_counter()
        time.sleep(self.sleep_s)
        drafts = self.inner.propose(context, k)
        self.sync_ms = (time.perf_counter() - started) * 1000
        return drafts


def slowest_pass_s(model_dir, tokens: int = 8, repeats: int = 5) -> float:
    """The slowest of a few passes of up to `tokens` tokens through the real tiny model on this machine: the floor
    a padded pass must clear (about 1 ms on x86; 30x that and more under qemu, where 2 rows also cost twice 1)."""
    import time

    session = edgellm.load(model_dir, threads=1).session
    session.forward(list(range(5, 5 + tokens)), keep=tokens)  # the first pass sets up buffers: 3x slower, not timed
    slowest = 0.0
    for _ in range(repeats):
        session.truncate(0)
        for n in (1, tokens):
            started = time.perf_counter()
            session.forward(list(range(5, 5 + n)), keep=n)
            slowest = max(slowest, time.perf_counter() - started)
    return slowest


class PaddedPassSession:
    """The real tiny-model session, every pass padded to a fixed wall time, plus `per_token_s` for every row of
    logits kept past `free_rows` (a verify pass keeps one a token; a prefill one): like a memory-bound device,
    where one pass costs the same for 1 or 2 tokens. Padding, not adding, keeps the costs the controller measures
    the same on every machine, emulated arm64 included, as long as `pass_s` clears the model's own time (see
    slowest_pass_s)."""

    def __init__(self, inner, pass_s: float, per_token_s: float = 0.0, free_rows: int = 2) -> None:
        self.inner, self.pass_s, self.per_token_s, self.free_rows = inner, pass_s, per_token_s, free_rows

    def forward(self, token_ids, keep=1):
        import time

        started = time.perf_counter()
        logits = self.inner.forward(token_ids, keep)
        target = self.pass_s + self.per_token_s * max(0, keep - self.free_rows)
        time.sleep(max(0.0, target - (time.perf_counter() - started)))
        return logits

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_speculation_never_costs_what_the_cost_model_cannot_see(tiny_fp32_dir):
    from edgellm.runtime.speculative import SpeculativeSession

    pass_s = max(0.005, 2 * slowest_pass_s(tiny_fp32_dir, tokens=5))
    llm = edgellm.load(tiny_fp32_dir, threads=1)
    # the hidden cost outweighs a whole cycle's gain: at most max_draft + 1 tokens for one pass saved each
    drafter = SlowSelfDrafter(edgellm.load(tiny_fp32_dir, threads=1).session, sleep_s=max(0.15, 10 * pass_s))
    session = SpeculativeSession(PaddedPassSession(llm.session, pass_s), drafter,
                                 SpeculativeConfig(max_draft=4, probe_every=1000))
    llm.session = session
    expected = plain_tokens(tiny_fp32_dir, GREEDY)
    params = edgellm.SamplingParams(max_new_tokens=120, temperature=0.0, ignore_eos=True)
    got = [llm.generate(p, params).token_ids for p in PROMPTS]
    assert [g[:40] for g in got] == expected
    stats = session.stats
    assert stats.cycles >= 1 and stats.acceptance_rate > 0.9  # the drafts are good ...
    assert stats.draft_ms_per_token < 1.0  # ... the cost model believes drafting is free ...
    assert max(session.expected_speedup(k) for k in range(1, 5)) > 1.5  # ... and a big win ...
    # ... but the realized time per token says otherwise, so it decodes plainly.
    assert stats.realized_ms_per_token_speculating > stats.realized_ms_per_token_plain
    assert stats.current_k == 0 and stats.plain_steps > 5 * stats.cycles


class EmptySlowDrafter:
    """Looks for drafts (slowly) and never finds one: every step pays the search and gains nothing."""

    takes_array = True

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s, self.calls = sleep_s, 0

    def propose(self, context, k):
        import time

        self.calls += 1
        time.sleep(self.sleep_s)
        return []


def test_a_drafter_that_never_drafts_is_switched_off(tiny_fp32_dir):
    """Before any verify pass has been timed, the realized rate still vetoes drafting that only costs."""
    from edgellm.runtime.speculative import SpeculativeSession

    llm = edgellm.load(tiny_fp32_dir, threads=1)
    drafter = EmptySlowDrafter(0.02)
    session = SpeculativeSession(llm.session, drafter, SpeculativeConfig(probe_every=1000))
    llm.session = session
    params = edgellm.SamplingParams(max_new_tokens=80, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPTS[0], params)
    assert session.stats.cycles == 0 and session.stats.current_k == 0
    assert drafter.calls < 20  # without the veto it searched on every one of the 79 steps


def test_the_drafters_context_array_follows_every_truncation(tiny_fp32_dir):
    """The incremental int64 copy of the context equals the cached tokens after appends and roll-backs."""
    from edgellm.runtime.speculative import SpeculativeSession

    llm = edgellm.load(tiny_fp32_dir, threads=1)
    session = SpeculativeSession(llm.session, PromptLookupDrafter())
    rng = np.random.default_rng(0)
    session.forward([1, 2, 3, 4], keep=1)
    for _ in range(60):
        if rng.random() < 0.3:
            session.truncate(int(rng.integers(1, session.length + 1)))
        else:
            session.target.forward([int(t) for t in rng.integers(5, 50, int(rng.integers(1, 4)))], keep=1)
        token = int(rng.integers(5, 50))
        assert session._context(token).tolist() == session.target.tokens + [token]


class LateDrafter:
    """Finds nothing (slowly) for its first calls, then drafts with the model itself (nearly always accepted)."""

    def __init__(self, session, empty_calls: int) -> None:
        from edgellm.runtime.speculative import ModelDrafter

        self.inner, self.empty_calls, self.calls = ModelDrafter(session), empty_calls, 0

    def propose(self, context, k):
        import time

        self.calls += 1
        if self.calls <= self.empty_calls:
            time.sleep(0.02)
            return []
        return self.inner.propose(context, k)


def test_drafting_is_tried_again_after_a_veto_before_any_verify_pass(tiny_fp32_dir):
    """A veto from empty drafts is forgotten after probe_every plain steps; then drafting that pays starts."""
    from edgellm.runtime.speculative import SpeculativeSession

    llm = edgellm.load(tiny_fp32_dir, threads=1)
    drafter = LateDrafter(edgellm.load(tiny_fp32_dir, threads=1).session, empty_calls=8)
    session = SpeculativeSession(llm.session, drafter, SpeculativeConfig(probe_every=4))
    llm.session = session
    params = edgellm.SamplingParams(max_new_tokens=120, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPTS[0], params)
    assert drafter.calls > 8  # it looked again after the veto ...
    assert session.stats.cycles > 0 and session.stats.accepted > 10  # ... and drafted once drafts came


class OracleDrafter:
    """Proposes the known greedy continuation at no cost: the drafts' cost and quality do not depend on how fast
    this machine runs the model (under qemu a model drafter costs as much as the 5 ms a pass is meant to dominate)."""

    def __init__(self, expected) -> None:
        self.expected = list(expected)

    def propose(self, context, k):
        n = len(context)
        return self.expected[n:n + k] if list(context) == self.expected[:n] else []


def test_verify_cost_is_measured_per_k_and_the_cheap_k_is_found(tiny_fp32_dir):
    """A linear cost model, fed the first cycle's k=3, would price k=1 at ~67 ms and never draft; per-k costs
    find that k=1 costs ~nothing, draft at it, and drop back from k=2 once it is measured dear."""
    from edgellm.runtime.speculative import SpeculativeSession

    llm = edgellm.load(tiny_fp32_dir, threads=1)
    params = edgellm.SamplingParams(max_new_tokens=100, temperature=0.0, ignore_eos=True)
    expected = list(llm.encode(PROMPTS[0])) + list(llm.generate(PROMPTS[0], params).token_ids)
    llm.reset()
    # like edgellm's int8 kernels: a second row is nearly free, more rows are not (verify cost grows faster than k)
    pass_s = max(0.005, 2 * slowest_pass_s(tiny_fp32_dir))
    convex = PaddedPassSession(llm.session, pass_s, per_token_s=max(0.1, 2 * pass_s))
    session = SpeculativeSession(convex, OracleDrafter(expected),
                                 SpeculativeConfig(probe_every=4))
    llm.session = session
    got = llm.generate(PROMPTS[0], params).token_ids
    assert got[:40] == plain_tokens(tiny_fp32_dir, GREEDY)[0]
    costs = session.verify_extra_ms_by_k
    assert costs[3] > 25 and costs[1] < 5  # measured apart: 200 ms (or more) against ~0
    assert session.stats.current_k == 1
    assert session.stats.tokens_per_pass > 1.4


class ScriptedDrafter:
    """Drafts each prompt's known greedy continuation or, while `wrong`, the ids one above it (always rejected).
    Its looks are free, like prompt lookup's, so the session watches its drafts while it is not drafting."""

    looks_are_free = True

    def __init__(self, continuations, vocab_size: int) -> None:
        self.continuations, self.vocab_size, self.wrong = [list(c) for c in continuations], vocab_size, False

    def propose(self, context, k):
        n, context = len(context), list(context)
        for known in self.continuations:
            if known[:n] == context:
                drafts = known[n:n + k]
                return [(t + 1) % self.vocab_size for t in drafts] if self.wrong else drafts
        return []


def test_watched_drafts_decide_each_reply_without_verify_passes(tiny_fp32_dir):
    """A drafter whose looks are free is watched while the session decodes plainly: its drafts are checked
    against the tokens the generator picks. Wrong drafts are found out without one verify pass (before, the first
    cycle verified 3 of them blind), right ones switch drafting on, and a reply after a good one learns its own
    acceptance (before, the last reply's ~0.95 carried over and verified the wrong drafts first)."""
    from edgellm.runtime.speculative import SpeculativeSession

    llm = edgellm.load(tiny_fp32_dir, threads=1)
    params = edgellm.SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True)
    plain = [list(llm.generate(p, params).token_ids) for p in PROMPTS[:2]]
    llm.reset()
    drafter = ScriptedDrafter([list(llm.encode(p)) + out for p, out in zip(PROMPTS, plain)], llm.session.vocab_size)
    pass_s = max(0.005, 2 * slowest_pass_s(tiny_fp32_dir))
    # a pass costs the same for 1 token or 2; each more verified draft costs half a pass more
    costly = PaddedPassSession(llm.session, pass_s, per_token_s=pass_s / 2, free_rows=1)
    session = SpeculativeSession(costly, drafter)
    llm.session = session

    drafter.wrong = True
    assert list(llm.generate(PROMPTS[0], params).token_ids) == plain[0]
    assert session.stats.cycles == 0 and session.acceptance_estimate < 0.1

    drafter.wrong = False
    assert list(llm.generate(PROMPTS[1], params).token_ids) == plain[1]
    assert session.stats.cycles > 0 and session.stats.accepted > 20 and session.stats.rejected == 0

    cycles = session.stats.cycles
    drafter.wrong = True
    assert list(llm.generate(PROMPTS[0], params).token_ids) == plain[0]
    assert session.stats.cycles == cycles and session.stats.rejected == 0


class TimedTarget:
    """The real session, with the wall time of its one-token passes (plain decode steps) added up."""

    def __init__(self, inner) -> None:
        self.inner, self.plain_ms = inner, 0.0

    def forward(self, token_ids, keep=1):
        import time

        started = time.perf_counter()
        logits = self.inner.forward(token_ids, keep)
        if len(token_ids) == 1:
            self.plain_ms += (time.perf_counter() - started) * 1000
        return logits

    def __getattr__(self, name):
        return getattr(self.inner, name)


class WrongDrafter(ModelDrafter):
    """A real draft model's work (catch-up and draft steps), timed; its drafts are made wrong (id + 1), so
    speculation never pays and every cycle after the first is a probe."""

    def __init__(self, session) -> None:
        super().__init__(session)
        self.calls_ms: list[float] = []

    def propose(self, context, k):
        import time

        started = time.perf_counter()
        drafts = [(t + 1) % self.session.vocab_size for t in super().propose(context, k)]
        self.calls_ms.append((time.perf_counter() - started) * 1000)
        return drafts


def test_a_draft_models_probes_stay_within_their_budget(tiny_fp32_dir, draft_dir, monkeypatch):
    """While a draft model's drafts are rejected, its probes (catching its cache up to a new prompt, then drafting)
    cost at most PROBE_BUDGET of the plain decoding time, and the session still probes. Before the budget, the
    schedule alone probed a 10-layer draft of SmolLM2 every other reply, 1.1-1.9x slower than plain decoding."""
    from edgellm.runtime import speculative

    budget = 10 * speculative.PROBE_BUDGET  # the same rule on a sixth of the steps (at 0.2%: ~7 min under qemu)
    monkeypatch.setattr(speculative, "PROBE_BUDGET", budget)
    llm = edgellm.load(tiny_fp32_dir, threads=1)
    target = TimedTarget(llm.session)
    drafter = WrongDrafter(edgellm.load(draft_dir, threads=1).session)
    session = speculative.SpeculativeSession(target, drafter, SpeculativeConfig(probe_every=1))  # probes at will
    llm.session = session
    params = edgellm.SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    long_prompt = " ".join(["the kitchen light is on and the door is closed"] * 20)
    for reply in range(8):
        llm.generate(long_prompt if reply % 2 else PROMPTS[reply % 3], params)
    stats = session.stats
    # (a random model repeats, so id + 1 is rarely right; one lucky draft in two verified happens, so acceptance_rate
    # can be 0.5: count against every draft sent to verification instead)
    assert stats.current_k == 0 and stats.accepted < stats.drafted / 2
    first_cycle_ms, probes_ms = drafter.calls_ms[0], drafter.calls_ms[1:]
    assert probes_ms, "the session stopped probing altogether"
    assert sum(probes_ms) <= budget * target.plain_ms + max(probes_ms), (
        f"probes drafted {sum(probes_ms):.1f} ms in {len(probes_ms)} calls against {target.plain_ms:.0f} ms of "
        f"plain decoding (first cycle {first_cycle_ms:.1f} ms)")


def test_probes_that_find_nothing_grow_rarer(tiny_fp32_dir, draft_dir, monkeypatch):
    """n probes that found nothing may have cost PROBE_BUDGET / n of the plain decoding time, so they thin out
    as the square root of it. With the share undivided, a 10-layer draft of SmolLM2 that never paid probed every
    other reply of the prompt it caught up most cheaply, and those replies ran ~4% slower."""
    from edgellm.runtime import speculative

    budget = 20 * speculative.PROBE_BUDGET  # the same rule on an eighth of the steps (at 0.2%: ~6 min under qemu)
    monkeypatch.setattr(speculative, "PROBE_BUDGET", budget)
    llm = edgellm.load(tiny_fp32_dir, threads=1)
    target = TimedTarget(llm.session)
    drafter = WrongDrafter(edgellm.load(draft_dir, threads=1).session)
    session = speculative.SpeculativeSession(target, drafter, SpeculativeConfig(probe_every=1))
    llm.session = session
    params = edgellm.SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True)
    for _ in range(16):  # one short prompt again and again: the draft catches up a few tokens a probe
        llm.generate(PROMPTS[0], params)
    assert session.stats.current_k == 0
    probes_ms = drafter.calls_ms[1:]
    assert len(probes_ms) >= 2, "the session stopped probing altogether"
    assert sum(probes_ms) <= budget * target.plain_ms / len(probes_ms) + max(probes_ms), (
        f"{len(probes_ms)} probes drafted {sum(probes_ms):.2f} ms against {target.plain_ms:.0f} ms of plain decoding")


def test_a_draft_folder_is_loaded_with_its_threads_stopping_after_each_run(tiny_fp32_dir, draft_dir):
    """A draft's spinning threads took the cores from the model's verify passes (10 ms extra for one draft token
    instead of 0.5 on SmolLM2 with a 10-layer draft): load(draft=DIR) stops them after each run, the model's
    own keep spinning."""
    from edgellm.errors import InvalidParameterError

    llm = edgellm.load(tiny_fp32_dir, threads=1, draft=draft_dir)

    def stops(session) -> str | None:
        try:
            return session.session.get_session_options().get_session_config_entry("session.force_spinning_stop")
        except RuntimeError:  # onnxruntime: the entry was never set
            return None

    assert stops(llm.session.drafter.session) == "1"
    assert stops(llm.session.target) is None
    with pytest.raises(InvalidParameterError, match="spin="):
        edgellm.load(tiny_fp32_dir, spin="no")


def test_the_cost_model_is_not_re_evaluated_while_its_inputs_sit_still(tiny_fp32_dir, draft_dir):
    """While off, evaluating every k each plain step cost ~35 us of a ~9 ms step (0.4%) for an answer that had
    not changed: the best k is re-computed only when an estimate moves, and then agrees with a fresh evaluation."""
    from edgellm.runtime.speculative import ModelDrafter, SpeculativeSession

    llm = edgellm.load(tiny_fp32_dir, threads=1)
    drafter = ModelDrafter(edgellm.load(draft_dir, threads=1).session)
    drafter.propose = lambda context, k, propose=drafter.propose: [(t + 1) % 256 for t in propose(context, k)]
    session = SpeculativeSession(llm.session, drafter)
    evaluations = []
    session.expected_speedup = lambda k, evaluate=session.expected_speedup: evaluations.append(k) or evaluate(k)
    llm.session = session
    params = edgellm.SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True)
    for reply in range(6):
        llm.generate(PROMPTS[reply % 3], params)
    stats = session.stats
    assert stats.current_k == 0 and stats.plain_steps > 300
    assert len(evaluations) < 3 * stats.plain_steps, (  # every k of 6 on every step was 7 a step
        f"{len(evaluations)} evaluations of the cost model in {stats.plain_steps} plain steps")
    best_k, best = session._best_k()  # (two k can be within the drift of each other: judge the speedups, not k)
    fresh = max(session.expected_speedup(k) for k in range(1, session.config.max_draft + 1))
    assert best == pytest.approx(fresh, rel=0.03) and session.expected_speedup(best_k) == pytest.approx(fresh, rel=0.03)

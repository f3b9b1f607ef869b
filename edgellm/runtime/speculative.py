"""Speculative decoding: a cheap drafter proposes k tokens, the model checks them all in one forward pass.

    draft   d1..dk = drafter(context + [t])            (a small model with the same tokenizer, or prompt lookup)
    verify  logits(t, d1..dk) = model.forward([t, d1..dk], keep=k+1)     one pass, in place in the KV cache
    use     the generator samples from logits row 0; if it picks d1, row 1 is already there, and so on;
            at the first token it does not pick, the unused rows are dropped and the cache rolled back.

`SpeculativeSession` does this behind the `DecoderSession` interface, so the one generation loop
(`generator.Stream`: prefill → sample → stop check → step) runs unchanged: it still samples every
token itself from the model's own logits, which is why the output equals plain decoding (greedy, and
seeded sampling too) — the drafter only decides how much work one forward pass does.

Under a constraint (json_schema, regex, grammar) the generator samples each row under the grammar's mask as
always; the session only cuts drafts where the grammar forbids them and appends the tokens the grammar
forces (JSON keys, closing brackets), which are then verified like any draft.

On a CPU a (k+1)-token pass costs more than a 1-token one, so speculation pays only while enough drafts
are accepted. The session measures its acceptance rate and the pass times as it goes, picks the k with
the best expected tokens per second, and decodes plainly when no k beats plain decoding (probing now
and then, in case the text becomes easier to predict). The extra cost of a verify pass is measured for
each k apart, because it is far from linear in k: with edgellm's int8 kernels one extra token costs
~3% of a step (the decode kernel absorbs a second row while it waits for memory) and three cost ~50%.
A k not yet tried is estimated from the nearest one measured, scaled linearly (optimistic above it,
pessimistic below), and is then judged on its own measurement once tried. Each verified row also attends
over the whole context, so a cost measured at one context length is moved by k times what a plain step
gained or lost since (on the int8 kernels a verify pass's extra cost was ~3x larger after 925 tokens
than after 50).

A drafter whose looks are free (prompt lookup: ~10 us a look against a ~10 ms step) is *watched* while
the session decodes plainly: it still proposes, and its draft is checked token by token against what the
generator picks next, exactly as a verify pass would have judged it, at no cost. So each reply learns its
own acceptance rate from the prior (a summary of a long text took ~1 in 4 lookups, a repetition ~3 in 4),
starts drafting only after two of its own draft tokens were watched, and needs no probing passes while off. A
drafter that costs a model pass (a draft model) is not watched: it is probed now and then instead, within a
budget: a probe first catches the draft's cache up to the context (a whole new prompt: ~600 ms for a
10-layer draft after 925 tokens, more than a 64-token reply's decoding), so probes may spend at most 0.2% of
the plain decoding time since speculation last paid, divided by 1 + the number of probes that found nothing
since (each one makes the next less likely to find anything), and one waits for a reply whose context is cheap
to catch up.

The model of the cost cannot see everything (a multi-token pass that takes a slower kernel, drafts that
are found but rejected, the generator's own work per token), so the session also clocks what each mode
really delivers: the wall time from one decode call to the next, per token, while speculating and
while not. Once both are known, speculating is vetoed while its realized time per token is more than
10% above the plain one: a safety net for what the cost model misses, loose enough that the noise of
mixed positions and replies does not switch off drafting that pays.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import InvalidParameterError, ModelFormatError
from .generator import common_prefix_length, prefill
from .measure import greedy
from .session import DecoderSession

logger = logging.getLogger(__name__)


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k tokens likely to follow context (may be fewer, or none)."""


class ModelDrafter:
    """Greedy drafts from a smaller model (its own DecoderSession and KV cache, same tokenizer)."""

    def __init__(self, session: DecoderSession, eos_token_ids: Sequence[int] = ()) -> None:
        self.session = session
        self.eos = frozenset(eos_token_ids)
        self.sync_ms = 0.0  # time of the last call spent catching the draft's cache up (not per-draft cost)
        self.sync_ms_per_token: float | None = None  # measured cost of catching up, per token (None: not yet)

    def catch_up_tokens(self, context: Sequence[int]) -> int:
        """Tokens of `context` the draft's cache does not hold: what the next draft must prefill first."""
        return len(context) - common_prefix_length(self.session.tokens, context)

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        if len(context) + k > self.session.capacity:
            return []  # the draft's cache is full; the model decodes on alone
        self.sync_ms = 0.0
        if (missing := self.catch_up_tokens(context)) > 2:
            # Catching up more than the usual 1-2 tokens (a new prompt, or after plain steps) is a one-off
            # cost: timed apart, so the per-draft estimate stays the steady-state one.
            started = time.perf_counter()
            prefill(self.session, context[:-1])
            self.sync_ms = (time.perf_counter() - started) * 1000
            rate = self.sync_ms / (missing - 1)
            self.sync_ms_per_token = rate if self.sync_ms_per_token is None else (self.sync_ms_per_token + rate) / 2
        return greedy(self.session, context, k, self.eos, reuse_cache=True).tokens  # re-uses the draft's cache


class PromptLookupDrafter:
    """Drafts by copying: find the latest earlier occurrence of the context's last n tokens (n = max..min)
    and propose what followed it. No second model; pays off on replies that quote the prompt.

    `takes_array`: SpeculativeSession hands it the context as an int64 array it keeps up to date
    incrementally, so a draft costs a search, not a conversion of the whole context every step."""

    takes_array = True
    looks_are_free = True  # a look costs ~10 us against a ~10 ms step: see SpeculativeSession's watching

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidParameterError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got "
                                        f"{min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ids = context if isinstance(context, np.ndarray) else np.asarray(context, dtype=np.int64)
        n_ctx = len(ids)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            pattern = ids[n_ctx - n:]
            # Start positions i < n_ctx - n whose n tokens equal the pattern, narrowed one token at a time in
            # numpy (a Python loop over the candidates cost ~200 us a step on a 900-token context: 3% of a step).
            starts = np.flatnonzero(ids[:n_ctx - n] == pattern[0])
            for j in range(1, n):
                if not starts.size:
                    break
                starts = starts[ids[starts + j] == pattern[j]]
            if starts.size:
                i = int(starts[-1])  # the latest occurrence
                return ids[i + n:i + n + k].tolist()
        return []


MIN_PLAIN_SAMPLES = 3
# Watching (drafters whose looks are free): each reply starts from the prior at this weight, and drafts only
# after WATCH_FIRST tokens of its own drafts were watched (checked against what the generator picked).
WATCH_PRIOR_WEIGHT = 2.0
WATCH_FIRST = 2
# A reply's own estimate rests on a handful of its tokens, and its replies are short: drafting must be expected
# to pay by this much more than the configured margin. On SmolLM2's chat, repetition and long-context replies,
# prompt lookup hovers near break-even (verified acceptance ~0.4 at +30% a verify pass) and edit-a-quote
# clears it easily.
WATCH_EXTRA_MARGIN = 0.10
# The cost model's best k is re-computed when the plain step moved by more than this share since it was last
# computed (or any other estimate moved). A 5% slower step moves an expected speedup by at most ~2.5% (a draft as
# slow as the model, k=1; ~0.5% for prompt lookup), against the 5% margin a decision needs.
PLAIN_DRIFT = 0.05
MAX_PROMPT_INTERVAL = 8  # while off, probe at least on every 8th new prompt
# While off, a draft model (a drafter with a cache to catch up, ModelDrafter) probes only while what its probes
# cost beyond plain steps (catching its cache up to the context, k draft steps, the verify pass's extra) stays
# within this share of the plain decoding time since speculation last paid. A probe of a 10-layer draft of
# SmolLM2 cost 30-70 ms after a short prompt and ~600 ms after a 925-token one (its whole cache caught up),
# against ~0.6 s for a 64-token reply: on the schedule alone, a probe every other reply made decoding 1.1-1.9x
# slower than plain. Probes go to the prompts the draft catches up most cheaply (the shortest), so one kind of
# prompt can pay several times the budget: at 1% the chat prompt, shortest of five kinds, decoded 1.09x slower
# than plain, at 0.5% 1.034x (benchmarks/speculation_cost_draft_model_budget*.json). At 0.2% a probe of ~20 ms
# comes about every 10 s of plain decoding (~1,000 tokens).
# The share is divided by 1 + the probes since speculation last paid: after n probes that found nothing, all of
# them may have cost PROBE_BUDGET / n of the plain time, so the n-th waits ~2n times longer than the first and n grows
# as the square root of the decoding time (a 12 ms probe: ~8 in 6 minutes, ~24 in an hour). Without it, a
# 10-layer draft that never paid (0 of 26 probed drafts accepted) probed every other reply of the chat prompt, the
# one it caught up most cheaply, and those replies ran ~4% slower than the others: 1.024x plain over 90 rounds
# (benchmarks/speculation_cost_draft_model_undivided.json), 1.016x with the share divided (6 probe cycles, not 26).
PROBE_BUDGET = 0.002
MIN_REALIZED_TOKENS = 6  # tokens timed in a mode before its realized rate may overrule the cost model
REALIZED_MEMORY = 0.9    # forgetting factor per token of the realized ms/token estimates (~10-token window)
# The realized rates veto speculation only when it is measurably slower than plain decoding: they mix
# positions and replies (a long context's steps are slower whichever mode ran them), so demanding a realized
# *gain* of the cost model's margin as well switched off drafting that paid (chat 1.07x plain against 1.02x
# with the cost model alone, benchmarks/speculation_cost.json before this change).
REALIZED_VETO_MARGIN = 0.10
# A veto is forgotten after this many plain steps (x probe_every), doubling after each retry that fails.


@dataclass(frozen=True)
class SpeculativeConfig:
    max_draft: int = 6            # largest k tried
    probe_every: int = 32         # while off, plain steps before a probing cycle (doubles after each failed probe)
    margin: float = 0.05          # speculate only if expected to be this much faster than plain decoding
                                  # (a watched drafter, prompt lookup, needs WATCH_EXTRA_MARGIN more)
    acceptance_prior: float = 0.6 # initial guess of the per-token acceptance rate
    memory: float = 0.9           # forgetting factor of the running estimates (per cycle)
    adaptive: bool = True         # False: always draft max_draft tokens (for tests and k sweeps)

    def __post_init__(self) -> None:
        if self.max_draft < 1 or self.probe_every < 1 or not 0 <= self.margin < 1 or not 0 < self.memory < 1 \
                or not 0 < self.acceptance_prior < 1:
            raise InvalidParameterError(f"invalid speculative settings {self}: need max_draft >= 1, "
                                        "probe_every >= 1, 0 <= margin < 1, 0 < memory < 1, 0 < prior < 1")


@dataclass(frozen=True)
class SpeculationStats:
    cycles: int             # verify passes with at least one draft
    drafted: int            # draft tokens sent to verification
    accepted: int           # drafts the generator picked
    rejected: int           # drafts it did not pick (the rest of that chain is never looked at)
    plain_steps: int        # single-token steps (speculation off, or no draft)
    acceptance_rate: float  # accepted / (accepted + rejected): per-token agreement of draft and model
    tokens_per_pass: float  # decode tokens per model forward pass (1.0 = no gain)
    current_k: int          # 0 while speculation is off
    plain_ms: float         # measured mean of one plain step
    verify_ms_per_extra_token: float  # at the current k (or the last k measured while off)
    draft_ms_per_token: float
    realized_ms_per_token_speculating: float = math.nan  # wall per token, decode call to decode call
    realized_ms_per_token_plain: float = math.nan


class SpeculativeSession:
    """Wraps the model's DecoderSession; everything the generator uses behaves as before."""

    def __init__(self, target: DecoderSession, drafter: Drafter, config: SpeculativeConfig | None = None) -> None:
        self.target = target
        self.drafter = drafter
        self.config = config or SpeculativeConfig()
        self._pending: deque[tuple[int, np.ndarray]] = deque()  # drafted tokens in the cache, with their logits
        prior, weight = self.config.acceptance_prior, 4.0
        self._acc, self._rej = prior * weight, (1 - prior) * weight  # forgetting counts of accept / reject
        self._plain_samples: deque[float] = deque(maxlen=9)  # recent plain steps; their median is the baseline
        self._plain_ms: float | None = None
        self._extra_ms: dict[int, float] = {}  # k -> measured verify cost of k drafts beyond a plain step
        self._extra_plain_ms: dict[int, float] = {}  # k -> the plain step's cost when _extra_ms[k] was measured
        self._draft_ms: float | None = None
        self._k = self._first_k = min(3, self.config.max_draft)
        self._off_steps = 0
        self._probe_interval = self.config.probe_every
        self._decoding = False  # the last call was a decode step (so the next prefill is a new prompt)
        self._prompts_off = 0
        self._prompt_interval = 1
        self._cycles = self._drafted = self._accepted = self._rejected = self._plain = 0
        # Set by the generator for a constrained reply: (drafts, k) -> the drafts the grammar allows, plus the
        # tokens it forces after them. Drafts it forbids could never be sampled, so they are not verified.
        self.draft_filter: Callable[[list[int], int], list[int]] | None = None
        # Realized wall ms per token in each mode, from one decode call to the next (generator work included).
        self._last_call: tuple[float, bool] | None = None  # (time of the last decode call, was it speculative)
        self._realized = {True: [0.0, 0.0], False: [0.0, 0.0]}  # mode -> [weighted ms sum, weight]
        self._realized_tokens = {True: 0, False: 0}
        self._since_speculating = 0  # plain steps since the last speculative token was timed
        self._veto_interval = self.config.probe_every
        self._probing = False       # the current cycle is a probe while off
        self._probe_ms = 0.0        # what probes cost beyond plain steps since speculation last paid
        self._off_plain_ms = 0.0    # plain decoding time over the same span
        self._probes_off = 0        # probes over the same span (none of them paid)
        self._catch_up: tuple[int, int] | None = None  # (context length, draft tokens to catch up then), per reply
        self._best_cache: tuple[tuple, float, tuple[int, float]] | None = None  # _best_k's inputs, plain ms, answer
        # The committed tokens as an int64 array for drafters that take one (prompt lookup): positions below
        # _mirrored equal target.tokens; truncate() lowers it, and a draft copies only what was appended since.
        self._mirror = np.zeros(target.capacity + 2, dtype=np.int64)
        self._mirrored = 0
        # Watching: while not drafting, a drafter whose looks are free still proposes, and its drafts are
        # checked against the tokens the generator picks next: acceptance learned without a verify pass.
        self._watches = bool(getattr(drafter, "looks_are_free", False)) and self.config.adaptive
        self._watched: deque[int] = deque()  # the watched draft's tokens not yet checked
        self._reply_watched = 0  # watched draft tokens checked in the current reply
        if self._watches:
            self._new_reply()

    # --- the DecoderSession interface ---------------------------------------------------------------
    @property
    def provider(self) -> str:
        return self.target.provider

    @property
    def capacity(self) -> int:
        return self.target.capacity

    @property
    def vocab_size(self) -> int:
        return self.target.vocab_size

    @property
    def tokens(self) -> list[int]:
        """Tokens the generator has committed (drafts waiting for its decision are not among them)."""
        return self.target.tokens[:self.length]

    @property
    def length(self) -> int:
        return self.target.length - len(self._pending)

    def truncate(self, length: int) -> None:
        self._drop_pending()
        self._watched.clear()
        self.target.truncate(length)
        self._mirrored = min(self._mirrored, length)

    def _context(self, token: int) -> Sequence[int]:
        """The committed tokens plus `token`: what a drafter continues."""
        if not getattr(self.drafter, "takes_array", False):
            return self.target.tokens + [token]
        tokens, n = self.target.tokens, self.target.length
        start = self._mirrored
        if n > start:
            self._mirror[start:n] = tokens[start:n]
        self._mirrored = n
        self._mirror[n] = token
        return self._mirror[:n + 1]

    def forward(self, token_ids: Sequence[int], keep: int = 1) -> np.ndarray:
        decode_step = len(token_ids) == 1 and keep == 1
        now = time.perf_counter()
        if decode_step and self._last_call is not None:
            self._learn_realized(self._last_call[1], (now - self._last_call[0]) * 1000)
        self._last_call = None
        if decode_step and self._watched:
            self._check_watched(int(token_ids[0]))
        if decode_step and self._pending:
            token, row = self._pending[0]
            if token == int(token_ids[0]):
                self._pending.popleft()
                self._accepted += 1
                self._acc += 1
                self._last_call = (now, True)
                return row
            self._rej += 1  # the generator went another way: the chain from here on is dropped below
            self._rejected += 1
        self._drop_pending()
        if not decode_step:
            self._catch_up = None
            self._watched.clear()
            if self._watches and self._decoding:
                self._new_reply()
            if self._k == 0 and self._decoding:  # a new prompt: its reply may be easier to predict, so look
                self._prompts_off += 1             # again soon, on every 1st, 2nd, 4th... prompt while off
                if self._prompts_off >= self._prompt_interval:
                    self._prompts_off = 0
                    self._prompt_interval = min(2 * self._prompt_interval, MAX_PROMPT_INTERVAL)
                    self._off_steps = max(self._off_steps, self._probe_interval - 1)
            self._decoding = False
            return self.target.forward(token_ids, keep)
        self._decoding = True
        k = self._choose_k()
        if k == 0:
            if self._watches and not self._watched:
                self._watched.extend(self.drafter.propose(self._context(int(token_ids[0])), self.config.max_draft))
                if self._watched:
                    self._forget()
            return self._plain_step(token_ids)
        self._watched.clear()  # a verify pass learns the same thing; counting both would count it twice
        started = time.perf_counter()
        drafts = self.drafter.propose(self._context(int(token_ids[0])), k)
        if self.draft_filter is not None:
            drafts = self.draft_filter(drafts, k)
        drafted_at = time.perf_counter()
        draft_ms = (drafted_at - started) * 1000 - getattr(self.drafter, "sync_ms", 0.0)
        if self._probing:  # what the probe costs beyond a plain step: drafting (catch-up included), and below,
            self._probe_ms += (drafted_at - started) * 1000  # the verify pass's extra
        if not drafts or self.length + 1 + len(drafts) > self.capacity:
            # No draft: a plain step, but one that paid for looking; its time counts against speculating.
            return self._plain_step(token_ids, started=now, speculative=True)
        rows = self.target.forward([int(token_ids[0]), *drafts], keep=len(drafts) + 1)
        done = time.perf_counter()
        self._learn_cycle(len(drafts), draft_ms, (done - drafted_at) * 1000)
        if self._probing:
            self._probe_ms += max(0.0, (done - drafted_at) * 1000 - (self._plain_ms or 0.0))
        self._pending.extend(zip(drafts, rows[1:, None, :]))
        self._drafted += len(drafts)
        self._last_call = (now, True)
        return rows[:1]

    # --- adaptation ---------------------------------------------------------------------------------
    def _plain_step(self, token_ids: Sequence[int], started: float | None = None,
                    speculative: bool = False) -> np.ndarray:
        if not speculative and self._realized_tokens[True]:
            self._since_speculating += 1
            if self._since_speculating >= self._veto_interval:  # the text may have changed: let the cost model retry
                self._realized[True] = [0.0, 0.0]
                self._realized_tokens[True] = 0
                self._veto_interval = min(2 * self._veto_interval, 16 * self.config.probe_every)
        began = time.perf_counter()
        logits = self.target.forward(token_ids, keep=1)
        step_ms = (time.perf_counter() - began) * 1000
        self._plain_samples.append(step_ms)
        if self._k == 0:
            self._off_plain_ms += step_ms
        self._plain_ms = statistics.median(self._plain_samples)  # a median: one slow step must not decide k (and
        # statistics' is ~10x cheaper than numpy's on 9 numbers: this runs every plain step)
        self._plain += 1
        self._last_call = (began if started is None else started, speculative)
        return logits

    def _learn_realized(self, speculative: bool, ms: float) -> None:
        entry = self._realized[speculative]
        entry[0] = REALIZED_MEMORY * entry[0] + ms
        entry[1] = REALIZED_MEMORY * entry[1] + 1.0
        self._realized_tokens[speculative] += 1
        if speculative:
            self._since_speculating = 0

    def realized_ms_per_token(self, speculative: bool) -> float | None:
        """Wall ms per generated token while (not) speculating, recent tokens weighted most; None until known."""
        if self._realized_tokens[speculative] < MIN_REALIZED_TOKENS:
            return None
        total, weight = self._realized[speculative]
        return total / weight

    def _realized_says_no(self) -> bool:
        spec, plain = self.realized_ms_per_token(True), self.realized_ms_per_token(False)
        return spec is not None and plain is not None and spec > plain * (1 + REALIZED_VETO_MARGIN)

    def _learn_cycle(self, k: int, draft_ms: float, verify_ms: float) -> None:
        self._cycles += 1
        self._draft_ms = self._mix(self._draft_ms, draft_ms / k)
        if self._plain_ms is not None:
            self._extra_ms[k] = self._mix(self._extra_ms.get(k), max(0.0, verify_ms - self._plain_ms))
            self._extra_plain_ms[k] = self._mix(self._extra_plain_ms.get(k), self._plain_ms)
        self._forget()

    def _forget(self) -> None:
        """Once per draft (verified or watched), older outcomes lose weight."""
        m = self.config.memory
        self._acc, self._rej = self._acc * m, self._rej * m

    def _check_watched(self, token: int) -> None:
        """The generator picked `token`: score the watched draft's next token as a verify pass would have."""
        self._reply_watched += 1
        if token == self._watched[0]:
            self._watched.popleft()
            self._acc += 1
        else:
            self._watched.clear()
            self._rej += 1

    def _new_reply(self) -> None:
        """A new prompt may be as predictable as the last one or not at all (a summary of a long text after a
        repetition): with watching free, each reply learns its own acceptance, from the prior."""
        prior = self.config.acceptance_prior
        self._acc, self._rej = prior * WATCH_PRIOR_WEIGHT, (1 - prior) * WATCH_PRIOR_WEIGHT
        self._reply_watched = 0
        self._plain_samples.clear()  # this context's step cost is measured again (its first steps are plain)

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else self.config.memory * old + (1 - self.config.memory) * new

    @property
    def acceptance_estimate(self) -> float:
        return self._acc / (self._acc + self._rej)

    def verify_extra_ms(self, k: int) -> float | None:
        """The extra ms of verifying k drafts: measured for k, else scaled linearly from the nearest measured k
        (None before any verify pass). Linear is optimistic above (costs grow faster than k), so an unmeasured
        larger k gets tried and then judged on its own measurement."""
        if not self._extra_ms:
            return None
        nearest = k if k in self._extra_ms else min(self._extra_ms, key=lambda measured: (abs(measured - k), measured))
        # Each extra row attends over the whole context, so it costs what a plain step gained since then:
        # verifying 2 drafts costs ~1.4 ms more than a plain step after 50 tokens and ~5 ms after 925 (int8,
        # Xeon VM), while the plain step itself grew ~3 ms.
        growth = (self._plain_ms or 0.0) - self._extra_plain_ms[nearest]
        return max(0.0, self._extra_ms[nearest] * k / nearest + k * growth)

    def expected_speedup(self, k: int) -> float:
        """Expected tokens per ms with k drafts, relative to plain decoding (needs both timings measured)."""
        a = min(self.acceptance_estimate, 0.999)
        tokens = (1 - a ** (k + 1)) / (1 - a)  # accepted drafts + the model's own next token
        cost = k * (self._draft_ms or 0.0) + self._plain_ms + (self.verify_extra_ms(k) or 0.0)
        return tokens / cost * self._plain_ms

    def _choose_k(self) -> int:
        self._probing = False
        if not self.config.adaptive:
            return self.config.max_draft
        if len(self._plain_samples) < MIN_PLAIN_SAMPLES or self._realized_tokens[False] < MIN_REALIZED_TOKENS:
            return 0  # the first steps measure plain decoding
        vetoed = self._realized_says_no()
        if self._watches and self._reply_watched < WATCH_FIRST:
            self._k = 0  # this reply's first drafts are watched, not verified
            return 0
        if not self._extra_ms and not vetoed:
            if self._watches and self.acceptance_estimate < self.config.acceptance_prior:
                self._k = 0
                return 0  # watched drafts are no better than the prior: measuring a verify pass would only cost
            return self._first_k  # the first cycle measures verification (tried again once a veto is forgotten)
        # (Vetoed before any cycle: drafting found nothing, and looking cost more than plain steps did.)
        best_k, best = self._best_k() if self._extra_ms else (0, 0.0)
        if not vetoed and self.realized_ms_per_token(True) is not None:
            self._veto_interval = self.config.probe_every  # speculation proved itself: retries after a veto stay quick
        margin = self.config.margin + (WATCH_EXTRA_MARGIN if self._watches else 0.0)
        if best_k and best >= 1 + margin and not vetoed:
            self._k, self._off_steps, self._probe_interval = best_k, 0, self.config.probe_every
            self._prompt_interval = 1
            self._probe_ms = self._off_plain_ms = 0.0
            self._probes_off = 0
            return best_k
        self._k = 0
        if self._watches:
            return 0  # watching keeps the acceptance estimate current: no probing pass needed
        self._off_steps += 1
        if self._off_steps >= self._probe_interval and self._probe_fits_budget():
            self._off_steps = 0  # look again: the text may have become predictable
            self._probing = True
            self._probes_off += 1
            self._probe_interval = min(2 * self._probe_interval, 4 * self.config.probe_every)
            return 1 if 1 not in self._extra_ms else min(2, self.config.max_draft)  # k=1 is estimated, not measured,
        return 0                                                                   # until a probe tries it

    def _best_k(self) -> tuple[int, float]:
        """The k the cost model expects to pay most, and its expected speedup. Re-computed only when an input moved:
        the estimates (a draft judged, a cycle timed, a new reply) or the plain step by over PLAIN_DRIFT. While off,
        they sit still for hundreds of steps, and evaluating every k on every step cost ~35 of the ~55 us a plain
        step spent in this class (2-core Xeon VM), ~0.4% of a 9 ms step."""
        plain = self._plain_ms or 0.0
        inputs = (self._acc, self._rej, self._cycles)  # draft ms and verify extras move only with a timed cycle
        cached = self._best_cache
        if cached is not None and cached[0] == inputs and abs(plain - cached[1]) <= PLAIN_DRIFT * cached[1]:
            return cached[2]
        best_k = max(range(1, self.config.max_draft + 1), key=self.expected_speedup)
        self._best_cache = (inputs, plain, (best_k, self.expected_speedup(best_k)))
        return self._best_cache[2]

    def _probe_fits_budget(self) -> bool:
        """Would this probe keep all probes since speculation last paid within PROBE_BUDGET of the plain
        decoding time, divided by 1 + their number? Counts what the draft must catch up first (a whole new prompt,
        for a draft model), so a probe waits for a reply whose context the draft can take cheaply."""
        if not hasattr(self.drafter, "catch_up_tokens"):
            return True  # not a draft model: its looks cost no model pass, and the veto bounds what they waste
        allowance = PROBE_BUDGET * self._off_plain_ms / (1 + self._probes_off) - self._probe_ms
        rate = getattr(self.drafter, "sync_ms_per_token", None)  # a drafter of one's own may not time catch-ups
        if allowance < 0 or rate is None:
            return allowance >= 0
        length = self.target.length
        if self._catch_up is None:  # counted once a reply: later steps add the tokens decoded since
            self._catch_up = (length, self.drafter.catch_up_tokens(self.target.tokens))
        then, missing = self._catch_up
        return (missing + length - then) * rate <= allowance

    def _extra_per_token(self) -> float:
        k = self._k if self._k in self._extra_ms else next(reversed(self._extra_ms), None)
        return self._extra_ms[k] / k if k else math.nan

    @property
    def verify_extra_ms_by_k(self) -> dict[int, float]:
        """Measured extra ms of a verify pass over a plain step, by number of drafts verified."""
        return dict(sorted(self._extra_ms.items()))

    def _drop_pending(self) -> None:
        if self._pending:
            length = self.length
            self.target.truncate(length)
            self._mirrored = min(self._mirrored, length)
            self._pending.clear()

    @property
    def stats(self) -> SpeculationStats:
        passes = self._cycles + self._plain
        return SpeculationStats(
            cycles=self._cycles, drafted=self._drafted, accepted=self._accepted, rejected=self._rejected,
            plain_steps=self._plain,
            acceptance_rate=self._accepted / checked if (checked := self._accepted + self._rejected) else 0.0,
            tokens_per_pass=(passes + self._accepted) / passes if passes else 1.0,
            current_k=self._k, plain_ms=self._plain_ms or math.nan,
            verify_ms_per_extra_token=self._extra_per_token(),
            draft_ms_per_token=self._draft_ms if self._draft_ms is not None else math.nan,
            realized_ms_per_token_speculating=self.realized_ms_per_token(True) or math.nan,
            realized_ms_per_token_plain=self.realized_ms_per_token(False) or math.nan)


def enable_speculation(llm, draft="prompt-lookup", config: SpeculativeConfig | None = None) -> SpeculativeSession:
    """Make `llm` decode speculatively, in place; returns the session, whose `.stats` report acceptance.

    draft: another loaded LLM with the same tokenizer (e.g. a distilled student; load it with spin=False, as
    load(..., draft=DIR) does), or "prompt-lookup".
    """
    if isinstance(llm.session, SpeculativeSession):
        disable_speculation(llm)
    if isinstance(draft, str):
        if draft != "prompt-lookup":
            raise InvalidParameterError(f"draft={draft!r}: pass a loaded LLM or 'prompt-lookup'.")
        drafter: Drafter = PromptLookupDrafter()
    else:
        if draft is llm:
            raise InvalidParameterError("the draft must be a second loaded model, not the model itself.")
        if draft.tokenizer.to_str() != llm.tokenizer.to_str():
            raise ModelFormatError(f"the draft {draft.manifest.name!r} has a different tokenizer from "
                                   f"{llm.manifest.name!r}. Fix: draft with a model distilled from this one "
                                   "(edgellm distill), or use draft='prompt-lookup'.")
        drafter = ModelDrafter(draft.session, llm.manifest.generation.eos_token_ids)
    if not llm.manifest.graph.batch_invariant:
        logger.warning("%s was not converted --batch-invariant: speculative output can differ from plain decoding "
                       "where two tokens nearly tie. Fix, for identical output: re-convert it with "
                       "`edgellm convert ... --batch-invariant`.", llm.manifest.name)
    with llm._lock:
        llm.session = SpeculativeSession(llm.session, drafter, config)
    return llm.session


def disable_speculation(llm) -> None:
    with llm._lock:
        if isinstance(llm.session, SpeculativeSession):
            llm.session.truncate(llm.session.length)
            llm.session = llm.session.target


__all__ = ["SpeculativeSession", "SpeculativeConfig", "SpeculationStats", "ModelDrafter", "PromptLookupDrafter",
           "enable_speculation", "disable_speculation"]

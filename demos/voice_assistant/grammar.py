"""The command grammar: every sentence hassil would accept, as a recognizer grammar (after Speech-to-Phrase).

An open-vocabulary recognizer hears "turn on the kitchen lights" as "on on the kitchen lights", and hassil
then finds nothing. A recognizer restricted to the sentences hassil accepts cannot make that mistake; it
can only pick the wrong command, or force a question into a command, which the router (command_stt.py)
catches by comparing its score with the open model's.

The sentences come from hassil itself: `hassil.fst.intents_to_fst` expands Home Assistant's templates
for our intents (alternatives, optionals, permutations, expansion rules) into a word graph with the
slot lists as placeholders; we put the configured areas, floors and device names and hassil's own
number words (its `sample_expression` on the range lists: "twenty five") in their place. Out of that
graph come:
- a pocketsphinx finite-state grammar (FSG: the form a JSGF grammar is compiled to; the graph's
  states are shared between sentences, which JSGF rule references would copy, not share),
- a Vosk phrase list: Vosk turns a phrase list into a bigram model, so phrases that hold every
  pair of neighbouring words of the graph let it say every sentence, without listing all 3e7 of them.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import VoiceError
from .intents import DEFAULT_AREAS, DEFAULT_DEVICES, DEFAULT_FLOORS, INTENTS, check_home, load_intents, slot_lists

logger = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"^\{(\w+)\}(.*)$")
_WORD = re.compile(r"^[a-z']+$")


@dataclass(frozen=True)
class CommandGrammar:
    """A word graph of the command sentences: arcs (from, to, word or None for a jump), one start, finals.

    vocabulary: the recognizer's words; template words outside it are left out (hassil lists "todays"
    next to "today's"), a configured name outside it is an error.
    """

    arcs: tuple[tuple[int, int, str | None], ...]
    start: int
    finals: frozenset[int]
    states: int

    @property
    def words(self) -> frozenset[str]:
        return frozenset(w for _, _, w in self.arcs if w)

    @classmethod
    def build(cls, areas: Sequence[str] = DEFAULT_AREAS, devices: Sequence[tuple[str, str]] = DEFAULT_DEVICES,
              floors: Sequence[str] = DEFAULT_FLOORS, language: str = "en", intents: Sequence[str] = INTENTS,
              vocabulary: Callable[[str], bool] | None = None) -> CommandGrammar:
        from hassil.fst import EPS, intents_to_fst

        areas, devices, floors = check_home(areas, devices, floors)
        known = vocabulary or (lambda word: True)
        for kind, names in (("area", areas), ("floor", floors), ("device", [n for n, _ in devices])):
            for name in names:
                missing = [w for w in name.split() if not known(w)]
                if missing:
                    raise VoiceError(f"{kind} name {name!r}: the recognizer's dictionary has no word {missing[0]!r}, "
                                     "so it could never hear it. Fix: name it with dictionary words (e.g. "
                                     "'speaker' rather than 'sonos'), or leave it out.")
        hassil_intents = load_intents(language, intents)
        lists = slot_lists(areas, devices, floors)
        fst = intents_to_fst(hassil_intents, slot_lists=lists, intent_names=intents).remove_spaces()
        fst.prune()
        fillers = _fillers(hassil_intents, lists, language, known)
        arcs: list[tuple[int, int, str | None]] = []
        states = max(fst.states) + 1
        dropped: set[str] = set()
        for src, out in fst.arcs.items():
            for arc in out:
                label = arc.in_label
                if label in (EPS, "<skip>"):
                    arcs.append((src, arc.to_state, None))
                    continue
                match = _PLACEHOLDER.match(label)
                if match:
                    head = fillers.get(match.group(1))
                    if head is None:  # a list we do not fill (device classes, timer names): not ours to say
                        dropped.add(label)
                        continue
                    tail = [w for w in match.group(2).split("-") if w]
                    if not all(known(w) for w in tail):
                        dropped.add(label)
                        continue
                    at = src
                    if tail:  # "{minutes}-minute": the number, then the word
                        at, states = states, states + 1
                    states = head.attach(arcs, src, at if tail else arc.to_state, states)
                    for i, word in enumerate(tail):
                        nxt = arc.to_state if i == len(tail) - 1 else states
                        states += nxt == states
                        arcs.append((at, nxt, word))
                        at = nxt
                    continue
                words = [w for w in label.lower().split("-") if w]
                if not words or not all(_WORD.match(w) and known(w) for w in words):
                    dropped.add(label)
                    continue
                at = src
                for i, word in enumerate(words):
                    nxt = arc.to_state if i == len(words) - 1 else states
                    states += nxt == states
                    arcs.append((at, nxt, word))
                    at = nxt
        if dropped:
            logger.debug("command grammar: left out %d labels outside the vocabulary: %s", len(dropped),
                         sorted(dropped))
        grammar = cls(tuple(arcs), fst.start, frozenset(fst.final_states), states)
        return grammar._pruned()

    def _pruned(self) -> CommandGrammar:
        """Drop arcs that cannot reach a final state (after words were left out)."""
        back: dict[int, list[int]] = defaultdict(list)
        for src, dst, _ in self.arcs:
            back[dst].append(src)
        alive, todo = set(self.finals), deque(self.finals)
        while todo:
            for src in back[todo.popleft()]:
                if src not in alive:
                    alive.add(src)
                    todo.append(src)
        if self.start not in alive:
            raise VoiceError("the command grammar is empty: no sentence of the intents can be said with the "
                             "recognizer's words. Fix: check the language and the recognizer's dictionary.")
        return CommandGrammar(tuple(a for a in self.arcs if a[0] in alive and a[1] in alive), self.start,
                              self.finals, self.states)

    def accepts(self, text: str) -> bool:
        """Whether `text` (lower-case words) is a sentence of the grammar."""
        out: dict[int, list[tuple[int, str | None]]] = defaultdict(list)
        for src, dst, word in self.arcs:
            out[src].append((dst, word))

        def closure(states: set[int]) -> set[int]:
            todo, seen = list(states), set(states)
            while todo:
                for dst, word in out[todo.pop()]:
                    if word is None and dst not in seen:
                        seen.add(dst)
                        todo.append(dst)
            return seen

        current = closure({self.start})
        for token in text.lower().split():
            current = closure({dst for s in current for dst, word in out[s] if word == token})
            if not current:
                return False
        return bool(current & self.finals)

    def fsg_transitions(self) -> tuple[int, int, list[tuple[Any, ...]]]:
        """(start, final, transitions) for pocketsphinx's Decoder.create_fsg: one final state reached by a
        jump from every final state of the graph; each state's arcs share its probability mass evenly."""
        final = self.states
        out: dict[int, list[tuple[int, str | None]]] = defaultdict(list)
        for src, dst, word in self.arcs:
            out[src].append((dst, word))
        for state in self.finals:
            out[state].append((final, None))
        transitions: list[tuple[Any, ...]] = []
        for src, arcs in out.items():
            p = 1.0 / len(arcs)
            transitions += [(src, dst, p, word) if word else (src, dst, p) for dst, word in arcs]
        return self.start, final, transitions

    def phrases(self) -> list[str]:
        """A Vosk phrase list: for every pair of neighbouring word arcs, one shortest sentence through both."""
        out: dict[int, list[tuple[int, str | None]]] = defaultdict(list)
        back: dict[int, list[tuple[int, str | None]]] = defaultdict(list)
        for src, dst, word in self.arcs:
            out[src].append((dst, word))
            back[dst].append((src, word))
        prefix = _shortest(self.start, out)  # state → words of a shortest path from the start
        suffix: dict[int, tuple[str, ...]] = {}
        for final in self.finals:
            for state, words in _shortest(final, back).items():
                words = tuple(reversed(words))
                if state not in suffix or len(words) < len(suffix[state]):
                    suffix[state] = words
        found: set[str] = set()
        pairs: set[tuple[str, str]] = set()  # neighbouring words some phrase already holds ("" = an end)
        for src, dst, word in sorted(self.arcs, key=lambda a: (a[0], a[1], a[2] or "")):
            if word is None or src not in prefix or dst not in suffix:
                continue
            before = prefix[src][-1] if prefix[src] else ""
            # the next word arcs after this one (through jumps), each with the words that complete a sentence
            nexts = [(w, suffix[d]) for d, w in _words_after(dst, out) if d in suffix]
            if not suffix[dst] or not nexts:
                nexts.append(("", ()))
            for following, rest in nexts:
                if (before, word) in pairs and (word, following) in pairs:
                    continue
                words = (*prefix[src], word, *((following,) if following else ()), *rest)
                pairs.update(zip(("", *words), (*words, "")))
                found.add(" ".join(words))
        return sorted(found)


def _shortest(start: int, edges: dict[int, list[tuple[int, str | None]]]) -> dict[int, tuple[str, ...]]:
    """Fewest-words path from `start` to every state (0-1 BFS: jumps cost nothing)."""
    best: dict[int, tuple[str, ...]] = {start: ()}
    todo: deque[int] = deque([start])
    while todo:
        state = todo.popleft()
        for dst, word in edges[state]:
            words = best[state] + ((word,) if word else ())
            if dst not in best or len(words) < len(best[dst]):
                best[dst] = words
                (todo.appendleft if word is None else todo.append)(dst)
    return best


def _words_after(state: int, out: dict[int, list[tuple[int, str | None]]]) -> list[tuple[int, str]]:
    """The word arcs reachable from `state` through jumps only, as (their target, word)."""
    found, todo, seen = [], [state], {state}
    while todo:
        for dst, word in out[todo.pop()]:
            if word is not None:
                found.append((dst, word))
            elif dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return found


@dataclass(frozen=True)
class _Filler:
    """What a placeholder can be: a minimal acyclic word automaton (state 0 → state 1), copied per use."""

    arcs: tuple[tuple[int, int, str], ...]
    states: int

    @classmethod
    def of(cls, sequences: Iterable[Sequence[str]]) -> _Filler:
        # a trie of the sequences, then states with the same future merged (bottom-up signatures)
        trie: list[dict[str, int]] = [{}]
        ends: set[int] = set()
        for seq in sequences:
            at = 0
            for word in seq:
                if word not in trie[at]:
                    trie.append({})
                    trie[at][word] = len(trie) - 1
                at = trie[at][word]
            ends.add(at)
        ids: dict[Any, int] = {}
        rename: dict[int, int] = {}

        def sign(state: int) -> int:
            if state not in rename:
                key = (state in ends, tuple(sorted((w, sign(d)) for w, d in trie[state].items())))
                rename[state] = ids.setdefault(key, len(ids) + 2)  # 0: entry, 1: exit
            return rename[state]

        arcs: set[tuple[int, int, str]] = set()
        for state in range(len(trie)):
            src = 0 if state == 0 else sign(state)
            for word, dst in trie[state].items():
                arcs.add((src, 1 if not trie[dst] else sign(dst), word))
                if trie[dst] and dst in ends:  # a sequence may end here and another go on
                    arcs.add((sign(dst), 1, ""))
        return cls(tuple(sorted(arcs)), len(ids) + 2)

    def attach(self, out: list[tuple[int, int, str | None]], entry: int, exit_: int, next_state: int) -> int:
        """Copy the automaton between `entry` and `exit_`, numbering new states from `next_state`."""
        names = {0: entry, 1: exit_}
        for src, dst, word in self.arcs:
            for state in (src, dst):
                if state not in names:
                    names[state], next_state = next_state, next_state + 1
            out.append((names[src], names[dst], word or None))
        return next_state


def _fillers(intents: Any, lists: dict[str, Any], language: str,
             known: Callable[[str], bool]) -> dict[str, _Filler]:
    """What each placeholder of the graph ({area}, {minutes}, ...) can be.

    Areas, floors and device names are the configured ones; range lists (timer hours, minutes,
    seconds) are spoken with hassil's own number words. Other lists (cover classes, timer names) are
    not filled: the demo controls no covers, and a free-form name cannot be a grammar.
    """
    from hassil import ListReference, RangeSlotList
    from hassil.sample import sample_expression

    fillers: dict[str, _Filler] = {}
    all_lists = {**intents.slot_lists, **lists}
    for slot, list_name in _list_references(intents).items():
        if slot in lists:
            texts = set(sample_expression(ListReference(slot), lists, language=language))
        elif isinstance(intents.slot_lists.get(list_name), RangeSlotList):
            texts = set(sample_expression(ListReference(list_name), all_lists, language=language))
        else:
            continue
        words = [[w for w in re.split(r"[\s-]+", text.lower()) if w] for text in texts]
        fillers[slot] = _Filler.of(seq for seq in words if seq and all(_WORD.match(w) and known(w) for w in seq))
    return fillers


def _list_references(intents: Any) -> dict[str, str]:
    """slot name → list name of every {list:slot} reference in the intents' sentences and rules."""
    from hassil import Group, ListReference, RuleReference

    found: dict[str, str] = {}
    rules = dict(intents.expansion_rules)

    def walk(expression: Any, seen: frozenset[str]) -> None:
        if isinstance(expression, ListReference):
            found.setdefault(expression.slot_name, expression.list_name)
        elif isinstance(expression, Group):
            for item in expression.items:
                walk(item, seen)
        elif isinstance(expression, RuleReference) and expression.rule_name not in seen:
            body = local.get(expression.rule_name) or rules.get(expression.rule_name)
            if body is not None:
                walk(body.expression, seen | {expression.rule_name})

    for intent in intents.intents.values():
        for data in intent.data:
            local = dict(data.expansion_rules or {})
            for sentence in data.sentences:
                walk(sentence.expression, frozenset())
    return found


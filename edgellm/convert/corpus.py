"""Offline dialogue text for distillation, from permissively licensed PyPI packages.

Sources (all installable with pip, nothing fetched at run time):
    chitchat     chitchat-dataset (MIT): ~7k crowd-sourced two-person chats
    chatterbot   chatterbot-corpus (BSD): short English Q&A conversations
    intents      home-assistant-intents + hassil (Apache-2.0): smart-home commands, user turns only

The held-out split is decided per dialogue by a hash of its stable key, so it never depends on
which sources are loaded, their order, or the seed: a held-out dialogue is never trained on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParameterError, MissingDependencyError

logger = logging.getLogger(__name__)

SOURCES = ("chitchat", "chatterbot", "intents")
HELDOUT_FRACTION = 0.05


@dataclass(frozen=True)
class Dialogue:
    """Alternating turns, user first. A dialogue with one turn is a prompt with no reply."""

    key: str  # stable id: source + id inside the source
    source: str
    turns: tuple[str, ...]

    def messages(self) -> list[dict]:
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(self.turns)]


@dataclass(frozen=True)
class CorpusSplit:
    train: tuple[Dialogue, ...]
    heldout: tuple[Dialogue, ...]


def is_heldout(key: str, fraction: float = HELDOUT_FRACTION) -> bool:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _chitchat() -> list[Dialogue]:
    try:
        import chitchat_dataset
    except ImportError as exc:
        raise MissingDependencyError("chitchat-dataset", "data", "the chitchat corpus") from exc
    path = Path(chitchat_dataset.__file__).with_name("dataset.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for conv_id, conv in sorted(data.items()):
        # Each message is a run of utterances by one speaker; runs alternate speakers.
        turns = tuple(" ".join(u["text"].strip() for u in run if u["text"].strip()) for run in conv["messages"])
        turns = tuple(t for t in turns if t)
        if len(turns) >= 2:
            out.append(Dialogue(f"chitchat/{conv_id}", "chitchat", turns))
    return out


def _chatterbot(language: str = "english") -> list[Dialogue]:
    try:
        import chatterbot_corpus
        import yaml
    except ImportError as exc:
        raise MissingDependencyError("chatterbot-corpus", "data", "the chatterbot corpus") from exc
    folder = Path(chatterbot_corpus.__file__).parent / "data" / language
    out = []
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for i, conv in enumerate(doc.get("conversations") or []):
            turns = tuple(str(t).strip() for t in conv if str(t).strip())
            if turns:
                out.append(Dialogue(f"chatterbot/{path.stem}/{i}", "chatterbot", turns))
    return out


_INTENT_SLOTS = {
    "name": ["kitchen light", "living room lamp", "front door", "ceiling fan", "garage door", "tv",
             "porch light", "thermostat", "coffee maker", "bedroom blinds"],
    "area": ["kitchen", "bedroom", "living room", "office", "garage", "bathroom", "hallway"],
    "floor": ["upstairs", "downstairs", "first floor"],
}


def _intents(per_intent: int = 40) -> list[Dialogue]:
    try:
        from hassil import Intents
        from hassil.intents import TextSlotList
        from hassil.sample import sample_intents
        from home_assistant_intents import get_intents
    except ImportError as exc:
        raise MissingDependencyError("home-assistant-intents", "data", "the smart-home command corpus") from exc
    intents = Intents.from_dict(get_intents("en"))
    lists = {k: TextSlotList.from_strings(v) for k, v in _INTENT_SLOTS.items()}
    seen, out = set(), []
    samples = sample_intents(intents, slot_lists=lists, max_sentences_per_intent=per_intent, language="en")
    for intent, text in itertools.islice(samples, 50_000):
        text = " ".join(text.split())
        if text and text not in seen:
            seen.add(text)
            sentence = text[0].upper() + text[1:]
            out.append(Dialogue(f"intents/{intent}/{text}", "intents", (sentence,)))
    return out


_LOADERS = {"chitchat": _chitchat, "chatterbot": _chatterbot, "intents": _intents}


def load_dialogues(sources: tuple[str, ...] = SOURCES) -> list[Dialogue]:
    unknown = [s for s in sources if s not in _LOADERS]
    if unknown:
        raise InvalidParameterError(f"unknown corpus source(s) {unknown}; known: {', '.join(_LOADERS)}")
    out = []
    for name in sources:
        part = _LOADERS[name]()
        logger.info("corpus %s: %d dialogues", name, len(part))
        out.extend(part)
    return out


def split(dialogues: list[Dialogue], fraction: float = HELDOUT_FRACTION) -> CorpusSplit:
    if not 0.0 < fraction < 1.0:
        raise InvalidParameterError(f"held-out fraction must be in (0, 1), got {fraction}")
    heldout = tuple(d for d in dialogues if is_heldout(d.key, fraction))
    train = tuple(d for d in dialogues if not is_heldout(d.key, fraction))
    return CorpusSplit(train=train, heldout=heldout)


def load_split(sources: tuple[str, ...] = SOURCES, fraction: float = HELDOUT_FRACTION) -> CorpusSplit:
    return split(load_dialogues(sources), fraction)


def prompts(dialogues: tuple[Dialogue, ...] | list[Dialogue], limit: int | None = None,
            max_chars: int = 200) -> list[str]:
    """First user turns, deduplicated, in a fixed order: prompts for teacher replies or benchmarks.

    Sources are interleaved round-robin, so a small limit still covers each of them.
    """
    by_source: dict[str, list[str]] = {}
    seen: set[str] = set()
    for d in dialogues:
        text = d.turns[0]
        if len(text) <= max_chars and len(text.split()) >= 2 and text.lower() not in seen:
            seen.add(text.lower())
            by_source.setdefault(d.source, []).append(text)
    mixed = [p for group in itertools.zip_longest(*by_source.values()) for p in group if p is not None]
    return mixed if limit is None else mixed[:limit]

"""Streaming text is always whole characters, and stop strings are held back, never shown."""

from tokenizers import Tokenizer

from edgellm.runtime.text import REPLACEMENT, IncrementalDecoder, StopMatcher

from ..conftest import build_tiny_tokenizer


def test_split_utf8_characters_never_leak_replacement_chars():
    tokenizer: Tokenizer = build_tiny_tokenizer()
    text = "héllo 你好 🙂 café — ünïcödé 🙂🙂 done"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # multi-byte characters really are split across tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids]
    pieces.append(decoder.flush())
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == text


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(("</end>", "STOP"))
    out = []
    for piece in ["Hello </", "en", "d> tail"]:
        text, hit = m.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Hello " and hit


def test_stop_matcher_releases_false_alarms():
    m = StopMatcher(("STOP",))
    a, hit_a = m.feed("it ST")
    b, hit_b = m.feed("ays")
    assert (a, hit_a) == ("it ", False)
    assert b == "STays" and not hit_b
    assert m.flush() == ""

"""Render OpenAI-style messages with the model's own Jinja chat template (as transformers does), within limits.

A chat template is code that came with the model. Jinja's sandbox already stops it from reading files or
touching Python internals; what it does not stop is work: `{{ 'A' * 4000000000 }}` allocates 16 GB and a
10^5 x 10^5 loop runs for hours. So rendering here has two budgets, checked while it runs:

- size: no string, list or rendered prompt may exceed `max_chars` (string `*`, `+`, `~`, `%`, `**` and the
  widening filters and str methods are checked *before* they allocate);
- time: every loop iteration and every call ticks a clock; past `seconds` (or the caller's deadline, if
  sooner) rendering stops.

Either raises ChatTemplateError (a ModelFormatError) naming the limit. A template that breaks a limit on
a tiny probe conversation is refused at load.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from ..errors import ChatTemplateError, InvalidParameterError

ROLES = ("system", "user", "assistant", "tool")
MAX_TEMPLATE_CHARS = 4_000_000   # ~1M tokens: far past any context window, ~16 MB per string at worst
TEMPLATE_SECONDS = 1.0           # real templates render in well under a millisecond
_PROBE = [{"role": "system", "content": "probe"}, {"role": "user", "content": "probe"},
          {"role": "assistant", "content": "probe"}, {"role": "user", "content": "probe"}]
_NUMBERS = re.compile(r"\d+")
_FIX = "Fix: repair the model folder's chat_template.jinja (or re-run `edgellm convert`)."


def _raise(message: str) -> None:
    raise InvalidParameterError(f"the chat template refused the messages: {message}")


class _Budget:
    def __init__(self, max_chars: int, seconds: float, because: str) -> None:
        self.max_chars, self.seconds, self.because = max_chars, seconds, because
        self.deadline = time.perf_counter() + seconds

    def tick(self) -> None:
        if time.perf_counter() > self.deadline:
            raise ChatTemplateError(f"rendering the chat template took more than {self.seconds:.3g} s ({self.because})"
                                    f"; real templates take well under a millisecond. {_FIX}")

    def size(self, chars: int, what: str) -> None:
        if chars > self.max_chars:
            raise ChatTemplateError(f"the chat template would make {what} of {chars:,} characters; the limit is "
                                    f"{self.max_chars:,}. {_FIX} (or shorten the messages)")


def _length(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus the size and time budget of the render running in this thread."""

    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._local = threading.local()
        self.globals.pop("lipsum", None)  # lipsum(n=10**9) is a text bomb, and no chat template needs it
        for name, estimate in _FILTER_ESTIMATES.items():
            self.filters[name] = self._checked_filter(self.filters[name], estimate)

    @property
    def budget(self) -> _Budget:
        budget = getattr(self._local, "budget", None)
        if budget is None:  # compile-time constant folding, or a render outside ChatTemplate.render
            budget = _Budget(MAX_TEMPLATE_CHARS, TEMPLATE_SECONDS, "the template limit")
        return budget

    # -- what the compiled template calls ---------------------------------------------------------------------
    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        budget = self.budget
        budget.tick()
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                n = _length(seq)
                if n is not None and isinstance(count, int):
                    budget.size(n * max(count, 0), f"a {type(seq).__name__} (`*`)")
        elif operator == "+":
            a, b = _length(left), _length(right)
            if a is not None and b is not None:
                budget.size(a + b, f"a {type(left).__name__} (`+`)")
        elif operator == "%" and isinstance(left, str):
            _check_format(budget, left, right if isinstance(right, tuple) else (right,))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            budget.size(abs(left).bit_length() * right // 3, "a number (`**`) with that many digits")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's signature
        budget = __self.budget
        budget.tick()
        target = getattr(__obj, "__wrapped__", __obj)
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            _check_str_method(budget, owner, getattr(target, "__name__", ""), args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def _materialize(self, iterable: Iterable, rest: tuple, kwargs: dict, name: str, estimate) -> list:
        """List a generator handed to a filter, failing on size as soon as the growing list is too big
        (so a huge separator over a long generator fails at once, not at the time limit)."""
        budget, items = self.budget, []
        check_every = 1
        for item in self.limited_iter(iterable):
            items.append(item)
            if len(items) >= check_every:
                budget.size(estimate(items, *rest, **kwargs), f"a string (|{name})")
                check_every = len(items) * 2  # O(n) estimates in all
        return items

    def limited_iter(self, iterable: Iterable) -> Iterator:
        budget = self.budget
        for item in iterable:
            budget.tick()
            yield item

    def limited_concat(self, *parts: Any) -> str:
        texts = [str(p) for p in parts]
        self.budget.size(sum(map(len, texts)), "a string (`~`)")
        return "".join(texts)

    def _checked_filter(self, original, estimate):
        skip = 1 if hasattr(original, "jinja_pass_arg") else 0

        def checked(*args: Any, **kwargs: Any) -> Any:
            budget = self.budget
            budget.tick()
            name = original.__name__.removeprefix("do_")
            if len(args) > skip and not isinstance(args[skip], (str, list, tuple, dict)):  # a generator: count it
                items = self._materialize(args[skip], args[skip + 1:], kwargs, name, estimate)
                args = args[:skip] + (items,) + args[skip + 1:]
            budget.size(estimate(*args[skip:], **kwargs), f"a string (|{name})")
            return original(*args, **kwargs)

        if skip:  # keep jinja's pass_context/pass_eval_context/pass_environment marker
            checked.jinja_pass_arg = original.jinja_pass_arg  # type: ignore[attr-defined]
        checked.__name__ = original.__name__
        return checked

    # -- every loop, recursive loop() and `~` goes through the budget ---------------------------------------
    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Instrument().visit(super()._parse(source, name, filename))


def _size_of(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else len(str(value))


def _width(value: Any) -> int:
    return value if isinstance(value, int) else len(str(value))


def _replace_size(s: Any, old: Any, new: Any, count: Any = None, *_: Any, **__: Any) -> int:
    s, old, new = str(s), str(old), str(new)
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _join_size(value: Any, d: Any = "", attribute: Any = None, **_: Any) -> int:
    items = value if isinstance(value, (list, tuple, str)) else None
    n = len(items) if items is not None else 0
    return n * len(str(d)) + (sum(_size_of(i) for i in items) if items is not None else 0)


_FILTER_ESTIMATES = {
    "center": lambda value, width=80, *_, **__: max(_size_of(value), _width(width)),
    "indent": lambda s, width=4, *_, **__: _size_of(s) + (str(s).count("\n") + 1) * _width(width),
    "replace": _replace_size,
    "join": _join_size,
    "wordwrap": lambda s, width=79, break_long_words=True, wrapstring=None, *_, **__:
        _size_of(s) * (1 + len(str(wrapstring or "\n"))),
    "format": lambda value, *args, **kwargs: _format_size(str(value), args + tuple(kwargs.values())),
}


def _format_size(fmt: str, args: tuple) -> int:
    """A bound for fmt % args / fmt.format(args): widths and precisions are the numbers in fmt (or args for '*')."""
    widths = [int(n) for n in _NUMBERS.findall(fmt) if len(n) < 12] or [0]
    if any(len(n) >= 12 for n in _NUMBERS.findall(fmt)):
        return 10**12
    star = [a for a in args if isinstance(a, int)] if "*" in fmt else []
    return len(fmt) + sum(_size_of(a) for a in args) + max(widths + star) * (fmt.count("%") + fmt.count("{") + 1)


def _check_format(budget: _Budget, fmt: str, args: tuple) -> None:
    budget.size(_format_size(fmt, args), "a string (`%`)")


def _check_str_method(budget: _Budget, owner: str, name: str, args: tuple, kwargs: dict) -> None:
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        budget.size(max(len(owner), args[0]), f"a string (.{name})")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        budget.size(len(owner) + owner.count("\t") * (size if isinstance(size, int) else 8), "a string (.expandtabs)")
    elif name == "replace" and len(args) >= 2:
        budget.size(_replace_size(owner, *args[:3]), "a string (.replace)")
    elif name == "join" and args:
        items = args[0] if isinstance(args[0], (list, tuple, str)) else ()
        budget.size(len(items) * len(owner) + sum(_size_of(i) for i in items), "a string (.join)")
    elif name in ("format", "format_map"):
        budget.size(_format_size(owner, args + tuple(kwargs.values())), "a string (.format)")


class _Instrument(NodeTransformer):
    """Route loop iterables, recursive loop() calls and `~` through the environment's budgeted helpers."""

    @staticmethod
    def _wrap(helper: str, args: list, lineno: int) -> nodes.Call:
        return nodes.Call(nodes.EnvironmentAttribute(helper, lineno=lineno), args, [], None, None, lineno=lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = self._wrap("limited_iter", [node.iter], node.lineno)
        return node

    def visit_Call(self, node: nodes.Call) -> nodes.Call:
        node = self.generic_visit(node)
        if isinstance(node.node, nodes.Name) and node.node.name == "loop" and len(node.args) == 1:
            node.args = [self._wrap("limited_iter", [node.args[0]], node.lineno)]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        node = self.generic_visit(node)
        return self._wrap("limited_concat", list(node.nodes), node.lineno)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str], max_chars: int = MAX_TEMPLATE_CHARS,
                 seconds: float = TEMPLATE_SECONDS) -> None:
        """Compile, then render a 4-message probe conversation, so a template that breaks a limit fails here."""
        self._env = _LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self._env.globals["raise_exception"] = _raise
        self.max_chars, self.seconds = max_chars, seconds
        self.special_tokens = special_tokens
        self._template = self._guarded(lambda: self._env.from_string(source), "does not compile")
        try:
            self.render(_PROBE, add_generation_prompt=True)
        except InvalidParameterError:
            pass  # the template may refuse a system message or this order; that is its right, not a fault

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               seconds: float | None = None) -> str:
        """seconds: time left for rendering (e.g. what remains of a generation deadline); at most self.seconds."""
        validate_messages(messages)
        limit, because = self.seconds, "the template time limit"
        if seconds is not None and seconds < limit:
            limit, because = max(seconds, 0.0), "what was left of the deadline"
        budget = _Budget(self.max_chars, limit, because)

        def run() -> str:
            self._env._local.budget = budget
            try:
                parts, total = [], 0
                for piece in self._template.generate(messages=list(messages),
                                                     add_generation_prompt=add_generation_prompt,
                                                     **self.special_tokens):
                    total += len(piece)
                    budget.size(total, "a prompt")
                    budget.tick()
                    parts.append(piece)
                return "".join(parts)
            finally:
                self._env._local.budget = None

        return self._guarded(run, "failed")

    @staticmethod
    def _guarded(work, what: str):
        try:
            return work()
        except (ChatTemplateError, InvalidParameterError):
            raise
        except (TemplateError, ArithmeticError, ValueError, TypeError, LookupError, AttributeError,
                RecursionError, MemoryError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise ChatTemplateError(f"the model's chat template {what}: {type(exc).__name__}: {reason}. {_FIX}") from None


def validate_messages(messages: Sequence[dict[str, Any]]) -> None:
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise InvalidParameterError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                                    f"{type(messages).__name__}. Fix: pass a list.")
    if not messages:
        raise InvalidParameterError("messages is empty. Fix: pass at least one {'role': 'user', 'content': '...'}.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InvalidParameterError(
                f"messages[{index}] = {message!r:.80} is not a {{'role': ..., 'content': ...}} dict. Fix: use that shape.")
        if message["role"] not in ROLES:
            raise InvalidParameterError(
                f"messages[{index}] has role {message['role']!r:.40}; allowed roles: {', '.join(ROLES)}. "
                "Fix: use one of those.")
        if not isinstance(message["content"], str):
            raise InvalidParameterError(f"messages[{index}]['content'] must be a string, got "
                                        f"{type(message['content']).__name__}. Fix: pass text.")
        check_text(message["content"], f"messages[{index}]['content']")


def check_text(text: str, name: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates, e.g. from bytes decoded with 'surrogateescape')."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameterError(
            f"{name} has a lone surrogate {text[exc.start]!r} at index {exc.start}, which is not valid Unicode "
            "text. Fix: decode the input with errors='replace', or remove it.") from None

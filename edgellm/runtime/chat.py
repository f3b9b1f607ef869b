"""Render OpenAI-style messages with the model's own Jinja chat template (as transformers does)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidParameterError, ModelFormatError

ROLES = ("system", "user", "assistant", "tool")


def _raise(message: str) -> None:
    raise InvalidParameterError(f"the chat template refused the messages: {message}")


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ModelFormatError(f"the model's chat template does not parse ({exc}). Fix: re-run `edgellm convert`.") from exc
        self.special_tokens = special_tokens

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        validate_messages(messages)
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)


def validate_messages(messages: Sequence[dict[str, Any]]) -> None:
    if not messages:
        raise InvalidParameterError("messages is empty. Fix: pass at least one {'role': 'user', 'content': '...'}.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InvalidParameterError(
                f"messages[{index}] = {message!r} is not a {{'role': ..., 'content': ...}} dict. Fix: use that shape.")
        if message["role"] not in ROLES:
            raise InvalidParameterError(
                f"messages[{index}] has role {message['role']!r}; allowed roles: {', '.join(ROLES)}.")
        if not isinstance(message["content"], str):
            raise InvalidParameterError(f"messages[{index}]['content'] must be a string, got {type(message['content']).__name__}.")

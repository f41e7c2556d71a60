"""A conversation rendered into prompt text with the model's own chat template.

Rendering sits next to tokenization: the engine tokenizes the text this returns exactly as
it tokenizes a raw prompt, so a chat request and the same conversation rendered by the
caller with `apply_chat_template(..., tokenize=False, add_generation_prompt=True)` and
sent as a prompt give the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from jinja2 import TemplateError

from loramux.errors import InvalidArgument

ROLES = ("system", "user", "assistant")


def check_messages(messages: Sequence[tuple[str, str]]) -> None:
    """Our own checks, whatever the template accepts: at least one message, known roles."""
    if not messages:
        raise InvalidArgument("messages is empty: send at least one message, or a prompt")
    for i, (role, _) in enumerate(messages):
        if not role:
            raise InvalidArgument(f"messages[{i}] has an empty role; use one of {', '.join(ROLES)}")
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}] has role {role!r}; use one of {', '.join(ROLES)}")


def render_chat(tokenizer, messages: Sequence[tuple[str, str]]) -> str:
    """The conversation as the model's template writes it, with the assistant's turn opened."""
    check_messages(messages)
    if not tokenizer.chat_template:
        raise InvalidArgument("this model has no chat template; send the conversation as a prompt instead")
    turns = [{"role": role, "content": content} for role, content in messages]
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
        # The template refused this conversation (raise_exception, a role order it does
        # not take, ...): the request's fault, said in the template's words.
        raise InvalidArgument(f"the model's chat template refused the messages: {exc}") from None

"""A chat's messages rendered into the prompt the model reads, as vLLM 0.32 renders them: shared by vLLM's `/tokenize`
of messages (vllm_routes.py) and `/v1/chat/completions` answered by the front (chat_route.py), so both read a chat
the same way.

vLLM renders with the server's chat template (its --chat-template, else the checkpoint's) through transformers'
`apply_chat_template` and then tokenizes the text with `add_special_tokens` (false by default: the template writes
them). The template's variables: `messages` (each role as given: a template that takes `role: "wizard"` renders
it), `add_generation_prompt`, `continue_final_message` (the rendered text cut just after the last message's
content), `tools`, `documents`, `reasoning_effort` (with `enable_thinking` = effort != "none" unless the request's
`chat_template_kwargs` sets it) and `chat_template_kwargs`. Text content parts are joined by newlines (vLLM's
"string" content format); a part of another kind is refused here (the chat route relays such a request to smg
first, which carries images to the engine).

Bounds, as for a completion prompt: contents that cannot fit max_model_len are refused by their size before the
template renders them, the rendered text after it. Each refusal names the field (HttpFieldError, answered 400).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ...contract.safe_text import shown
from .json_body import json_flag, kind_of
from .openai_fields import HttpFieldError

INLINE_MAX_CHARS = 2048  # rendered text longer than this is encoded without the GIL held (encode_without_gil)
# Template variables a request names as its own fields; chat_template_kwargs may not set them.
_OWN_VARIABLES = frozenset({"messages", "add_generation_prompt", "tools"})


@dataclass(frozen=True)
class RenderedChat:
    """A chat as the model reads it."""

    text: str  # the rendered prompt
    ids: list  # its token ids
    messages: list  # the messages as the template read them (text contents joined)
    add_generation_prompt: bool


def render_chat(tokenizer, serving, data: dict, tools: Optional[list] = None) -> RenderedChat:
    """Render `data["messages"]` with the tokenizer's chat template and the request's template fields; `serving`
    bounds it (text_refusal, ids_refusal, text_only_reason). `tools`: the tool list the template is given (checked
    by the caller), or None. Raises HttpFieldError."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpFieldError("messages", "messages must be a non-empty list of {\"role\", \"content\"} objects.")
    generation = json_flag(data, "add_generation_prompt", True)
    continue_final = json_flag(data, "continue_final_message", False)
    if generation and continue_final:
        raise HttpFieldError("continue_final_message", "continue_final_message and add_generation_prompt cannot "
                                                       "both be true (set add_generation_prompt to false).")
    special = json_flag(data, "add_special_tokens", False)
    chat, size = [], 0
    for i, m in enumerate(messages):
        chat.append(chat_message(m, f"messages[{i}]", serving.text_only_reason))
        size += len(chat[-1]["content"].encode("utf-8", "surrogatepass")) if chat[-1]["content"] else 0
    # The contents alone already too long to fit: refused before the template renders them.
    _fits_as_text(serving, "messages", size)
    kwargs = template_kwargs(data)
    if tools is not None:
        kwargs["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=generation, **kwargs)
    except ValueError as e:  # no template, or it raised (a role it does not know, ...)
        raise HttpFieldError("messages", shown(str(e), quote=False)) from None
    if continue_final:
        text = _continued(text, chat[-1]["content"])
    _fits_as_text(serving, "messages", text)
    ids = tokenizer.encode_without_gil(text, special) if len(text) > INLINE_MAX_CHARS else \
        tokenizer.encode(text, special)
    reason = serving.ids_refusal("messages", len(ids))
    if reason is not None:
        raise HttpFieldError("messages", reason)
    return RenderedChat(text, ids, chat, generation)


def template_kwargs(data: dict) -> dict:
    """The template's variables beside messages and add_generation_prompt: chat_template_kwargs, then the request's
    own template fields over them where set (vLLM's merge_kwargs)."""
    extra = data.get("chat_template_kwargs")
    kwargs: dict[str, Any] = {}
    if extra is not None:
        if not isinstance(extra, dict) or not all(isinstance(k, str) and k.isidentifier() for k in extra):
            raise HttpFieldError("chat_template_kwargs", "chat_template_kwargs must be an object of template "
                                                         "variables (names are identifiers).")
        clash = _OWN_VARIABLES & set(extra)
        if clash:
            raise HttpFieldError("chat_template_kwargs", f"chat_template_kwargs cannot set {sorted(clash)[0]!r}: "
                                                         "it is a field of the request.")
        kwargs.update(extra)
    documents = data.get("documents")
    if documents is not None:
        if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
            raise HttpFieldError("documents", "documents must be a list of objects ({\"title\", \"text\"}).")
        kwargs["documents"] = documents
    effort = data.get("reasoning_effort")
    if effort is not None:
        if effort not in REASONING_EFFORTS:
            raise HttpFieldError("reasoning_effort", f"reasoning_effort={shown(str(effort))} is invalid: one of "
                                                     f"{', '.join(REASONING_EFFORTS)}.")
        kwargs["reasoning_effort"] = effort
        kwargs.setdefault("enable_thinking", effort != "none")  # vLLM's: thinking on unless the kwargs say
    return kwargs


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")  # vLLM 0.32's


def chat_message(m, where: str, text_only) -> dict:
    """One chat message as a template reads it: role and text content (OpenAI text parts joined by newlines,
    as vLLM joins them for a template that takes strings)."""
    if not isinstance(m, dict):
        raise HttpFieldError(where, f"{where} must be an object with `role` and `content`, not {kind_of(m)}.")
    role = m.get("role")
    if not isinstance(role, str) or not role:
        raise HttpFieldError(f"{where}.role", f"{where}.role must be a non-empty string.")
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                why = text_only() if isinstance(kind, str) and kind != "text" else "a part must be {\"type\": " \
                                                                                   "\"text\", \"text\": \"...\"}"
                raise HttpFieldError(f"{where}.content[{j}]", f"{where}.content[{j}] is refused: {why}")
            texts.append(part["text"])
        content = "\n".join(texts)
    elif content is not None and not isinstance(content, str):
        raise HttpFieldError(f"{where}.content", f"{where}.content must be a string, a list of text parts, or null.")
    return {**m, "content": content}


def has_media(messages: Any) -> bool:
    """Whether any message has a content part other than text (an image, a video, audio)."""
    if not isinstance(messages, list):
        return False
    return any(isinstance(m, dict) and isinstance(m.get("content"), list) and any(
        isinstance(p, dict) and p.get("type", "text") != "text" for p in m["content"]) for m in messages)


def _continued(text: str, final: Optional[str]) -> str:
    """The rendered chat cut just after the final message's content, as transformers' continue_final_message
    does: the model continues that message instead of starting a new turn."""
    final = (final or "").strip()
    at = text.rfind(final) if final else -1
    if at < 0:
        raise HttpFieldError("continue_final_message", "continue_final_message needs the last message's content in "
                                                       "the rendered chat, and this template does not write it.")
    return text[:at + len(final)]


def _fits_as_text(serving, field: str, text) -> None:
    size = text if isinstance(text, int) else len(text.encode("utf-8", "surrogatepass"))
    reason = serving.text_refusal(field, size)
    if reason is not None:
        raise HttpFieldError(field, reason)


__all__ = ["REASONING_EFFORTS", "RenderedChat", "chat_message", "has_media", "render_chat", "template_kwargs"]

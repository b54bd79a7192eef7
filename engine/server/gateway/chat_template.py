"""`--chat-template PATH` checked at start, before any weight loads.

The managed gateway (smg) reads the file itself when it starts, and smg read `/dev/zero` until it held 14.8 GB
and never became ready; a template with broken Jinja started fine and then answered every chat with HTTP 500. So
the server reads the file first, as smg will read it, and refuses to start with one sentence naming the flag:
it must be a regular file of at most MAX_CHAT_TEMPLATE_BYTES, UTF-8, and compile as transformers compiles chat
templates (jinja2's ImmutableSandboxedEnvironment, the same options). smg takes a path only (no inline template,
unlike vLLM's flag), so a value that is not a file is refused too, saying so when it looks like an inline template.
"""
from __future__ import annotations

import json
import os
import stat
from typing import Optional

from .quirks import template_from_text

MAX_CHAT_TEMPLATE_BYTES = 1 << 20  # the largest checkpoint templates are tens of KB


def check_chat_template(path: Optional[str]) -> None:
    """Raise ValueError (one sentence naming --chat-template, the value and what is allowed) unless `path` is None
    or a chat template file smg can load and transformers' Jinja compiles."""
    if path is None:
        return
    source = _template_of(path, _read(path))
    if not source.strip():  # renders every chat as an empty prompt
        raise _bad(path, "the template is empty; a Jinja chat template that renders the messages is required")
    _compile(path, source)


def read_chat_template(path: str) -> str:
    """The template smg reads from `path` (checked as check_chat_template checks it): what the server's own
    renderings (its HTTP front's /tokenize of messages) use, so that they agree with smg's."""
    check_chat_template(path)
    return _template_of(path, _read(path))


def _bad(path: str, why: str) -> ValueError:
    from ...contract.safe_text import shown

    return ValueError(f"--chat-template={shown(path)} is invalid: {why}.")


def _read(path: str) -> str:
    """The file's text. Opened without blocking and checked on the open descriptor, so neither a FIFO nor a
    file swapped in after a check can hang or flood the start; read up to one byte past the bound."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        if "{{" in path or "{%" in path:
            raise _bad(path, "it is not a file, and an inline template is not accepted (the gateway, smg, reads "
                             "the template from a file): write it to a .jinja file and give its path") from None
        raise _bad(path, f"it cannot be read ({exc.strerror}); a Jinja chat template file is required") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _bad(path, f"it is not a regular file ({_kind(st.st_mode)}); a Jinja chat template file of at "
                             f"most {MAX_CHAT_TEMPLATE_BYTES} bytes is required")
        data = _read_at_most(fd, MAX_CHAT_TEMPLATE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CHAT_TEMPLATE_BYTES:
        raise _bad(path, f"it has {max(st.st_size, len(data))} bytes; at most {MAX_CHAT_TEMPLATE_BYTES} (1 MiB) are "
                         f"allowed")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(path, f"it is not UTF-8 text (byte {exc.start}); a chat template must be UTF-8") from None


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, got = [], 0
    while got < limit and (chunk := os.read(fd, min(limit - got, 1 << 16))):
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _template_of(path: str, text: str) -> str:
    """The template smg takes from the file's text: a .json file's string or its "chat_template" string; any
    other file's text stripped, with each literal backslash-n read as a newline (smg 1.13's loader does both)."""
    if not path.endswith(".json"):
        return template_from_text(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(path, f"it is not valid JSON ({exc.msg}, line {exc.lineno}); a .json chat template holds a "
                         "JSON string or {\"chat_template\": \"...\"}") from None
    if isinstance(value, dict):
        value = value.get("chat_template")
    if not isinstance(value, str):
        raise _bad(path, "it holds no template; a .json chat template holds a JSON string or "
                         "{\"chat_template\": \"...\"}")
    return value


def _compile(path: str, source: str) -> None:
    """Compile `source` in transformers' chat-template environment (engine/core/tokenizer.py uses the same)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    try:
        env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise _bad(path, f"it is not valid Jinja (line {exc.lineno}: {_said(exc)}); the template must compile "
                         "with jinja2 as transformers compiles chat templates") from None
    except jinja2.TemplateError as exc:
        raise _bad(path, f"it is not valid Jinja ({_said(exc)}); the template must compile with jinja2 as "
                         "transformers compiles chat templates") from None
    except RecursionError:
        raise _bad(path, "its Jinja is nested too deeply to compile") from None


def _said(exc) -> str:
    """jinja2's message, escaped and bounded (it may quote the template)."""
    from ...contract.safe_text import shown

    return shown(exc.message or type(exc).__name__, quote=False)


__all__ = ["MAX_CHAT_TEMPLATE_BYTES", "check_chat_template", "read_chat_template"]

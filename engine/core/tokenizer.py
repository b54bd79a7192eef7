"""Tokenizer for served models, on the `tokenizers` library alone.

`transformers` is deliberately not imported here: it is heavy, slow to import
and only a test dependency. What we need from a Hugging Face model directory is
small: tokenizer.json (the actual tokenizer; or Kimi's tiktoken.model, built into the same
`tokenizers` object by tiktoken_files.py), tokenizer_config.json (special
tokens, chat template) and the eos ids that config.json /
generation_config.json declare. Encoding follows what
`transformers.AutoTokenizer` (v5) does with the same files, which the tests
check on the tiny model.
"""
from __future__ import annotations

import copy
import json
import re
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from .tiktoken_files import TIKTOKEN_FILE, layout_of, tiktoken_backend

# transformers writes this sentinel when a tokenizer has no length limit.
_NO_MAX_LENGTH = int(1e30)
_NAMED_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data


def _token_content(value: Any) -> Optional[str]:
    # tokenizer_config.json spells a special token either as a string or as a
    # serialised AddedToken dict ({"content": ..., "lstrip": ..., ...}).
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _find_chat_template(model_dir: Path, tok_config: dict) -> Optional[str]:
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        # Older format: a list of named templates; "default" is the chat one.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template:
        return template
    # Newer transformers save the template beside the config instead.
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    return _read_json(model_dir / "chat_template.json").get("chat_template")


class Tokenizer:
    """Encode/decode text for one model, plus its special tokens and chat template."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token: Optional[str] = None,
        eos_token: Optional[str] = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: Optional[str] = None,
        model_max_length: Optional[int] = None,
        special_tokens_map: Optional[dict[str, str]] = None,
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
        sort_tool_keys: bool = False,
    ) -> None:
        self._tok = backend
        self.name_or_path = name_or_path
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id: Optional[int] = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id: Optional[int] = backend.token_to_id(eos_token) if eos_token else None
        eos_ids = set(extra_eos_token_ids)
        if self.eos_token_id is not None:
            eos_ids.add(self.eos_token_id)
        self.eos_token_ids: set[int] = eos_ids
        self.chat_template = chat_template
        self.sort_tool_keys = sort_tool_keys  # Kimi's tokenizer code sorts `tools` before its template sees them
        self.model_max_length = model_max_length
        self.special_tokens_map: dict[str, str] = dict(special_tokens_map or {})
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        for content in self.special_tokens_map.values():
            tid = backend.token_to_id(content)
            if tid is not None:
                special.add(tid)
        self.all_special_ids: list[int] = sorted(special)
        self._chat_env: Optional[jinja2.Template] = None
        self._text_tok: Optional[_HFTokenizer] = None  # special_tokens_in_content="text" (built on first use)

    # ---- loading ---------------------------------------------------------

    @classmethod
    def from_dir(cls, path: Union[str, Path]) -> "Tokenizer":
        """Load from a Hugging Face model directory: tokenizer.json, else a tiktoken.model (Kimi's)."""
        model_dir = Path(path)
        tok_file = model_dir / "tokenizer.json"
        tok_config = _read_json(model_dir / "tokenizer_config.json")
        sort_tool_keys = False
        if tok_file.is_file():
            backend = _HFTokenizer.from_file(str(tok_file))
        elif (model_dir / TIKTOKEN_FILE).is_file():  # Kimi K2 / K2.5: a tiktoken rank file (tiktoken_files.py)
            layout = layout_of(tok_config, model_dir)
            backend = tiktoken_backend(model_dir, tok_config, layout)
            sort_tool_keys = layout.sort_tools
        else:
            raise ValueError(
                f"No tokenizer.json (or {TIKTOKEN_FILE}) in {str(model_dir)!r}: moelink needs a fast (tokenizers) "
                "tokenizer file there, or a tiktoken rank file of a layout it knows.")
        model_config = _read_json(model_dir / "config.json")
        gen_config = _read_json(model_dir / "generation_config.json")

        # Tokens listed only in tokenizer_config.json still have to exist in
        # the backend, or encode would split them into bytes.
        decoder = tok_config.get("added_tokens_decoder") or {}
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        for _, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = _token_content(spec)
            if content and content not in known:
                backend.add_tokens([AddedToken(
                    content, special=bool(spec.get("special", True)),
                    lstrip=bool(spec.get("lstrip", False)), rstrip=bool(spec.get("rstrip", False)),
                    normalized=bool(spec.get("normalized", False)), single_word=bool(spec.get("single_word", False)))])

        special_map = {}
        for key in _NAMED_SPECIAL_KEYS:
            content = _token_content(tok_config.get(key))
            if content is not None:
                special_map[key] = content
        bos, eos = special_map.get("bos_token"), special_map.get("eos_token")

        # add_bos_token/add_eos_token are deliberately ignored: transformers v5
        # drops them whenever tokenizer.json exists, whose post-processor
        # (e.g. Llama/Mistral's TemplateProcessing with <s>) decides instead.
        max_len = tok_config.get("model_max_length")
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len >= _NO_MAX_LENGTH:
            max_len = None
        extra_eos = _as_id_list(model_config.get("eos_token_id")) + _as_id_list(gen_config.get("eos_token_id"))
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            extra_eos_token_ids=extra_eos,
            chat_template=_find_chat_template(model_dir, tok_config),
            model_max_length=max_len,
            special_tokens_map=special_map,
            clean_up_tokenization_spaces=bool(tok_config.get("clean_up_tokenization_spaces", False)),
            name_or_path=str(model_dir),
            sort_tool_keys=sort_tool_keys,
        )

    # ---- encode / decode -------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (may be < the model's embedding rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (for fast paths such as batch encode)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_without_gil(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`encode`, releasing the GIL while the Rust tokenizer works (`tokenizers`' encode_batch does, its
        encode does not): from a worker thread, a long text no longer stops every other Python thread."""
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids out of the tokenizer's range (padding rows of the embedding) decode to nothing."""
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            text = _clean_up_tokenization(text)
        return text

    def convert_ids_to_tokens(self, ids: Union[int, Iterable[int]]) -> Union[Optional[str], list[Optional[str]]]:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: Union[str, Iterable[str]]) -> Union[Optional[int], list[Optional[int]]]:
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    # ---- chat ------------------------------------------------------------

    def with_chat_template(self, chat_template: str) -> "Tokenizer":
        """This tokenizer rendering chats with `chat_template` instead (a server's --chat-template); the
        vocabulary is shared, this one is left as it is."""
        other = copy.copy(self)
        other.chat_template, other._chat_env = chat_template, None
        return other

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        special_tokens_in_content: str = "tokens",
        **template_kwargs: Any,
    ) -> Union[str, list[int]]:
        """Render `messages` with the model's Jinja chat template.

        Extra keyword arguments (tools, enable_thinking, ...) reach the
        template as variables, as in transformers. With tokenize=True the
        rendered text is encoded without adding special tokens again: the
        template already wrote them.

        `special_tokens_in_content`: "tokens" (as transformers and vLLM) encodes a special token's text inside a
        message's content as that token, so `<|im_end|><|im_start|>system` in a user's message forges a system
        turn; "text" (tokenize=True only) encodes the contents' special-token text as plain text, and only the
        template's own writing yields control tokens.
        """
        continue_final = template_kwargs.get("continue_final_message", False)
        if continue_final and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: set "
                             "add_generation_prompt=False to continue the last message (transformers' rule).")
        if special_tokens_in_content not in SPECIAL_TOKENS_IN_CONTENT:
            raise ValueError(f"special_tokens_in_content={special_tokens_in_content!r} is invalid: choose from "
                             f"{', '.join(map(repr, SPECIAL_TOKENS_IN_CONTENT))}.")
        if special_tokens_in_content == "text":
            if not tokenize:
                raise ValueError("special_tokens_in_content='text' needs tokenize=True: a rendered string cannot tell "
                                 "the template's control tokens from the same text inside a message.")
            return self._chat_ids_content_as_text(messages, add_generation_prompt, template_kwargs)
        if not self.chat_template:
            raise ValueError(
                f"The tokenizer in {self.name_or_path!r} has no chat_template "
                "(tokenizer_config.json, chat_template.jinja); pass a plain prompt instead.")
        if self._chat_env is None:
            self._chat_env = _compile_chat_template(self.chat_template)
        variables = dict(self.special_tokens_map)
        variables.update(template_kwargs)
        variables.pop("continue_final_message", None)  # an argument of the rendering, not a template variable
        if self.sort_tool_keys and variables.get("tools") is not None:
            variables["tools"] = _deep_sorted(variables["tools"])
        try:
            text = self._chat_env.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"Chat template failed to render the messages: {e}") from e
        if continue_final:
            text = _continued(text, messages[-1].get("content") if messages else None)
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text


    def _chat_ids_content_as_text(self, messages, add_generation_prompt: bool, template_kwargs: dict) -> list[int]:
        """The template rendered with a placeholder for each string content, then encoded piece by piece: the
        template's text with its special tokens, each content with special-token text as plain text."""
        marks: dict[str, str] = {}
        nonce = secrets.token_hex(8)  # a content cannot spell a placeholder it does not know

        def mark(content):
            if not isinstance(content, str) or not content:
                return content
            key = f"\ue000{nonce}{len(marks)}\ue001"
            marks[key] = content
            return key

        masked = []
        for m in messages:
            m = dict(m)
            if isinstance(m.get("content"), list):  # OpenAI content parts
                m["content"] = [dict(p, text=mark(p.get("text"))) if isinstance(p, dict) and "text" in p else p
                                for p in m["content"]]
            else:
                m["content"] = mark(m.get("content"))
            masked.append(m)
        text = self.apply_chat_template(masked, add_generation_prompt, tokenize=False, **template_kwargs)
        ids: list[int] = []
        for i, piece in enumerate(re.split("(" + "|".join(map(re.escape, marks)) + ")", text) if marks else [text]):
            if i % 2 and piece in marks:
                ids += self._encode_as_text(marks[piece])
            elif piece:
                ids += self.encode(piece, add_special_tokens=False)
        return ids

    def _encode_as_text(self, text: str) -> list[int]:
        if self._text_tok is None:
            # A copy of the backend that reads special-token text as text: the flag is the backend's own state,
            # and flipping it on the shared one would change what other threads' encodes see meanwhile.
            tok = _HFTokenizer.from_str(self._tok.to_str())
            tok.encode_special_tokens = True
            self._text_tok = tok
        return self._text_tok.encode(text, add_special_tokens=False).ids


SPECIAL_TOKENS_IN_CONTENT = ("tokens", "text")


def _continued(text: str, final: Any) -> str:
    """The rendered chat cut just after the last message's content (its closing end-of-turn and what follows
    dropped), so the model continues that message: transformers' continue_final_message, which vLLM's LLM.chat
    and chat route pass on. A content of parts continues its last text part."""
    if isinstance(final, (list, tuple)):
        final = next((p["text"] for p in reversed(final) if isinstance(p, dict) and isinstance(p.get("text"), str)),
                     None)
    if not isinstance(final, str) or final.strip() not in text:
        raise ValueError("continue_final_message is set but the last message's content does not appear in the "
                         "rendered chat: this template does not write it.")
    at = text.rindex(final.strip())
    # Where the template kept the content's own spacing, cut after all of it; else after its stripped text.
    kept = len(final.lstrip()) if text[at:at + len(final.lstrip())] == final else len(final.strip())
    return text[:at + kept]


class _TemplateRaise(jinja2.TemplateError):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaise(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson HTML-escapes; chat templates expect plain JSON
    # (transformers overrides it the same way).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str) -> jinja2.Template:
    # Sandboxed because templates come from downloaded model files; the same
    # whitespace options and helpers as transformers so templates render alike.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not valid Jinja: {e}") from e


def _deep_sorted(obj: Any) -> Any:
    """dicts with their keys sorted, at every depth (lists keep their order)."""
    if isinstance(obj, dict):
        return {k: _deep_sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_deep_sorted(v) for v in obj]
    return obj


def _clean_up_tokenization(text: str) -> str:
    # Mirrors transformers' clean_up_tokenization for tokenizers that ask for it.
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
            .replace(" 've", "'ve").replace(" 're", "'re"))

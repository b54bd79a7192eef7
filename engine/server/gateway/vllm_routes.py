"""The routes of vLLM's API server that moelink's HTTP front answers itself, from the engine beside it.

smg (1.13) has no `/tokenize`, `/detokenize` or `/version` (its `/v1/tokenize` answers another shape), and its
`GET /v1/models` lists one name per worker without vLLM's `max_model_len`, `root`, `parent` and `permission`. A
vLLM client (benchmark harnesses, LangChain's vLLM wrapper, a router sizing requests) calls them, so the managed
gateway's front (http_front.py) answers them here, in vLLM's request and response shapes:

- `GET /v1/models`: one vLLM model card per served name (--served-model-name, else the model argument as given),
  each with `max_model_len`, `root` (the model argument as given), `parent` null and a `permission` entry;
- `POST /tokenize`: `{"model", "prompt", "add_special_tokens"}` or `{"model", "messages", "add_generation_prompt",
  "continue_final_message", "add_special_tokens", "tools", "chat_template_kwargs"}` (the server's chat template,
  its --chat-template when given, as smg renders chats), `return_token_strs` in both; answers `{"count",
  "max_model_len", "tokens", "token_strs"}`;
- `POST /detokenize`: `{"model", "tokens"}` -> `{"prompt"}` (special tokens kept, as vLLM decodes).

A `model` that is not a name the server takes is 404, as vLLM answers. Bounds: a tokenize request is bounded as a
completion prompt is: text that cannot fit `max_model_len` is refused by its size before it is tokenized (or its
messages rendered), and one whose tokens do not fit is refused after; a detokenize request's tokens as a prompt of
token ids (fewer than max_model_len, each >= 0; an id the vocabulary lacks decodes to nothing, as vLLM's tokenizer
decodes it). Each refusal is HTTP 400 naming the field; a field
vLLM does not take, or one moelink does not (`chat_template`: a client's own Jinja; `mm_processor_kwargs`: text
only), is refused too rather than ignored. Large inputs are tokenized on a worker thread.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Optional

from ...core.no_tokenizer import NoTokenizer
from ...contract.safe_text import shown
from . import lora_routes
from .http_wire import METHOD_NOT_ALLOWED_BODY, error_body
from .chat_render import render_chat
from .json_body import json_flag, json_object, kind_of
from .openai_fields import HttpFieldError

TOKENIZE_PATH = "/tokenize"
DETOKENIZE_PATH = "/detokenize"
MODELS_PATH = "/v1/models"
ROUTES = (TOKENIZE_PATH, DETOKENIZE_PATH)
# Beyond this many characters (or token ids) the work runs on a worker thread, not on the event loop.
INLINE_MAX_CHARS = 2048
INLINE_MAX_IDS = 4096

PROMPT_FIELDS = ("model", "prompt", "add_special_tokens", "return_token_strs")
CHAT_FIELDS = ("model", "messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
               "return_token_strs", "tools", "chat_template_kwargs")
DETOKENIZE_FIELDS = ("model", "tokens")
_REFUSED = {"chat_template": "a request's own chat template is not taken (vLLM refuses it too unless "
                             "--trust-request-chat-template): the server's is used",
            "mm_processor_kwargs": "this server takes text only"}


class NotFound(HttpFieldError):
    """A `model` the server does not serve (HTTP 404, as vLLM answers)."""

    status = 404


class VllmRoutes:
    """Answers /v1/models, /tokenize and /detokenize from a Serving (serving.py) on the server's loop."""

    def __init__(self, serving, chat_template: Optional[str] = None):
        """`chat_template`: the server's --chat-template text (smg renders chats with it), else the tokenizer's."""
        self.s = serving
        tok = serving.tokenizer
        self.tokenizer = tok.with_chat_template(chat_template) if chat_template and hasattr(
            tok, "with_chat_template") else tok
        self.names = frozenset(serving.served_model_names) | frozenset(serving.model_aliases)
        self.lora = lora_routes.LoraRoutes(serving)  # the adapters (lora_routes.py)

    @property
    def base_name(self) -> str:
        """The base model's first served name: what smg knows the worker as (and answers with)."""
        return self.s.served_model_name

    @property
    def max_model_len(self) -> int:
        return self.s.info.max_model_len

    async def answer(self, method: bytes, path: str, body: bytes, query: str = "",
                     client: tuple[str, ...] = ()) -> Optional[tuple[int, bytes]]:
        """(HTTP status, JSON body) of a request this answers, or None: the front relays it to smg. (`query`, the
        request's query string, and `client`, who sent it: these routes read neither.)"""
        if path == MODELS_PATH and method == b"GET":
            return 200, json.dumps(self.models()).encode()
        if path in lora_routes.ROUTES:
            status, out = await self.lora.answer(method, path, body)
            return status, json.dumps(out).encode()
        if path not in ROUTES:
            return None
        if method != b"POST":
            return 405, METHOD_NOT_ALLOWED_BODY  # FastAPI's own answer on vLLM
        if isinstance(self.tokenizer, NoTokenizer):
            return 400, _error(str(self.tokenizer.error(f"{path} needs the vocabulary")), "model")
        try:
            data = json_object(body)
            if path == TOKENIZE_PATH:
                heavy = len(body) > INLINE_MAX_CHARS
                out = await asyncio.to_thread(self.tokenize, data) if heavy else self.tokenize(data)
            else:
                heavy = len(body) > INLINE_MAX_IDS * 2
                out = await asyncio.to_thread(self.detokenize, data) if heavy else self.detokenize(data)
        except NotFound as e:
            return 404, _error(str(e), e.field, 404)
        except HttpFieldError as e:
            return 400, _error(str(e), e.field)
        return 200, json.dumps(out).encode()

    # -- GET /v1/models ----------------------------------------------------------------
    def models(self) -> dict:
        """vLLM's model list: one card per served name, the first the name answers report, then one per LoRA
        adapter (its `parent` the base model, its `root` its directory)."""
        now = int(time.time())
        cards = [self._card(name, now) for name in self.s.served_model_names]
        return {"object": "list", "data": cards + self.lora.cards(now, self._card)}

    def _card(self, name: str, now: int) -> dict:
        return {"id": name, "object": "model", "created": now, "owned_by": "moelink", "root": self.s.model_arg,
                "parent": None, "max_model_len": self.max_model_len,
                "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                                "created": now, "allow_create_engine": False, "allow_sampling": True,
                                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                                "allow_fine_tuning": False, "organization": "*", "group": None,
                                "is_blocking": False}]}

    def route_model(self, data: dict) -> Optional[str]:
        """The LoRA adapter a generation request's `model` names (None: the base model); NotFound (404)
        for a name neither served nor an adapter (lora_routes.py)."""
        try:
            return self.lora.route(data.get("model"))
        except LookupError as e:
            raise NotFound("model", str(e.args[0])) from None

    # -- POST /tokenize ----------------------------------------------------------------
    def tokenize(self, data: dict) -> dict:
        chat = "messages" in data
        if chat and "prompt" in data:
            raise HttpFieldError("prompt", "give `prompt` (text) or `messages` (a chat), not both.")
        if not chat and "prompt" not in data:
            raise HttpFieldError("prompt", "/tokenize takes `prompt` (text) or `messages` (a chat).")
        self._check_fields(data, CHAT_FIELDS if chat else PROMPT_FIELDS, TOKENIZE_PATH)
        self._check_model(data)
        strs = json_flag(data, "return_token_strs", False)
        tok = self.tokenizer
        if chat:
            ids = self._chat_ids(data)
        else:
            prompt = data["prompt"]
            if not isinstance(prompt, str):
                raise HttpFieldError("prompt", f"prompt must be a string (text to tokenize), not "
                                               f"{kind_of(prompt)}: vLLM's /tokenize takes text.")
            self._fits_as_text("prompt", prompt)
            special = json_flag(data, "add_special_tokens", True)
            ids = tok.encode_without_gil(prompt, special) if len(prompt) > INLINE_MAX_CHARS else \
                tok.encode(prompt, special)
        self._fits_as_ids("messages" if chat else "prompt", len(ids))
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                "token_strs": tok.convert_ids_to_tokens(ids) if strs else None}

    def _chat_ids(self, data: dict) -> list[int]:
        tools = data.get("tools")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise HttpFieldError("tools", "tools must be a list of tool objects.")
        return render_chat(self.tokenizer, self.s, data, tools).ids

    # -- POST /detokenize --------------------------------------------------------------
    def detokenize(self, data: dict) -> dict:
        self._check_fields(data, DETOKENIZE_FIELDS, DETOKENIZE_PATH)
        self._check_model(data)
        if "tokens" not in data:
            raise HttpFieldError("tokens", "/detokenize takes `tokens`, a list of token ids.")
        ids = data["tokens"]
        if not isinstance(ids, list):
            raise HttpFieldError("tokens", f"tokens must be a list of token ids, not {kind_of(ids)}.")
        self._fits_as_ids("tokens", len(ids))
        vocab = self.tokenizer.vocab_size
        for i, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise HttpFieldError(f"tokens[{i}]", f"tokens[{i}]={shown(json.dumps(t))} is invalid: a token id is "
                                                     "an integer >= 0.")
        # An id the vocabulary lacks decodes to nothing, as vLLM's tokenizer decodes it ({"prompt": ""}, HTTP 200).
        return {"prompt": self.tokenizer.decode([t for t in ids if t < vocab], skip_special_tokens=False)}

    # -- checks -------------------------------------------------------------------------
    def _check_fields(self, data: dict, allowed: tuple[str, ...], route: str) -> None:
        for key in data:
            if key in allowed:
                continue
            why = _REFUSED.get(key)
            if why is None:
                why = f"it is not a field of {route} (it takes {', '.join(allowed)})"
            raise HttpFieldError(key, f"{shown(key)} is refused: {why}.")

    def _check_model(self, data: dict) -> None:
        model = data.get("model")
        if model is None:  # vLLM's model is optional on these routes
            return
        if not isinstance(model, str) or (model not in self.names and self.s.adapters.get(model) is None):
            raise NotFound("model", f"The model `{shown(str(model), quote=False)}` does not exist: this server "
                                    f"serves {', '.join(map(repr, self.s.served_model_names))}.")

    def _fits_as_text(self, field: str, text) -> None:
        size = text if isinstance(text, int) else len(text.encode("utf-8", "surrogatepass"))
        reason = self.s.text_refusal(field, size)
        if reason is not None:
            raise HttpFieldError(field, reason)

    def _fits_as_ids(self, field: str, count: int) -> None:
        reason = self.s.ids_refusal(field, count)
        if reason is not None:
            raise HttpFieldError(field, reason)


def _error(message: str, param: Optional[str], code: int = 400) -> bytes:
    """vLLM's error body: {"error": {"message", "type", "param", "code"}} (http_wire.error_body)."""
    return error_body(message, param, code)

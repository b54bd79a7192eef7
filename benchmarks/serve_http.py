"""`moelink bench-serve --backend openai|openai-chat --base-url URL`: the load benchmark through the OpenAI HTTP API.

The same levels and the same measures as over gRPC (serve_load.py), through what an OpenAI client calls: each
request a streamed POST /v1/completions (`openai`, vLLM's `vllm bench serve --backend openai`) or
/v1/chat/completions (`openai-chat`, the prompt as one user message), greedy, exactly --output-len tokens
(`ignore_eos`), with `stream_options.include_usage` so that the last event says how many tokens came.
TTFT is send -> the first event that carries text; ITL the gaps between events that carry text (an event is one
streamed step: a step whose text is held back, a partial UTF-8 character, arrives with the next one, as vLLM's
benchmark counts it); TPOT (end - first text) / (tokens - 1) with the usage's token count.

Prompts are text of --input-len tokens: random words (the run's --seed), cut to that many tokens by the server's
own /tokenize and /detokenize (vLLM's routes, moelink's front answers them); a server without them gets
--input-len words, and the token throughput counts the prompt tokens each answer's usage reports. Shared prefixes
(--prefix-reuse) are made the same way. One HTTP/1.1 connection per request (h11), as moelink's front serves them.
"""
from __future__ import annotations

import asyncio
import json
import random
import ssl
import time
from typing import Optional
from urllib.parse import urlsplit

import h11

BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
MAX_EVENT_BYTES = 1 << 20
# Plain words the prompts are drawn from: each a token or two of any English BPE vocabulary.
WORDS = ("the of and to in is was that for on with as by at from his her they this which one all were when "
         "there been more some time into only other new about people first then could after made over many "
         "water would these long little very through where much before right great same old work back years "
         "most world might still place found house light small large again hand high thought every never "
         "under number story river city mountain garden window music letter morning evening summer winter "
         "market bridge island forest engine signal paper silver orange yellow purple quiet gentle sudden").split()


class HttpError(RuntimeError):
    """The server answered with an error status (its status and the start of its body)."""


class OpenAIEndpoint:
    """A server's OpenAI API at `base_url` (http[s]://HOST[:PORT][/v1]): one connection per call."""

    def __init__(self, base_url: str, api_key: Optional[str], timeout_s: float):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--base-url={base_url!r} is invalid: give http://HOST:PORT (the server's OpenAI API, "
                             "`moelink serve --http-port`), optionally ending in /v1.")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.prefix = parts.path.rstrip("/").removesuffix("/v1")
        self.api_key, self.timeout_s = api_key, timeout_s

    def _headers(self, body: Optional[bytes]) -> list[tuple[str, str]]:
        headers = [("host", f"{self.host}:{self.port}"), ("accept", "application/json, text/event-stream"),
                   ("connection", "close")]
        if body is not None:
            headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
        if self.api_key:
            headers.append(("authorization", f"Bearer {self.api_key}"))
        return headers

    async def stream(self, method: str, path: str, payload: Optional[dict] = None):
        """Yields (status, chunk of the body) as the answer comes; a status >= 400 raises HttpError with the body."""
        body = None if payload is None else json.dumps(payload).encode()
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl,
                                                       server_hostname=self.host if self.ssl else None)
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_EVENT_BYTES)
        try:
            data = conn.send(h11.Request(method=method, target=self.prefix + path, headers=self._headers(body)))
            if body:
                data += conn.send(h11.Data(data=body))
            writer.write(data + conn.send(h11.EndOfMessage()))
            await writer.drain()
            status, error = None, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(1 << 16))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    if status is not None and status >= 400:
                        error += bytes(event.data)[:4096 - len(error)]
                    else:
                        yield status, bytes(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            if status is None or status >= 400:
                raise HttpError(f"HTTP {status} from {method} {path}: {error.decode('utf-8', 'replace')[:300]}")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass

    async def call(self, method: str, path: str, payload: Optional[dict] = None):
        """The whole JSON answer of a call."""
        body = b""
        async for _, chunk in self.stream(method, path, payload):
            body += chunk
        return json.loads(body)


async def _sse(chunks):
    """The `data:` payloads of a server-sent event stream, as they come ([DONE] ends it)."""
    buf = b""
    async for _, chunk in chunks:
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)


class HttpClient:
    """Streams one request through the OpenAI API; `run` returns serve_load._Client's timings."""

    def __init__(self, endpoint: OpenAIEndpoint, backend: str, model: str):
        self.endpoint, self.backend, self.model = endpoint, backend, model
        self.path = BACKENDS[backend]

    def _payload(self, prompt: str, output_len: int) -> dict:
        body = dict(model=self.model, max_tokens=output_len, ignore_eos=True,
                    temperature=0.0, stream=True, stream_options={"include_usage": True})
        if self.backend == "openai-chat":
            return dict(body, messages=[{"role": "user", "content": prompt}])
        return dict(body, prompt=prompt)

    @staticmethod
    def _text(event: dict) -> str:
        choices = event.get("choices") or []
        if not choices:
            return ""
        choice = choices[0]
        return choice.get("text") or (choice.get("delta") or {}).get("content") or ""

    async def run(self, rid: str, prompt: str, output_len: int) -> dict:
        t0 = time.perf_counter()
        ttft, itls, last, usage = None, [], t0, None

        async def read():
            nonlocal ttft, last, usage
            async for event in _sse(self.endpoint.stream("POST", self.path, self._payload(prompt, output_len))):
                if event.get("usage"):
                    usage = event["usage"]
                if not self._text(event):
                    continue
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:
                    itls.append(now - last)
                last = now

        try:
            await asyncio.wait_for(read(), self.endpoint.timeout_s)
        except asyncio.TimeoutError:
            return dict(ok=False, error="DEADLINE_EXCEEDED", start=t0, end=time.perf_counter())
        except (HttpError, OSError, ValueError, h11.ProtocolError) as exc:
            return dict(ok=False, error=str(exc).split(":", 1)[0][:80], start=t0, end=time.perf_counter())
        end = time.perf_counter()
        n = int((usage or {}).get("completion_tokens", 0))
        ok = n == output_len and ttft is not None
        return dict(ok=ok, error=None if ok else f"got {n} tokens", start=t0, end=end, ttft=ttft, itls=itls,
                    e2e=end - t0, tokens=n, prompt_tokens=int((usage or {}).get("prompt_tokens", 0)),
                    tpot=(end - t0 - ttft) / (n - 1) if n > 1 and ttft is not None else 0.0)


class TextPrompts:
    """Text prompts of a given token count, cut by the server's /tokenize and /detokenize (vLLM's routes)."""

    def __init__(self, endpoint: OpenAIEndpoint, model: str, rng: random.Random):
        self.endpoint, self.model, self.rng = endpoint, model, rng
        self.exact: Optional[bool] = None  # whether the server cuts prompts by tokens (None: not asked yet)

    async def make(self, num_tokens: int) -> str:
        words = " ".join(self.rng.choice(WORDS) for _ in range(num_tokens))
        if self.exact is False:
            return words
        try:
            ids = (await self.endpoint.call("POST", "/tokenize", dict(model=self.model, prompt=words,
                                                                      add_special_tokens=False)))["tokens"]
            text = (await self.endpoint.call("POST", "/detokenize", dict(model=self.model,
                                                                         tokens=ids[:num_tokens])))["prompt"]
        except (HttpError, KeyError, ValueError) as exc:
            if self.exact is None:
                print(f"note: the server has no vLLM /tokenize, /detokenize ({exc}); prompts are {num_tokens} words",
                      flush=True)
            self.exact = False
            return words
        self.exact = True
        return " " + text.lstrip() if not text.startswith(" ") else text


async def served_model(endpoint: OpenAIEndpoint) -> dict:
    """The first model GET /v1/models lists (the name answers report), with its max_model_len when given."""
    listed = (await endpoint.call("GET", "/v1/models")).get("data") or []
    if not listed:
        raise ValueError("GET /v1/models lists no model: is the server ready?")
    return listed[0]


__all__ = ["BACKENDS", "HttpClient", "OpenAIEndpoint", "TextPrompts", "served_model"]

"""The managed gateway's front: the OpenAI HTTP port itself, a thin HTTP/1.1 relay in front of smg.

Why it exists: smg (1.13) drops request fields it does not know before it calls the worker, vLLM's
structured-output fields among them, so `"guided_choice": ["left", "right"]` came back unconstrained with
HTTP 200. The front reads each chat or completions request, lets openai_fields.rewrite carry those fields in
the ones smg forwards (or answers 400 naming the field), and relays everything else byte for byte.

How: a client's connection carries its requests in turn (HTTP/1.1 keep-alive, as vLLM's uvicorn serves them:
http_wire.KeptConnection; an idle one is closed after 5 s or VLLM_HTTP_TIMEOUT_KEEP_ALIVE). Each request is read
whole (h11: Content-Length or chunked, bounded by MAX_BODY_BYTES) and answered here (the routes below) or relayed:
sent to smg on loopback with `connection: close`, and smg's answer copied back as it comes (streams included) until
smg closes (relay.py: the relay, and the rewriting of smg's errors into vLLM's shape on the way back); a relayed
answer's head gets `connection: close` too, so the client opens a new connection for its next request.

The API key (`--api-key`): the front asks it (`Authorization: Bearer KEY`, as smg and vLLM do) of every path
under /v1 (and /v1beta) itself, before a field is looked at, as vLLM guards all of /v1: smg (1.13) asked it of
its generation routes but answered `GET /v1/models` to anyone. A request without it gets 401 here (never a 400
naming a field). The probes (/health, /liveness, ...) and `GET /metrics` stay open, as on vLLM's API port, and so
do vLLM's own routes outside /v1 (/tokenize, /detokenize, /version, /ping): vLLM's API-key middleware guards
paths that start with /v1 only.

vLLM's `POST /v1/completions` and `POST /v1/chat/completions` are answered from the engine beside the front
(completions_route.py: logprobs, echo, prompt logprobs and token-id prompts, which smg 1.13 drops or refuses;
chat_route.py: the chat rendered here, vLLM's fields and shapes), unless a body needs what only smg carries.
SGLang's native `POST /generate` (generate_route.py) and RL control routes (rl_routes.py) are answered from the
engine beside the front, and ask the key though not under /v1. vLLM's routes that smg lacks are answered here:
/version and /ping (vLLM's /health, GET or POST) always;
/tokenize, /detokenize and vLLM's /v1/models cards from the engine when it is beside the front (`local`,
vllm_routes.py); a front before a gateway started by hand answers /tokenize and /detokenize with 404.

A client that goes away (its connection reads EOF) before smg's answer has ended is reported to the server
(`on_hangup`, relay.py), which ends the request itself: smg would not (hangups.py), and a request whose grammar still
compiled, or a non-streamed one, ran to its end. Each relayed request carries a relay id of the front's own in
hangups.RELAY_HEADER (smg makes it the gRPC request id's prefix); a client's own copy of that header is dropped.

Only the OpenAI API and the health probes are relayed (PUBLIC_ROUTES); `GET /metrics` is answered here
(Prometheus text: the engine's series, vLLM's names and smg's own, http_metrics.py); every other path is 404. smg
serves its control plane on the same port (`POST /workers` adds a worker that then receives users' prompts,
`DELETE /workers/ID` removes moelink's own), so a client must never reach it; smg also asks those routes
for an admin key only moelink knows (admin.py), which guards its loopback port. The health probes
answer 503 here while the gateway reports it cannot serve (its worker is not registered).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from typing import Awaitable, Callable, Optional

import h11

from ..client_identity import CLIENT_ID_HEADER, http_client
from .http_wire import (METHOD_NOT_ALLOWED_BODY, NOT_FOUND_BODY, UNAUTHORIZED_BODY, KeptConnection, answer_watched,
                        error_body, header_of, keep_alive_s, read_request, write_answer)
from .generate_route import GENERATE_PATH, PATHS as GENERATE_PATHS
from .json_body import INLINE_BODY_BYTES
from .openai_fields import ADAPTER_PATHS, CHAT_PATH, COMPLETIONS_PATH, HttpFieldError, refuse_too_deep, rewrite
from .quirks import needs_key
from .relay import MAX_HEAD_BYTES, SmgRelay
from .rl_routes import PATHS as RL_PATHS
from .tool_calls import asks_one_call

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20  # a relayed body's cap; a route answered here may set a smaller one (`local.body_limit`)
# What clients reach through the front: the OpenAI API (each route and what lies under it, e.g.
# /v1/models/ID) and the probes. smg's control plane (/workers, /flush_cache, /get_loads, profiling, /wasm,
# /parse, /v1/rl) is not among them.
# vLLM's own routes beside them: /tokenize, /detokenize (answered from the engine, vllm_routes.py), /version and
# /ping (answered here).
PUBLIC_ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/conversations",
                 "/v1/messages", "/v1/embeddings", "/v1/rerank", "/v1/classify", "/v1/tokenize", "/v1/detokenize",
                 "/v1beta/interactions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/health",
                 "/health_generate", "/liveness", "/readiness", "/tokenize", "/detokenize", "/version",
                 "/ping") + GENERATE_PATHS + RL_PATHS
PROBES = ("/health", "/health_generate", "/readiness", "/ping")
LIVENESS_PATH = "/liveness"  # 503 only once the engine died (health.py engine_down), not while smg restarts
VERSION_PATH = "/version"
PING_PATH = "/ping"  # vLLM's (SageMaker's) probe, GET or POST: /health
HEALTH_PATHS = ("/health", PING_PATH)  # answered here as vLLM answers them: 200, an empty body
# Answered only where the engine is beside the front: vLLM's tokenizer routes, and the RL control routes
# (rl_routes.py: never relayed, smg's own /flush_cache is its control plane's).
ENGINE_ROUTES = ("/tokenize", "/detokenize") + GENERATE_PATHS + RL_PATHS
# Routes outside /v1 that still ask the API key: the RL control routes, SGLang's /generate (a data route) and
# /abort_request.
KEYED_ROUTES = GENERATE_PATHS + RL_PATHS
METRICS_PATH = b"/metrics"
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format
_ASK_BEARER = ((b"www-authenticate", b"Bearer"),)  # RFC 6750: what a 401 asks for


class HttpFront:
    """Listens on (host, port); relays to smg on 127.0.0.1:upstream_port. start() / stop() on the server's loop."""

    def __init__(self, host: str, port: int, upstream_port: int, api_key: Optional[str] = None,
                 not_serving: Optional[Callable[[], Optional[str]]] = None,
                 on_hangup: Optional[Callable[[str], Awaitable[object]]] = None,
                 metrics: Optional[Callable[[], Awaitable[bytes]]] = None, local=None,
                 engine_down: Optional[Callable[[], Optional[str]]] = None, completions=None, chat=None):
        """`not_serving()`: why the gateway cannot serve now (the probes answer 503 with it), or None.
        `engine_down()`: why the engine beside the front cannot serve any more (health.py engine_down: every probe,
        /liveness too, answers 503 with it at once), or None.
        `on_hangup(relay_id)`: the client of the request relayed under `relay_id` left before its answer ended.
        `metrics()`: the Prometheus text `GET /metrics` answers (http_metrics.py), or None: 404 as any route.
        `local`: what answers vLLM's routes and the RL control routes from the engine (vllm_routes.VllmRoutes and
        rl_routes.RlRoutes, chained: `await local.answer(method, path, body, query)` -> (status, body) or None to
        relay), or None (a front before a gateway started by hand).
        `completions`: what answers `POST /v1/completions` from the engine beside `local`
        (completions_route.CompletionsRoute: `await completions.claim(body, client)` -> the answer, or None to relay),
        or None: relayed to smg. `chat`: the same for `POST /v1/chat/completions` (chat_route.ChatRoute)."""
        self.host, self.port, self.upstream_port = host, port, upstream_port
        self.api_key = api_key
        self.not_serving = not_serving
        self.on_hangup = on_hangup
        self.metrics = metrics
        self.local = local
        self.engine_down = engine_down
        # The routes answered from the engine unless a body needs smg (claim answers None): path -> route.
        self.claimed = {p: r for p, r in ((COMPLETIONS_PATH, completions), (CHAT_PATH, chat))
                        if r is not None and local is not None}
        # What sends a request on to smg and its answer back (relay.py).
        self.relay = SmgRelay(upstream_port, not_serving, on_hangup, local)
        self._server: Optional[asyncio.base_events.Server] = None
        self._connections: set[asyncio.Task] = set()
        self.keep_alive_s = keep_alive_s()  # a bad VLLM_HTTP_TIMEOUT_KEEP_ALIVE is refused here, at the start

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host.strip("[]"), self.port, limit=MAX_HEAD_BYTES)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection: its requests answered in turn while both sides keep it (HTTP/1.1 keep-alive,
        http_wire.KeptConnection), the wait for each next one at most `keep_alive_s`."""
        task = asyncio.current_task()
        self._connections.add(task)
        conn = KeptConnection(max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            idle_s: Optional[float] = None  # the first request is waited for as long as the client takes
            while await self._one(conn, reader, writer, idle_s):
                conn.start_next_cycle()
                idle_s = self.keep_alive_s
        except asyncio.CancelledError:
            # stop() cancels the open connections: the handler ends as a finished task, not a cancelled one.
            # asyncio.start_server's done-callback (Python 3.11) calls exception() on it, which raises for a cancelled
            # task: a traceback in the log at every stop with a connection open.
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _one(self, conn: KeptConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   idle_s: Optional[float]) -> bool:
        """Read and answer one request of the connection; whether it may carry another: both sides done with this
        one through h11 (a relayed answer is copied as smg wrote it, and says `connection: close`), neither closing,
        the front not stopping."""
        head = False
        try:
            got = await read_request(conn, reader, writer, self._body_limit, MAX_BODY_BYTES, idle_s)
            if got is None:
                return False
            request, body = got
            head = request.method == b"HEAD"
            conn.closing = self._server is None or not self._server.is_serving()
            await self._route(conn, request, body, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, h11.RemoteProtocolError):
            return False  # the client went away or spoke no HTTP: nothing to answer
        except Exception:
            # A bug of the front's own: logged once, and the client gets a 500 rather than a dropped connection
            # (as uvicorn and nginx answer a handler's failure), unless its answer had already begun.
            logger.exception("the OpenAI front failed answering a request")
            if conn.our_state is h11.SEND_RESPONSE:
                conn.closing = True
                with contextlib.suppress(Exception):
                    await write_answer(conn, writer, 500, error_body("internal error of the HTTP front.", None, 500),
                                       head_only=head)
            return False
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE and not conn.closing

    async def _route(self, conn, request: h11.Request, body: bytes, reader, writer) -> None:
        """Answer one whole request: here, from the engine (`local`), or relayed to smg."""
        head = request.method == b"HEAD"  # answered as GET without the body (RFC 9110 9.3.2), never a body
        method = b"GET" if head else request.method
        if self.metrics is not None and method == b"GET" and request.target.split(b"?", 1)[0] == METRICS_PATH:
            # Answered here, as vLLM answers it on its API port (no API key: Prometheus sends none).
            await write_answer(conn, writer, 200, await self.metrics(), METRICS_CONTENT_TYPE, head_only=head)
            return
        path = public_path(request.target)
        if path is None:
            # vLLM's FastAPI answers a path it has no route for with its framework's body (so does this front).
            await write_answer(conn, writer, 404, NOT_FOUND_BODY, head_only=head)
            return
        # The RL control routes and /generate take the key too, though not under /v1 (vLLM's rule for the others).
        if (needs_key(path) or path in KEYED_ROUTES) and not self._authorized(request):
            # vLLM's API-key middleware's body ({"error": "Unauthorized"}); the header says what to send.
            await write_answer(conn, writer, 401, UNAUTHORIZED_BODY, extra=_ASK_BEARER, head_only=head)
            return
        reason = None
        if self.engine_down is not None and (path in PROBES or path == LIVENESS_PATH):
            reason = self.engine_down()  # the engine died: every probe, at once (health.py)
        if reason is None and self.not_serving is not None and path in PROBES:
            reason = self.not_serving()
        if reason is not None:
            await write_answer(conn, writer, 503, error_body(reason, None, 503), head_only=head)
            return
        if path in HEALTH_PATHS and self.not_serving is not None:
            # vLLM's /health and /ping: 200 with an empty body while the engine and the managed gateway serve (both
            # checked above), not smg's "OK". A front before a gateway started by hand asks that gateway (below).
            ok = method == b"GET" or (method == b"POST" and path == PING_PATH)  # vLLM's methods for each
            await write_answer(conn, writer, 200 if ok else 405, b"" if ok else METHOD_NOT_ALLOWED_BODY,
                               content_type=None if ok else b"application/json", head_only=head)
            return
        if await self._answer_here(conn, request, method, path, body, writer, reader):
            return
        if path == PING_PATH:  # vLLM's /ping is its /health, by GET or POST
            await self.relay.relay(conn, request, b"", reader, writer, b"HEAD" if head else b"GET", b"/health")
            return
        try:
            # A large body is parsed off the event loop (every other connection and the engine's
            # streams share it): 64 MiB of JSON takes a second or more.
            body, one_call, adapter = self._inspect(request, body) if len(body) <= INLINE_BODY_BYTES \
                else await asyncio.to_thread(self._inspect, request, body)
        except HttpFieldError as e:
            await write_answer(conn, writer, e.status, error_body(str(e), e.field, e.status))  # 404: an unknown model
            return
        await self.relay.relay(conn, request, body, reader, writer, one_call=one_call, adapter=adapter)

    def _body_limit(self, request: h11.Request) -> int:
        """The most body bytes read for `request`: a route answered from the engine bounds its own (the
        /generate and RL routes: --max-http-body-bytes, whose JSON is parsed in this process), the rest
        MAX_BODY_BYTES."""
        limit = getattr(self.local, "body_limit", None)
        path = public_path(request.target)
        most = limit(path) if limit is not None and path is not None else None
        return MAX_BODY_BYTES if most is None else min(most, MAX_BODY_BYTES)

    async def _answer_here(self, conn, request: h11.Request, method: bytes, path: str, body: bytes, writer,
                           reader) -> bool:
        """Answer vLLM's routes that smg lacks: /version here, /tokenize, /detokenize and /v1/models from the
        engine (vllm_routes.py) when it is beside the front. Whether it answered. `method`: the request's, GET for
        a HEAD (answered without its body)."""
        head = request.method == b"HEAD"
        if path == VERSION_PATH:
            if method != b"GET":
                await write_answer(conn, writer, 405, METHOD_NOT_ALLOWED_BODY)
            else:
                await write_answer(conn, writer, 200, json.dumps({"version": moelink_version()}).encode(),
                                   head_only=head)
            return True
        if self.local is not None:
            query = request.target.split(b"?", 1)[1].decode("latin-1") if b"?" in request.target else ""
            # Who sent it: its /generate requests' fair share and the scope of its ids (client_identity.py).
            client = http_client(writer.get_extra_info("peername"), header_of(request, CLIENT_ID_HEADER.encode()),
                                 authenticated=bool(self.api_key))
            if path in self.claimed and method == b"POST":
                # vLLM's completions and chat from the engine (completions_route.py, chat_route.py), unless a
                # field only smg carries
                answering = await self.claimed[path].claim(body, client, header_of(request, b"x-request-id"))
                if answering is not None:
                    await answer_watched(conn, writer, reader, answering, head_only=head)
                    return True
            if path == GENERATE_PATH:  # generation: a client that leaves ends it (generate_route.py)
                await answer_watched(conn, writer, reader, self.local.answer(method, path, body, query, client=client),
                                     head_only=head)
                return True
            got = await self.local.answer(method, path, body, query, client=client)
            if got is None:
                return False
            status, answer = got  # (HTTP status, JSON body)
            await write_answer(conn, writer, status, answer, head_only=head)
            return True
        if path in RL_PATHS or path in GENERATE_PATHS:
            await write_answer(conn, writer, 404, error_body(
                f"{path} is answered by `moelink serve`'s own HTTP front, beside the engine; this front "
                "(`moelink http-front`) stands before a gateway started by hand: call the server's gRPC Control "
                "service (the native Generation service for /generate and /abort_request).", None, 404), head_only=head)
            return True
        if path in ENGINE_ROUTES:
            await write_answer(conn, writer, 404, error_body(
                f"{path} is answered by `moelink serve`'s own OpenAI front, which has the tokenizer; this front "
                f"(`moelink http-front`) stands before a gateway started by hand: ask smg's /v1{path} instead.", None,
                404),
                head_only=head)
            return True
        return False

    def _inspect(self, request: h11.Request, body: bytes) -> tuple[bytes, bool, Optional[str]]:
        """(the body to relay, whether it asks for one required tool call, the LoRA adapter its `model` names):
        the body rewritten when a chat or completions request carries vLLM's structured-output fields, or when a
        generation request (chat, completions, responses, messages) names an adapter (sent to smg under the base
        model's name: lora_routes.py); the call's note is for the engine, which closes smg's array of calls after
        one (tool_calls.py: smg 1.13 drops `parallel_tool_calls: false`)."""
        path = request.target.split(b"?", 1)[0].decode("latin-1")
        if request.method != b"POST" or path not in ADAPTER_PATHS:
            return body, False, None
        refuse_too_deep(body)  # before json.loads and the json.dumps below, which recurse per level
        try:
            data = json.loads(body)
        except ValueError:
            return body, False, None  # smg answers malformed JSON itself
        if not isinstance(data, dict):
            return body, False, None
        adapter = self.local.route_model(data) if self.local is not None else None
        new = rewrite(path, data) if path in (CHAT_PATH, COMPLETIONS_PATH) else None
        if adapter is not None:
            new = dict(new if new is not None else data, model=self.local.base_name)
        one_call = path == CHAT_PATH and asks_one_call(data)
        return body if new is None else json.dumps(new).encode(), one_call, adapter

    def _authorized(self, request: h11.Request) -> bool:
        """Whether the request carries the API key (any request does when there is none)."""
        if not self.api_key:
            return True
        given = dict(request.headers).get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.api_key}".encode())

def moelink_version() -> str:
    """moelink's version (what GET /version answers, as vLLM's answers vLLM's)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("moelink")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def public_path(target: bytes) -> Optional[str]:
    """The path of a request target the front relays (origin form, a PUBLIC_ROUTES route or under one), else
    None. Dot segments, empty segments, backslashes and percent-encoding are refused: no route of the
    OpenAI API needs them, and a router that resolved them could land on a control-plane route."""
    path = target.split(b"?", 1)[0].decode("latin-1")
    if not path.startswith("/") or "%" in path or "\\" in path:
        return None
    if any(seg in ("", ".", "..") for seg in path.split("/")[1:]):
        return None
    for route in PUBLIC_ROUTES:
        if path == route or path.startswith(route + "/"):
            return path
    return None

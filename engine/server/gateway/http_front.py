"""The managed gateway's front: the OpenAI HTTP port itself, a thin HTTP/1.1 relay in front of smg.

Why it exists: smg (1.13) drops request fields it does not know before it calls the worker, vLLM's
structured-output fields among them, so `"guided_choice": ["left", "right"]` came back unconstrained with
HTTP 200. The front reads each chat or completions request, lets openai_fields.rewrite carry those fields in
the ones smg forwards (or answers 400 naming the field), and relays everything else byte for byte.

How: a client's connection carries its requests in turn (HTTP/1.1 keep-alive, as vLLM's uvicorn serves them:
http_wire.KeptConnection; an idle one is closed after 5 s or VLLM_HTTP_TIMEOUT_KEEP_ALIVE). Each request's head is
read and judged first (http_admission.py: the key, the route, an ambiguous framing; a 401, 404 or 400 leaves the
body unread), then its body, up to the route's cap (http_routes.body_limit, http_limits.py), and it is answered here
(the routes below) or relayed:
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

Only the OpenAI API and the health probes are relayed (http_routes.PUBLIC_ROUTES); `GET /metrics` is answered here
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
from .http_admission import (ACCEPT_BACKLOG, PER_CLIENT, ConnectionTable, EveryFew, Slot, answer_bad_head,
                             client_address, connection_cap, declares_body, framing_refusal, quiet_accept_failures,
                             read_body, read_head, refuse_busy)
from .http_limits import HttpLimits
# The route tables (re-exported: public_path is this module's public name too).
from .http_routes import (ENGINE_ROUTES, HEALTH_PATHS, KEYED_ROUTES, LIVENESS_PATH, METRICS_PATH, PING_PATH, PROBES,
                          VERSION_PATH, body_limit, no_engine_body, public_path)
from .http_wire import (METHOD_NOT_ALLOWED_BODY, NOT_FOUND_BODY, UNAUTHORIZED_BODY, ClientStalled, KeptConnection,
                        answer_watched, error_body, header_of, keep_alive_s, moelink_version, refuse_unread,
                        write_answer)
from .generate_route import GENERATE_PATH
from .vllm_token_generate import PATHS as TOKEN_GENERATE_PATHS
from .json_body import INLINE_BODY_BYTES
from .openai_fields import ADAPTER_PATHS, CHAT_PATH, COMPLETIONS_PATH, HttpFieldError, refuse_too_deep, rewrite
from .quirks import needs_key
from .relay import MAX_HEAD_BYTES, SmgRelay
from .tool_calls import asks_one_call

logger = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format
_ASK_BEARER = ((b"www-authenticate", b"Bearer"),)  # RFC 6750: what a 401 asks for
_stall_log = EveryFew()


class HttpFront:
    """Listens on (host, port); relays to smg on 127.0.0.1:upstream_port. start() / stop() on the server's loop."""

    def __init__(self, host: str, port: int, upstream_port: int, api_key: Optional[str] = None,
                 not_serving: Optional[Callable[[], Optional[str]]] = None,
                 on_hangup: Optional[Callable[[str], Awaitable[object]]] = None,
                 metrics: Optional[Callable[[], Awaitable[bytes]]] = None, local=None,
                 engine_down: Optional[Callable[[], Optional[str]]] = None, completions=None, chat=None,
                 limits: Optional[HttpLimits] = None):
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
        or None: relayed to smg. `chat`: the same for `POST /v1/chat/completions` (chat_route.ChatRoute).
        `limits`: the connection cap, the head, body and stall timeouts and the body caps (HttpLimits' defaults
        when None)."""
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
        self._refusing: set[asyncio.Task] = set()  # connections past the cap, being answered 503 (not counted)
        self.keep_alive_s = keep_alive_s()  # a bad VLLM_HTTP_TIMEOUT_KEEP_ALIVE is refused here, at the start
        self.limits = limits if limits is not None else HttpLimits()
        self.max_connections = self.limits.max_connections  # lowered at start() to what the fds allow
        self.table = ConnectionTable(self.max_connections, self.limits.per_client(self.max_connections))

    async def start(self) -> None:
        self.max_connections = connection_cap(self.limits.max_connections)  # raises the soft fd limit first
        # Each connection's client and whether it waits for a head (evictable) or has a request in flight.
        self.table = ConnectionTable(self.max_connections, self.limits.per_client(self.max_connections))
        quiet_accept_failures(asyncio.get_running_loop())
        # backlog: uvicorn's (vLLM's) 2048, not asyncio's 100: a burst of connections (an idle flood, a benchmark's
        # pool opening) overflowed the accept queue, and a client's SYN dropped there waits 1 s for its retry.
        self._server = await asyncio.start_server(self._serve, self.host.strip("[]"), self.port, limit=MAX_HEAD_BYTES,
                                                  backlog=ACCEPT_BACKLOG)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections | self._refusing):
                task.cancel()
            await asyncio.gather(*self._connections, *self._refusing, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection: its requests answered in turn while both sides keep it (HTTP/1.1 keep-alive,
        http_wire.KeptConnection), the wait for each next one at most `keep_alive_s`, each head at most the head
        timeout. One past its client's cap, or past the front's with no idle connection to close in its place
        (http_admission.ConnectionTable), is answered 503 and closed at once."""
        client = client_address(writer.get_extra_info("peername"))
        slot = self.table.admit(client, writer)
        if not isinstance(slot, Slot):
            self._refusing.add(asyncio.current_task())
            try:
                if slot == PER_CLIENT:
                    await refuse_busy(reader, writer, self.table.per_client, client)
                else:
                    await refuse_busy(reader, writer, self.max_connections)
            except asyncio.CancelledError:
                pass  # stop(): ends as a finished task (see below)
            finally:
                writer.transport.abort()  # its 503 is sent (a small write goes out at once): no close handshake
                self._refusing.discard(asyncio.current_task())
            return
        task = asyncio.current_task()
        self._connections.add(task)
        conn = KeptConnection(max_incomplete_event_size=MAX_HEAD_BYTES, stall_s=self.limits.stall_timeout_s)
        try:
            idle_s: Optional[float] = None  # the first request: its head within the head timeout of the accept
            while await self._one(conn, reader, writer, idle_s, slot):
                conn.start_next_cycle()
                idle_s = self.keep_alive_s
        except asyncio.CancelledError:
            # stop() cancels the open connections: the handler ends as a finished task, not a cancelled one.
            # asyncio.start_server's done-callback (Python 3.11) calls exception() on it, which raises for a cancelled
            # task: a traceback in the log at every stop with a connection open.
            pass
        finally:
            writer.close()
            try:  # what is left of an answer goes out first, unless the client reads none of it
                await asyncio.wait_for(writer.wait_closed(), self.limits.stall_timeout_s)
            except (Exception, asyncio.CancelledError):
                writer.transport.abort()
            self._connections.discard(task)
            self.table.release(slot)

    async def _one(self, conn: KeptConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   idle_s: Optional[float], slot: Slot) -> bool:
        """Read and answer one request of the connection; whether it may carry another: both sides done with this
        one through h11 (a relayed answer is copied as smg wrote it, and says `connection: close`), neither closing,
        the front not stopping. Until its head is whole the connection is idle (`slot`: it may be closed for a new
        one at the connection cap); then busy until its answer ends."""
        head = False
        try:
            self.table.idle(slot)
            got = await read_head(conn, reader, idle_s, self.limits.head_timeout_s, MAX_HEAD_BYTES)
            if got is None or not self.table.busy(slot):
                return False  # the client left, stayed idle, did not finish a head in time, or was evicted
            request, raw = got
            head = request.method == b"HEAD"
            why = framing_refusal(raw)
            if why is not None:
                await answer_bad_head(reader, writer, why, self.limits.stall_timeout_s)
                return False
            conn.closing = self._server is None or not self._server.is_serving()
            early = self._from_head(request)
            if early is not None:
                await self._answer_from_head(conn, request, early, reader, writer)
            else:
                most, flag = body_limit(request, self.limits, self.local)
                body = await read_body(conn, reader, writer, request, most, flag, self.limits.body_timeout_s)
                if body is None:
                    return False  # answered 413 or 408
                await self._route(conn, request, body, reader, writer)
        except ClientStalled as e:
            # Its answer is abandoned (the engine's request ended with it: answer_watched) and the connection
            # dropped now, with what it would not read.
            _stall_log(logger.warning, "an HTTP client stalled: %s (--http-stall-timeout); its request was ended and "
                       "its connection closed", e)
            writer.transport.abort()
            return False
        except h11.RemoteProtocolError as e:
            # A head (or chunked body) h11 cannot read: 400 (431 for a head too large) and closed, as uvicorn answers
            # it, unless its answer had begun. A client that only half-closed (it may, after its request) reads it;
            # one gone for good does not, and the write fails quietly.
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not slot.gone:  # gone: evicted, closed
                with contextlib.suppress(Exception):
                    await answer_bad_head(reader, writer, str(e), self.limits.stall_timeout_s,
                                          431 if e.error_status_hint == 431 else 400)
            return False
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return False  # the client went away: nothing to answer
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
        path = public_path(request.target)  # never None here: _from_head answered 404
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

    def _from_head(self, request: h11.Request) -> Optional[tuple[int, bytes, tuple]]:
        """The answer a request gets from its head alone, (status, body, extra headers), or None: 404 for a path
        the front does not serve, 401 without the key, 405 for /version by another method than GET, 404 for an
        engine route on a front without the engine. Decided before a byte of the body is read (issue 95: a
        keyless client sent 64 MiB to any path before it was refused)."""
        method = b"GET" if request.method == b"HEAD" else request.method
        if self.metrics is not None and method == b"GET" and request.target.split(b"?", 1)[0] == METRICS_PATH:
            return None
        path = public_path(request.target)
        if path is None:
            # vLLM's FastAPI answers a path it has no route for with its framework's body (so does this front).
            return 404, NOT_FOUND_BODY, ()
        # The RL control routes and /generate take the key too, though not under /v1 (vLLM's rule for the others).
        if (needs_key(path) or path in KEYED_ROUTES) and not self._authorized(request):
            # vLLM's API-key middleware's body ({"error": "Unauthorized"}); the header says what to send.
            return 401, UNAUTHORIZED_BODY, _ASK_BEARER
        if path == VERSION_PATH and method != b"GET":
            return 405, METHOD_NOT_ALLOWED_BODY, ()
        if self.local is None and path in ENGINE_ROUTES:
            return 404, no_engine_body(path), ()
        return None

    async def _answer_from_head(self, conn, request: h11.Request, answer: tuple[int, bytes, tuple], reader,
                                writer) -> None:
        """Write an answer _from_head gave: a request that announces a body keeps it unread and its connection
        closes after a lingering drain; one without keeps its connection."""
        status, body, extra = answer
        head = request.method == b"HEAD"
        if declares_body(request):
            await refuse_unread(conn, reader, writer, status, body, head, extra)
            return
        if await read_body(conn, reader, writer, request, 0, "", self.limits.body_timeout_s) is not None:
            await write_answer(conn, writer, status, body, extra=extra, head_only=head)

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
            # generation (/generate, vLLM's token-in/token-out generate): a client that leaves ends it
            if path == GENERATE_PATH or path in TOKEN_GENERATE_PATHS:
                await answer_watched(conn, writer, reader, self.local.answer(method, path, body, query, client=client),
                                     head_only=head)
                return True
            got = await self.local.answer(method, path, body, query, client=client)
            if got is None:
                return False
            status, answer = got  # (HTTP status, JSON body)
            await write_answer(conn, writer, status, answer, head_only=head)
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
        """Whether the request carries the API key (any request does when there is none). Two Authorization
        headers never authorize: a proxy before the front may have checked the other one."""
        if not self.api_key:
            return True
        given = [value for name, value in request.headers if name == b"authorization"]
        return len(given) == 1 and hmac.compare_digest(given[0], f"Bearer {self.api_key}".encode())

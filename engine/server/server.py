"""The gRPC server: both services, health, reflection, auth, TLS, and a graceful drain.

The AsyncEngine runs in this process (its engine thread steps the model); the
grpc.aio server runs on the asyncio loop and only enqueues work and relays
outputs, so a slow client never stalls a step.

Health (`grpc.health.v1`): "" is liveness — SERVING while the process can
serve at all, NOT_SERVING once the engine loop died. Each service name is
readiness — NOT_SERVING while draining or after the engine died.

With `gateway_port`, a second server on the same loop serves the VllmEngine
service and health on a loopback port without the API key or TLS, for a
gateway beside it (gateway/quirks.py needs_keyless_listener); it shares everything else.

Drain (SIGTERM/SIGINT, or `drain()`): readiness goes NOT_SERVING, new
requests get UNAVAILABLE, in-flight requests have `shutdown_grace` seconds to
finish; whatever is still running then ends with finish_reason "abort" (a
normal last message, not a broken stream; a streamed VllmEngine request ends
with UNAVAILABLE instead, vllm_engine.py says why), and the server stops. That holds
whatever the ranks do: if the engine is stuck in a step (a frozen rank the
watchdogs have not failed yet) the streams are ended here, not by the engine.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from ..api.async_engine import AsyncEngine
from ..tools.builtin_model import describe as describe_builtin_model
from ..core.metrics import EngineMetrics
from ..core.no_tokenizer import NoTokenizer
from ..config.worker_config import DUMMY_WARNING
from ..contract.safe_text import MAX_LOG_LINE_CHARS, MAX_SHOWN_CHARS, shown
from .auth import ApiKeyInterceptor
from .config import ServerConfig
from .decoding import DecodingInterceptor
from .gateway.quirks import needs_keyless_listener
from ..contract.loopback import is_loopback
from .gen import moelink_v1_pb2_grpc
from .native import SERVICE_NAME as NATIVE_SERVICE, GenerationServicer
from .control import ControlServicer
from .serving import Serving
from .tls import check_server_tls
from .vllm_engine import SERVICE_NAME as VLLM_SERVICE, VllmEngineServicer
from .wire_bounds import channel_options

if TYPE_CHECKING:
    from ..core.metrics_server import BoundedMetricsServer

logger = logging.getLogger(__name__)

# How long a start waits for the grammar compiler to warm (the processes start while the weights load; a broken
# install must not keep a server from starting: past this it starts cold and says so).
GRAMMAR_WARM_TIMEOUT_S = 60.0

SERVICES = (NATIVE_SERVICE, VLLM_SERVICE)
CONTROL_SERVICE = "moelink.v1.Control"  # RL control calls: not in SERVICES (the health service reports generation)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_WATCH_INTERVAL_S = 0.2
_ABORT_WAIT_S = 5.0  # after aborting, how long handlers get to send their last message
# How long the engine thread gets to apply the aborts itself (one step) before the streams are ended
# from here: a hung rank can hold the engine inside a step for as long as the watchdogs allow.
_ENGINE_ABORT_WAIT_S = 1.0


def _registry(engine: AsyncEngine):
    """The Prometheus registry of the engine's metrics sink, None without one. A server's sink is an EngineMetrics
    (`serve` makes one; MoelinkServer asks for one), which owns it; the MetricsSink protocol does not name it."""
    return None if engine.metrics is None else engine.metrics.registry  # type: ignore[attr-defined]


class MoelinkServer:
    """One gRPC server in front of one AsyncEngine. Start, then `drain()` or `stop()` on the same loop."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        if config.metrics_port is not None and engine.metrics is None:
            # The engine takes its metrics sink when it is made; a server cannot add one afterwards.
            raise ValueError(f"metrics_port={config.metrics_port} needs an engine that exports metrics: make it "
                             "with AsyncEngine.from_engine_args(args, metrics=EngineMetrics()), or leave "
                             "metrics_port unset.")
        self.engine = engine
        self.config = config
        self.serving = Serving(engine, config)
        self.health = health.aio.HealthServicer()
        self.server: Optional[grpc.aio.Server] = None
        self.port: Optional[int] = None
        self._watchdog: Optional[asyncio.Task] = None
        self._stopped: Optional[asyncio.Event] = None
        self._draining_task: Optional[asyncio.Task] = None
        self._metrics_server: Optional[BoundedMetricsServer] = None
        self.metrics_port: Optional[int] = None
        self.gateway_server: Optional[grpc.aio.Server] = None
        self.gateway_port: Optional[int] = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        cfg = self.config
        self._stopped = asyncio.Event()
        options = channel_options(cfg, self.serving.max_prompt_bytes, self.serving.info.max_model_len,
                                  self._mm_bytes())
        interceptors = [ApiKeyInterceptor(cfg.api_key)] if cfg.api_key else []
        interceptors.append(self._decoding())
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        moelink_v1_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.serving), self.server)
        # RL control calls (engine/server/control.py): refused unless the engine takes them (--enable-weight-updates).
        moelink_v1_pb2_grpc.add_ControlServicer_to_server(ControlServicer(self.serving.engine), self.server)
        vllm_servicer = VllmEngineServicer(self.serving)
        vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(vllm_servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            SERVICES + (CONTROL_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                        reflection.SERVICE_NAME),
            self.server)
        try:
            if cfg.tls:
                # Checked when the config was made; again here, since the files may have changed while the
                # weights loaded: a TLS problem must not be reported as a bind failure.
                check_server_tls(cfg.tls_cert, cfg.tls_key)
                with open(cfg.tls_key, "rb") as f:
                    key = f.read()
                with open(cfg.tls_cert, "rb") as f:
                    cert = f.read()
                port = self.server.add_secure_port(cfg.address, grpc.ssl_server_credentials([(key, cert)]))
            else:
                port = self.server.add_insecure_port(cfg.address)
        except RuntimeError:  # grpc's way of saying the bind failed
            port = 0
        if not port:
            raise ValueError(f"port={cfg.port} is invalid: could not bind {cfg.address} (in use, or no such address).")
        self.port = port
        if cfg.gateway_port is not None:
            self._bind_gateway(vllm_servicer, options)
        await self.server.start()
        if self.gateway_server is not None:
            await self.gateway_server.start()
        for service in ("",) + SERVICES:
            await self.health.set(service, _SERVING)
        self._watchdog = asyncio.create_task(self._watch_engine())
        if cfg.metrics_port is not None:
            self._start_metrics()
        return port

    def _mm_bytes(self) -> int:
        """The wire budget of a request's preprocessed images (Serving.mm_bytes), at most --max-message-size."""
        return min(self.serving.mm_bytes, self.config.max_message_size)

    def _decoding(self) -> DecodingInterceptor:
        """The decoding and wire prechecks of a listener: built the same for both, so that what one takes the other
        does (the gateway's was built without the image budget: behind --api-key every image over ~52x52 was
        refused on it, issue 76 item 11)."""
        return DecodingInterceptor(self.config.limits, self.serving.text_refusal, self.serving.ids_refusal,
                                   self._mm_bytes())

    def _bind_gateway(self, vllm_servicer: VllmEngineServicer, options) -> None:
        """The gateway listener: VllmEngine and health, plaintext, no API key (see ServerConfig.gateway_port).

        The managed gateway connects to gRPC workers in plaintext and sends no credentials
        (gateway/quirks.py needs_keyless_listener), so behind --api-key or TLS it could not even probe the
        worker. It gets a port of its own instead, meant for loopback (a gateway in the same host or pod), while the main port keeps the key and TLS.
        It shares the engine, the queue limits and the health state with the main port.
        """
        cfg = self.config
        # The same decoding and wire prechecks as the main port (INVALID_ARGUMENT for corrupt bytes, large
        # requests refused before parsing, memory given back): behind the gateway this port takes all the traffic.
        self.gateway_server = grpc.aio.server(interceptors=[self._decoding()], options=options)
        vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(vllm_servicer, self.gateway_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.gateway_server)
        try:
            port = self.gateway_server.add_insecure_port(cfg.gateway_address)
        except RuntimeError:
            port = 0
        if not port:
            raise ValueError(f"gateway_port={cfg.gateway_port} is invalid: could not bind {cfg.gateway_address} "
                             f"(in use, or no such address).")
        self.gateway_port = port
        warning = gateway_exposure(cfg)
        if warning:
            logger.warning("--gateway-port %d %s", port, warning)

    def _start_metrics(self) -> None:
        from ..core.metrics import start_metrics_server

        # Bounded: a capped number of connections, each with a deadline (half-open ones cost no thread for long).
        self._metrics_server = start_metrics_server(_registry(self.engine), self.config.metrics_host,
                                                    self.config.metrics_port)
        self.metrics_port = self._metrics_server.server_port

    async def _watch_engine(self) -> None:
        """After the engine loop dies, say so: health NOT_SERVING everywhere, new requests UNAVAILABLE."""
        while self.engine.is_healthy:
            await asyncio.sleep(_WATCH_INTERVAL_S)
        reason = f"the engine is not running ({self.engine.dead_error}); retry on another replica."
        logger.error("engine died: %s", self.engine.dead_error)
        self.serving.registry.unavailable_reason = reason
        for service in ("",) + SERVICES:
            await self.health.set(service, _NOT_SERVING)

    async def drain(self, grace: Optional[float] = None) -> None:
        """Graceful shutdown (idempotent: a second call while draining stops at once)."""
        if self._draining_task is not None:
            logger.warning("second shutdown request: aborting what is still running")
            await self._abort_remaining()
            return
        self._draining_task = asyncio.current_task()
        grace = self.config.shutdown_grace if grace is None else grace
        reg = self.serving.registry
        reg.draining = True
        for service in SERVICES:
            await self.health.set(service, _NOT_SERVING)
        logger.info("draining: %d requests in flight, %.1f s grace", len(reg.active), grace)
        if not await reg.wait_idle(grace):
            await self._abort_remaining()
        await self.stop()

    async def _abort_remaining(self) -> None:
        reg = self.serving.registry
        if reg.active:
            logger.info("aborting %d requests still running", len(reg.active))
            await self.serving.abort_all()
            if not await reg.wait_idle(_ENGINE_ABORT_WAIT_S):
                ended = self.serving.end_all()
                logger.warning("the engine did not end %d requests within %.1f s (a step that does not end); "
                               "ended them with 'abort' here", ended, _ENGINE_ABORT_WAIT_S)
            await reg.wait_idle(_ABORT_WAIT_S)

    async def stop(self, grace: float = 1.0) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._metrics_server is not None:
            # close() waits for the accept loop's next tick (up to half a second): not on the event loop.
            metrics_server, self._metrics_server = self._metrics_server, None
            await asyncio.to_thread(metrics_server.close)
        servers = [srv for srv in (self.server, self.gateway_server) if srv is not None]
        if servers:
            await asyncio.gather(*(srv.stop(grace) for srv in servers))
        if self._stopped is not None:
            self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()


async def _serve(engine: AsyncEngine, config: ServerConfig, tokenizer_path: Optional[str] = None) -> None:
    if config.http_port is not None and config.gateway_port is None and needs_keyless_listener(config.api_key,
                                                                                                 config.tls):
        # The gateway dials workers in plaintext without a key: behind --api-key or TLS it needs the loopback
        # gateway listener (see _bind_gateway), so the managed gateway brings one.
        config = dataclasses.replace(config, gateway_port=0, gateway_host="127.0.0.1")
    if not isinstance(engine.tokenizer, NoTokenizer):
        # Before any port answers: a router's first constrained request must not wait for the compile processes to
        # start (grammar_compile.GrammarCompilerPool.warm).
        why = await asyncio.to_thread(engine.engine.grammars.warm, GRAMMAR_WARM_TIMEOUT_S)
        if why is not None:
            logger.warning("moelink: the grammar compiler did not warm up (%s): the first structured-output request "
                           "pays its start", why)
    server = MoelinkServer(engine, config)
    port = await server.start()
    sink = server.engine.metrics
    if isinstance(sink, EngineMetrics):  # vLLM's series beside moelink's (engine/core/vllm_metrics.py)
        server.serving.vllm_metrics = sink.attach_vllm(server.serving.served_model_name,
                                                       server.serving.info.max_model_len)
    gateway = None
    gateway_watch = None
    try:
        if config.http_port is not None:
            from .gateway.managed import start_managed_gateway
            from .gateway.health import GatewayCollector, watch_gateway

            registry = _registry(server.engine)
            gateway = await start_managed_gateway(config, port, server.gateway_port, server.serving.hung_up, registry,
                                                  server.serving)
            gateway_watch = asyncio.create_task(watch_gateway(gateway, server.health))  # the HTTP face's health
            if server.engine.metrics is not None:
                _registry(server.engine).register(GatewayCollector(gateway))
    except BaseException:
        await server.stop()
        raise
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.drain()))
    host = config.host
    scheme = "TLS" if config.tls else "plaintext"
    # Tests and scripts wait for this line (it carries the port when --port 0 picked one).
    # A vLLM user reads this line first: --port is gRPC here, the OpenAI API (vLLM's --port) is --http-port.
    http = (f"the OpenAI API (vLLM's --port) is --http-port {config.http_port}" if gateway is not None
            else "no OpenAI HTTP API (--no-http)")
    print(f"moelink: serving {server.serving.served_model_name!r} on {host}:{port} "
          f"(gRPC {scheme}, --port; {http}; services {', '.join(SERVICES)})", flush=True)
    if gateway is None:  # what a vLLM user must run by hand for the OpenAI API (vLLM's fields carried)
        from .gateway.front_cli import by_hand_commands
        from .gateway.managed import server_worker_url

        worker = server_worker_url(config, port, server.gateway_port)
        # The model's further names (served names, the model argument as given) as the gateway's aliases, as managed;
        # a prefill/decode server's (its kv_role) in the gateway's PD mode.
        hint = by_hand_commands(worker, config.gateway, server.serving.served_model_name, server.serving.model_aliases,
                                server.serving.info.kv_role, tokenizer_path or engine.info.model.model)
        print(f"moelink: OpenAI API by hand: {hint}", flush=True)
    if server.metrics_port is not None:
        print(f"moelink: metrics on http://{config.metrics_host}:{server.metrics_port}/metrics", flush=True)
    if server.gateway_port is not None:
        print(f"moelink: gateway listener on {config.gateway_host}:{server.gateway_port} "
              f"(gRPC plaintext, no API key; services {VLLM_SERVICE}, health)", flush=True)
    if server.serving.engine.info.load_format == "dummy":
        print(f"moelink: WARNING: {DUMMY_WARNING}", flush=True)
    if tokenizer_path:
        # Benchmark clients (aiperf, guidellm) need a tokenizer they can load offline: this path is one.
        print(f"moelink: tokenizer: {tokenizer_path}", flush=True)
    builtin_note = describe_builtin_model(tokenizer_path)  # None unless it is builtin-model/ (or a retrained copy)
    if builtin_note:
        print(f"moelink: {builtin_note}", flush=True)
    if gateway is not None:
        key = " (same API key)" if config.api_key else ""
        print(f"moelink: OpenAI API on http://{_url_host(config.http_host)}:{config.http_port}/v1{key} "
              f"({gateway.describe()})", flush=True)
    try:
        await server.wait_closed()
    finally:
        if gateway is not None:
            gateway_watch.cancel()
            # After the drain: in-flight HTTP requests finished through the gateway before it goes.
            await gateway.stop()
    print("moelink: server stopped", flush=True)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def gateway_exposure(cfg: ServerConfig) -> Optional[str]:
    """Why the gateway listener is more exposed than the main port, or None: it has no key or TLS, so beyond
    loopback it is open wherever the main port has a key or TLS, or is itself on loopback."""
    if is_loopback(cfg.gateway_host):
        return None
    if cfg.api_key or cfg.tls:
        guard = "without the API key or TLS of --port"
    elif is_loopback(cfg.host):
        guard = f"while --host {cfg.host} keeps the main port on loopback"
    else:
        return None
    return (f"listens on {cfg.gateway_host} {guard}: anything that reaches it can generate; keep it on loopback "
            "unless the network is private")


_STANDARD_RECORD_KEYS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


# `extra` fields cut longer than one client value: a request's output text (--enable-log-outputs, serving.py, already
# cut at --max-log-len there), bounded as a whole log message is.
_LONG_FIELDS = {"output": MAX_LOG_LINE_CHARS}


def _extras(record: logging.LogRecord) -> dict:
    # `extra` fields carry client values (request ids): escaped and cut, like every client value in a log.
    # A name with a leading underscore is no `extra` field but a library's own mark on every record (Ray's
    # log-record factory adds `_ray_timestamp_ns` to each one once it is imported): left out.
    return {k: shown(v, _LONG_FIELDS.get(k, MAX_SHOWN_CHARS), quote=False) if isinstance(v, str) else v
            for k, v in record.__dict__.items() if k not in _STANDARD_RECORD_KEYS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra` fields (request_id, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        doc = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": shown(record.getMessage(), MAX_LOG_LINE_CHARS, quote=False)}
        doc.update(_extras(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


_MAX_TRACEBACK_CHARS = 20_000
_MAX_TRACEBACK_LINES = 500  # a deep recursion's traceback, collapsed by `traceback`, stays under this


def _logfmt(value) -> str:
    """A field value as logfmt writes it: quoted when it has a space, '=', '"' or '\\' (or is empty), so
    request_id="x finish_reason=length" stays one field and cannot plant others after it."""
    text = value if isinstance(value, str) else str(value)
    if text and not any(c in text for c in ' ="\\'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _TextWithExtras(logging.Formatter):
    """One line per record, fields in logfmt after the message; a traceback follows indented, so no message,
    field or exception text can start a line of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = shown(super().formatMessage(record), MAX_LOG_LINE_CHARS, quote=False)
        extras = _extras(record)
        return line + ("".join(f" {k}={_logfmt(v)}" for k, v in extras.items()) if extras else "")

    def formatException(self, ei) -> str:
        return self._indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return self._indented(super().formatStack(stack_info))

    @staticmethod
    def _indented(text: str) -> str:
        # An exception's message can carry client values (newlines included): each line is escaped and
        # indented, and the whole is bounded like any other client value.
        if len(text) > _MAX_TRACEBACK_CHARS:
            text = f"{text[:_MAX_TRACEBACK_CHARS]}... ({len(text)} characters in all)"
        lines = text.split("\n")
        if len(lines) > _MAX_TRACEBACK_LINES:
            lines = lines[:_MAX_TRACEBACK_LINES] + [f"... ({len(lines)} lines in all)"]
        return "\n".join("  " + shown(line, MAX_LOG_LINE_CHARS, quote=False) for line in lines)


def configure_logging(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else _TextWithExtras("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def serve(engine_args, config: ServerConfig) -> int:
    """Load the engine, serve until SIGTERM/SIGINT, drain, exit. Blocking; returns an exit code."""
    if config.http_port is not None:
        from .gateway import supervisor as gateway

        # Said before any weights load: the gateway is not installed, or another server holds the port.
        gateway.check_can_start(config.http_host, config.http_port)
    configure_logging(config.log_format)
    metrics = None
    if config.metrics_port is not None or config.http_port is not None:  # the HTTP port serves /metrics too
        from ..core.metrics import EngineMetrics

        metrics = EngineMetrics()
    try:
        engine = AsyncEngine.from_engine_args(engine_args, metrics=metrics)
    except BaseException:
        from ..api.serving_executor import discard_forked_rank

        discard_forked_rank()
        raise
    # The directory the engine read: the one given, or a Hugging Face id's snapshot in the cache.
    tokenizer_path = (None if isinstance(engine.tokenizer, NoTokenizer)
                      else os.path.abspath(engine.info.model.model))
    if tokenizer_path is None:  # no grammar is ever compiled: the fork server forked at the start is not needed
        from ..core.grammar_forks import discard_prefork

        discard_prefork()
    try:
        asyncio.run(_serve(engine, config, tokenizer_path))
    finally:
        engine.shutdown()
    return 0

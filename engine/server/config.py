"""ServerConfig: every option of the gRPC front, validated where it is made."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .gateway.http_limits import HttpLimits
from .gateway.options import GatewayOptions, model_alias_refusal
from .limits import DEFAULT_MAX_MESSAGE_SIZE, RequestLimits
from .lora_names import LoRAModule
from .tls import check_server_tls



@dataclass
class ServerConfig:
    """Options of `moelink serve` that are not engine options (vLLM's names where the concept exists)."""

    host: str = "127.0.0.1"  # loopback by default: exposing a server is a decision
    port: int = 50051  # 0 = any free port (the bound one is printed and returned)
    # The names clients may send as "model" (vLLM's --served-model-name: a name or several); the first is the one
    # reported. None: the model argument as given (Serving adds its directory's name as a further alias).
    served_model_name: Union[str, Sequence[str], None] = None
    max_queued_requests: Optional[int] = None  # admitted requests still waiting for their first token
    max_queued_tokens: Optional[int] = None  # their prompt tokens
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    api_key: Optional[str] = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    metrics_port: Optional[int] = None  # Prometheus /metrics over HTTP; None = off
    metrics_host: str = "127.0.0.1"
    # A second listener for a gateway beside the server (gateway/quirks.py needs_keyless_listener):
    # plaintext, no API key, VllmEngine and health only. None = off.
    gateway_port: Optional[int] = None
    gateway_host: str = "127.0.0.1"
    # The managed OpenAI HTTP gateway (supervised by the server; engine/server/gateway/). None = off.
    # The CLI defaults it to 8000 like `vllm serve`; the dataclass defaults it off so that embedding a
    # server never spawns a process nobody asked for.
    http_port: Optional[int] = None
    http_host: str = "127.0.0.1"
    http_metrics_port: Optional[int] = None  # the managed gateway's Prometheus port; None = a free loopback port
    # The managed gateway's own HTTP port, behind the front on --http-port: always on loopback (only the front reaches
    # it); None = a free loopback port.
    http_upstream_port: Optional[int] = None
    http_metrics_host: str = "127.0.0.1"
    log_format: str = "text"  # "text" or "json" (one JSON object per line, with request ids)
    limits: RequestLimits = field(default_factory=RequestLimits)  # per-request caps (docs/serving.md: bad input)
    # What the managed gateway (or the commands printed for one started by hand) is asked for beyond serving the
    # worker: vLLM's --tool-call-parser / --reasoning-parser / --chat-template (engine/server/gateway/options.py).
    gateway: GatewayOptions = field(default_factory=GatewayOptions)
    # What the OpenAI HTTP front grants a client connection: the connection cap, the head, body and stall timeouts,
    # the body caps of its routes (engine/server/gateway/http_limits.py; the --http-... flags).
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    # LoRA adapters served by name from the start (vLLM's --lora-modules; the engine needs enable_lora): checked
    # against the checkpoint when the server is made (engine/server/lora_names.py).
    lora_modules: tuple[LoRAModule, ...] = ()
    # vLLM's --return-tokens-as-token-ids: the logprobs' tokens of /v1/completions as `token_id:N`
    # (gateway/completions_answer.token_text; a request's return_tokens_as_token_ids wins).
    return_tokens_as_token_ids: bool = False
    # vLLM's --enable-log-outputs: each "request finished" line carries the output text (serving.py), at most
    # max_log_len characters of it (vLLM's --max-log-len; None: all of it, up to the log line's own bound).
    enable_log_outputs: bool = False
    max_log_len: Optional[int] = None

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str):
            raise ValueError(f"{field}={getattr(self, field)!r} is invalid: {allowed}.")

        if not isinstance(self.host, str) or not self.host:
            bad("host", "give an address to bind, e.g. 127.0.0.1 or 0.0.0.0")
        if not _is_int(self.port) or not 0 <= self.port <= 65535:
            bad("port", "must be an integer in [0, 65535] (0 picks a free port)")
        for name in ("max_queued_requests", "max_queued_tokens"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                bad(name, "must be a positive integer (or unset for no limit)")
        if not isinstance(self.shutdown_grace, (int, float)) or not math.isfinite(self.shutdown_grace) or self.shutdown_grace < 0:
            bad("shutdown_grace", "must be a number of seconds >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            bad("tls_cert" if self.tls_cert is None else "tls_key", "TLS needs both --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key"):
            v = getattr(self, name)
            if v is not None and not os.path.isfile(v):
                bad(name, "no such file")
        if self.tls_cert is not None:
            # Readable, PEM, and a key that belongs to the certificate: found here, before any weights load.
            check_server_tls(self.tls_cert, self.tls_key)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            bad("api_key", "must be a non-empty string")
        if not _is_int(self.max_message_size) or self.max_message_size < 1024:
            bad("max_message_size", "must be an integer number of bytes >= 1024")
        if self.metrics_port is not None and (not _is_int(self.metrics_port) or not 0 <= self.metrics_port <= 65535):
            bad("metrics_port", "must be an integer in [0, 65535] (or unset for no metrics)")
        if self.metrics_port is not None and self.metrics_port == self.port and self.port != 0:
            bad("metrics_port", "must differ from --port")
        if self.gateway_port is not None:
            if not _is_int(self.gateway_port) or not 0 <= self.gateway_port <= 65535:
                bad("gateway_port", "must be an integer in [0, 65535] (or unset for no gateway listener)")
            if self.gateway_port != 0 and self.gateway_port in (self.port, self.metrics_port):
                bad("gateway_port", "must differ from --port and --metrics-port")
        if not isinstance(self.gateway_host, str) or not self.gateway_host:
            bad("gateway_host", "give an address to bind, e.g. 127.0.0.1")
        self._check_http(bad)
        if self.log_format not in ("text", "json"):
            bad("log_format", "choose 'text' or 'json'")
        if not isinstance(self.limits, RequestLimits):
            bad("limits", "must be a RequestLimits")
        if not isinstance(self.gateway, GatewayOptions):
            bad("gateway", "must be a GatewayOptions")
        if not isinstance(self.http_limits, HttpLimits):
            bad("http_limits", "must be an HttpLimits")
        self._check_names(bad)
        if not isinstance(self.lora_modules, tuple) or not all(isinstance(m, LoRAModule) for m in self.lora_modules):
            bad("lora_modules", "must be a tuple of LoRAModule (--lora-modules name=path ...)")
        for name in ("return_tokens_as_token_ids", "enable_log_outputs"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        if self.max_log_len is not None and (not _is_int(self.max_log_len) or self.max_log_len < 0):
            bad("max_log_len", "must be an integer >= 0 (characters of a logged output) or unset")
        names = [m.name for m in self.lora_modules]
        if len(set(names)) != len(names):
            bad("lora_modules", f"names an adapter twice ({sorted(n for n in names if names.count(n) > 1)[0]!r})")

    def _check_names(self, bad) -> None:
        names = self.served_model_name
        if names is None:
            return
        names = (names,) if isinstance(names, str) else tuple(names) if isinstance(names, (list, tuple)) else None
        if not names:
            bad("served_model_name", "give a name, or a list of names (the first is the one reported)")
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name or name != name.strip():
                bad("served_model_name", "each name must be a non-empty string without leading or trailing spaces")
            why = model_alias_refusal(name) if i else None  # the gateway is given each further name as an alias
            if why is not None:
                bad("served_model_name", f"a further name ({name!r}) {why}; only the first name may")
        names = tuple(dict.fromkeys(names))  # a name given twice is one name
        self.served_model_name = names[0] if len(names) == 1 else names

    @property
    def served_model_names(self) -> tuple[str, ...]:
        """The names given (--served-model-name), the first reported; () when none was given."""
        names = self.served_model_name
        return () if names is None else (names,) if isinstance(names, str) else tuple(names)

    def _check_http(self, bad) -> None:
        if self.http_port is not None:
            # The gateway takes no port 0, and the port is the one users type into their clients: ask for a real one.
            if not _is_int(self.http_port) or not 1 <= self.http_port <= 65535:
                bad("http_port", "must be an integer in [1, 65535] (or --no-http for gRPC only)")
            taken = {"--port": self.port, "--metrics-port": self.metrics_port, "--gateway-port": self.gateway_port,
                     "--http-metrics-port": self.http_metrics_port, "--http-upstream-port": self.http_upstream_port}
            for flag, v in taken.items():
                if v == self.http_port:
                    bad("http_port", f"must differ from {flag} ({v})")
        if self.http_upstream_port is not None:
            if not _is_int(self.http_upstream_port) or not 1 <= self.http_upstream_port <= 65535:
                bad("http_upstream_port", "must be an integer in [1, 65535] (or unset for a free loopback port)")
            for flag, v in {"--port": self.port, "--metrics-port": self.metrics_port, "--gateway-port": self.gateway_port,
                            "--http-metrics-port": self.http_metrics_port}.items():
                if v == self.http_upstream_port:
                    bad("http_upstream_port", f"must differ from {flag} ({v})")
        if self.http_metrics_port is not None:
            if not _is_int(self.http_metrics_port) or not 1 <= self.http_metrics_port <= 65535:
                bad("http_metrics_port", "must be an integer in [1, 65535] (or unset for a free loopback port)")
            for flag, v in {"--port": self.port, "--metrics-port": self.metrics_port,
                            "--gateway-port": self.gateway_port}.items():
                if v == self.http_metrics_port:
                    bad("http_metrics_port", f"must differ from {flag} ({v})")
        for name in ("http_host", "http_metrics_host"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                bad(name, "give an address to bind, e.g. 127.0.0.1 or 0.0.0.0")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def gateway_address(self) -> str:
        host = self.gateway_host
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{host}:{self.gateway_port}"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

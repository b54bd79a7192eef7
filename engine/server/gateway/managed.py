"""The managed gateway of a bound `moelink serve` (supervisor.py keeps smg's process): the address smg dials for the
server's worker, the HTTP front with the routes answered beside the engine (vLLM's model and tokenizer routes, the RL
control routes, SGLang's /generate), and the supervised smg behind it.
"""
from __future__ import annotations

import logging
import os
from typing import Awaitable, Callable, Optional

from ...contract.loopback import is_loopback
from .health import engine_down
from .http_front import HttpFront
from .http_metrics import HttpMetrics
from .options import GatewayOptions
from .supervisor import GatewayError, GatewaySpec, GatewaySupervisor, free_loopback_port

logger = logging.getLogger(__name__)


def worker_url(host: str, port: int) -> str:
    """The address smg dials for a listener bound on `host`: a wildcard bind is reached on loopback."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"grpc://{host}:{port}"


def server_worker_url(config, grpc_port: int, gateway_listener_port: Optional[int]) -> str:
    """The worker address a gateway dials for a bound server (ServerConfig `config`): its keyless gateway listener
    when there is one (smg sends workers no key and no TLS), else its main port."""
    if gateway_listener_port is not None:
        return worker_url(config.gateway_host, gateway_listener_port)
    return worker_url(config.host, grpc_port)


async def start_managed_gateway(config, grpc_port: int, gateway_listener_port: Optional[int],
                                on_hangup: Optional[Callable[[str], Awaitable[object]]] = None,
                                registry=None, serving=None) -> GatewaySupervisor:
    """The supervised smg for a bound server (ServerConfig `config`): in front of the keyless gateway
    listener when there is one (smg sends workers no key and no TLS), else of the main port. `on_hangup(relay_id)`:
    the front lost an HTTP client before its answer ended (Serving.hung_up). `registry`: the engine's Prometheus
    registry, served with smg's own metrics on the HTTP port's /metrics (http_metrics.py). `serving`: the
    server's Serving: its model names reach smg (aliases of the first), and the front answers vLLM's /v1/models,
    /tokenize and /detokenize from it (vllm_routes.py)."""
    options: GatewayOptions = config.gateway
    target = server_worker_url(config, grpc_port, gateway_listener_port)
    # smg listens on a loopback port of its own (--http-upstream-port, else a free one); --http-port is the front's
    # (http_front.py), which carries the request fields smg would drop.
    upstream = config.http_upstream_port or free_loopback_port()
    spec = GatewaySpec(http_host="127.0.0.1", http_port=upstream, worker_url=target,
                       metrics_host=config.http_metrics_host, metrics_port=config.http_metrics_port,
                       api_key=config.api_key, extra_args=list(options.args()),
                       served_model_name=getattr(serving, "served_model_name", None),
                       model_aliases=tuple(getattr(serving, "model_aliases", ())))
    if not config.api_key and not is_loopback(config.http_host):
        logger.warning("--http-host %s: the OpenAI API on port %d takes requests from anyone who reaches it "
                       "(no --api-key)", config.http_host, config.http_port)
    gateway = None
    local = completions = chat = None
    if serving is not None:
        from .chat_route import ChatRoute
        from .completions_route import CompletionsRoute
        from .generate_route import GenerateRoute
        from .rl_routes import ChainedRoutes, RlRoutes
        from .vllm_routes import VllmRoutes

        template = chat_template_of(options)
        from .sglang_routes import SglangRoutes

        # SGLang's info, load, /health_generate and LoRA-name routes (slime, verl, AReaL) after the others; an
        # update's abort_all_requests ends every request as /abort_request's abort_all does.
        local = ChainedRoutes(VllmRoutes(serving, template),
                              RlRoutes(serving.engine, serving.engine.takes_control_calls,
                                       serving.limits.max_http_body_bytes, abort_all=serving.abort_all),
                              GenerateRoute(serving), *vllm_rl_answerers(serving), SglangRoutes(serving))
        completions = CompletionsRoute(serving, config.return_tokens_as_token_ids)
        # A reasoning parser is smg's: every chat goes there while one is set (chat_route.py).
        chat = ChatRoute(serving, template, relay_all=options.reasoning_parser is not None,
                         tokens_as_ids=config.return_tokens_as_token_ids)
    front = HttpFront(config.http_host, config.http_port, spec.http_port, config.api_key,
                      not_serving=lambda: gateway.not_serving() if gateway is not None else None,
                      on_hangup=on_hangup,
                      metrics=HttpMetrics(registry, lambda: gateway.metrics_port if gateway is not None else None).body,
                      local=local, engine_down=engine_down(serving.engine) if serving is not None else None,
                      completions=completions, chat=chat, limits=getattr(config, "http_limits", None))
    try:
        await front.start()
    except OSError as e:
        raise GatewayError(f"--http-port {config.http_port}: cannot listen on {config.http_host} ({e.strerror or e})"
                           ) from None
    # smg's own log goes where MOELINK_GATEWAY_LOG says (a file), else nowhere: its startup chatter is noise
    # next to the server's; readiness failures are reported by the supervisor either way.
    gateway = GatewaySupervisor(spec, log_path=os.environ.get("MOELINK_GATEWAY_LOG"), front=front)
    try:
        await gateway.start()
    except BaseException:
        await gateway.stop()
        raise
    return gateway


def vllm_rl_answerers(serving) -> tuple:
    """vLLM's weight-transfer routes and its token-in/token-out generate (SkyRL's, prime-rl's): vllm_rl_routes.py,
    vllm_token_generate.py."""
    from .vllm_rl_routes import VllmRlRoutes
    from .vllm_token_generate import TokenGenerateRoute

    return VllmRlRoutes(serving), TokenGenerateRoute(serving)


def chat_template_of(options: GatewayOptions) -> Optional[str]:
    """The text of the chat template file smg is given (options.chat_template), or None."""
    if options.chat_template is None:
        return None
    from .chat_template import read_chat_template

    return read_chat_template(options.chat_template)


__all__ = ["chat_template_of", "is_loopback", "server_worker_url", "start_managed_gateway", "worker_url"]

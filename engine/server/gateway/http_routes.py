"""The routes of the OpenAI front (http_front.py): which paths clients reach, which ask the key, which are answered
beside the engine, and how large a body each may send (http_limits.HttpLimits)."""
from __future__ import annotations

from typing import Optional

import h11

from .generate_route import PATHS as GENERATE_PATHS
from .http_limits import HttpLimits
from .http_wire import error_body
from .openai_fields import CHAT_PATH, COMPLETIONS_PATH
from .rl_routes import PATHS as RL_PATHS
from .sglang_routes import PATHS as SGLANG_PATHS
from .vllm_rl_routes import PATHS as VLLM_RL_PATHS
from .vllm_token_generate import PATHS as TOKEN_GENERATE_PATHS

# The body cap of a request that has none to give (GET, DELETE, the probes, /version, /v1/models): a client may
# send `{}`, nothing that needs more.
SMALL_BODY_BYTES = 64 << 10
# What clients reach through the front: the OpenAI API (each route and what lies under it, e.g.
# /v1/models/ID) and the probes. smg's control plane (/workers, /flush_cache, /get_loads, profiling, /wasm,
# /parse, /v1/rl) is not among them.
# vLLM's own routes beside them: /tokenize, /detokenize (answered from the engine, vllm_routes.py), /version and
# /ping (answered here).
PUBLIC_ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/conversations",
                 "/v1/messages", "/v1/embeddings", "/v1/rerank", "/v1/classify", "/v1/tokenize", "/v1/detokenize",
                 "/v1beta/interactions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/health",
                 "/health_generate", "/liveness", "/readiness", "/tokenize", "/detokenize", "/version",
                 "/ping") + GENERATE_PATHS + RL_PATHS + VLLM_RL_PATHS + TOKEN_GENERATE_PATHS
PROBES = ("/health", "/health_generate", "/readiness", "/ping")
LIVENESS_PATH = "/liveness"  # 503 only once the engine died (health.py engine_down), not while smg restarts
VERSION_PATH = "/version"
PING_PATH = "/ping"  # vLLM's (SageMaker's) probe, GET or POST: /health
HEALTH_PATHS = ("/health", PING_PATH)  # answered here as vLLM answers them: 200, an empty body
# Answered only where the engine is beside the front: vLLM's tokenizer routes, and the RL control routes
# (rl_routes.py: never relayed, smg's own /flush_cache is its control plane's).
ENGINE_ROUTES = ("/tokenize", "/detokenize") + GENERATE_PATHS + RL_PATHS + VLLM_RL_PATHS + TOKEN_GENERATE_PATHS
# Routes outside /v1 that still ask the API key: the RL control routes, SGLang's /generate (a data route) and
# /abort_request, vLLM's weight-transfer routes and token-in/token-out generate (SkyRL's, prime-rl's).
KEYED_ROUTES = GENERATE_PATHS + RL_PATHS + VLLM_RL_PATHS + TOKEN_GENERATE_PATHS
# SGLang's info, load and LoRA-name routes (sglang_routes.py: slime's, verl's, AReaL's calls): answered beside the
# engine, with the key (/health_generate, already a probe above, is answered there too, without it).
PUBLIC_ROUTES += SGLANG_PATHS
ENGINE_ROUTES += SGLANG_PATHS
KEYED_ROUTES += SGLANG_PATHS
METRICS_PATH = b"/metrics"
# The LoRA load and unload routes (vLLM's, SGLang's names, SkyRL's) take an adapter's name and directory, a few
# hundred bytes: SMALL_BODY_BYTES. They took the relay cap (64 MiB), and their JSON is parsed on the event loop: a
# 60 MB body held every stream 5.5 s (issue 95's round on the issue 97 routes).
LORA_BODY_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/load_lora_adapter", "/unload_lora_adapter",
                   "/skyrl/v1/load_lora_adapter")
# vLLM's routes whose JSON this process parses, and smg's tokenizer routes: --max-http-openai-body-bytes.
OPENAI_BODY_PATHS = (COMPLETIONS_PATH, CHAT_PATH, "/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize")


def body_limit(request: h11.Request, limits: HttpLimits, local) -> tuple[int, str]:
    """The most body bytes read for `request`, and the flag that sets it (named in the 413): a route answered
    from the engine bounds its own (the /generate and RL routes: --max-http-body-bytes), vLLM's routes whose
    JSON this process parses --max-http-openai-body-bytes, a request that has no body to give SMALL_BODY_BYTES,
    every other relayed one --max-http-relay-body-bytes; a LoRA load or unload (LORA_BODY_PATHS) SMALL_BODY_BYTES."""
    limit = getattr(local, "body_limit", None)
    path = public_path(request.target)
    if path in LORA_BODY_PATHS:
        return SMALL_BODY_BYTES, "the most a LoRA load or unload may send: its adapter's name and path"
    most = limit(path) if limit is not None and path is not None else None
    if most is not None:
        return most, "--max-http-body-bytes"
    if path in OPENAI_BODY_PATHS:
        return limits.max_openai_body_bytes, HttpLimits.flag_of("max_openai_body_bytes")
    if (path is None or request.method in (b"GET", b"HEAD", b"DELETE") or path in PROBES
            or path in (LIVENESS_PATH, VERSION_PATH) or path.startswith("/v1/models")):
        return SMALL_BODY_BYTES, "the most a request without a body may send"
    return limits.max_relay_body_bytes, HttpLimits.flag_of("max_relay_body_bytes")


def no_engine_body(path: str) -> bytes:
    """The 404 of an engine route on a front before a gateway started by hand (`moelink http-front`)."""
    if path in RL_PATHS or path in GENERATE_PATHS or path in VLLM_RL_PATHS or path in TOKEN_GENERATE_PATHS:
        return error_body(f"{path} is answered by `moelink serve`'s own HTTP front, beside the engine; this front "
                          "(`moelink http-front`) stands before a gateway started by hand: call the server's gRPC "
                          "Control service (the native Generation service for /generate and /abort_request).", None,
                          404)
    return error_body(f"{path} is answered by `moelink serve`'s own OpenAI front, which has the tokenizer; this front "
                      f"(`moelink http-front`) stands before a gateway started by hand: ask smg's /v1{path} instead.",
                      None, 404)


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


__all__ = ["ENGINE_ROUTES", "HEALTH_PATHS", "KEYED_ROUTES", "LIVENESS_PATH", "LORA_BODY_PATHS", "METRICS_PATH",
           "OPENAI_BODY_PATHS", "PING_PATH", "PROBES", "PUBLIC_ROUTES", "SMALL_BODY_BYTES", "VERSION_PATH",
           "body_limit", "no_engine_body", "public_path"]

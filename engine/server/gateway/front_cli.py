"""`moelink http-front`: the managed gateway's HTTP front (http_front.py) in front of an smg gateway started by hand.

`moelink serve --http-port` puts its front before the smg it manages, and the front is what carries vLLM's
structured-output fields (guided_choice, guided_json, guided_regex, structured_outputs: smg 1.13 drops them) and
refuses what smg would drop (completions' logprobs, logit_bias) with HTTP 400 naming the field. A gateway started
by hand (prefill/decode pools behind smg's PD mode, smg on another host's flags) has no such front: this command
is it. smg listens on a loopback port; clients reach this one:

    smg launch --pd-disaggregation --prefill grpc://... --decode grpc://... --host 127.0.0.1 --port 8001 ...
    moelink http-front --port 8000 --upstream-port 8001 [--upstream-metrics-port 29000]

Without the server beside it, an HTTP client that hangs up is not reported to an engine (smg does not end the
request itself: it runs to its end), GET /metrics answers smg's metrics only (each server's own are on its
--metrics-port), and vLLM's /tokenize and /detokenize are 404 (no tokenizer here: smg's /v1/tokenize answers);
/version and /ping are answered, and /v1/models is smg's. A server's further model names reach smg only as the
`--model-alias NAME=FIRST` flags `moelink serve --no-http` prints.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
from typing import Optional, Sequence

from .http_front import HttpFront
from .http_limits import add_http_limit_args, http_limits_from
from .http_metrics import HttpMetrics
from .options import GatewayOptions, alias_args


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("http-front", help="the OpenAI HTTP front (vLLM's structured-output fields carried, "
                                                 "dropped fields refused) before an smg gateway started by hand")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="the OpenAI API's port clients call (default %(default)s)")
    p.add_argument("--upstream-port", type=int, required=True,
                   help="the port of the smg gateway on this host's loopback (its `smg launch --port`)")
    p.add_argument("--upstream-metrics-port", type=int, default=None,
                   help="smg's --prometheus-port: GET /metrics answers its metrics (default: /metrics is 404)")
    p.add_argument("--api-key", default=os.environ.get("MOELINK_API_KEY"),
                   help="smg's --api-key, if it has one: the front asks it of every /v1 path (401 without it; "
                        "the probes and /metrics stay open) (default: $MOELINK_API_KEY)")
    add_http_limit_args(p)  # the connection cap, timeouts and body caps, as `moelink serve` takes them
    p.set_defaults(func=_run)


def _run(ns: argparse.Namespace) -> int:
    for name in ("port", "upstream_port"):
        value = getattr(ns, name)
        if not 1 <= value <= 65535:
            raise ValueError(f"--{name.replace('_', '-')}={value} is invalid: must be a port in [1, 65535].")
    if ns.port == ns.upstream_port:
        raise ValueError(f"--port={ns.port} is invalid: must differ from --upstream-port (smg's own port).")
    ns.http_limits = http_limits_from(ns)  # a bad value refused here, before the port is taken
    asyncio.run(_serve(ns))
    return 0


async def _serve(ns: argparse.Namespace) -> None:
    metrics = None
    if ns.upstream_metrics_port is not None:
        metrics = HttpMetrics(None, lambda: ns.upstream_metrics_port).body
    front = HttpFront(ns.host, ns.port, ns.upstream_port, ns.api_key, metrics=metrics,
                      limits=getattr(ns, "http_limits", None))
    try:
        await front.start()
    except OSError as e:
        raise ValueError(f"--port {ns.port}: cannot listen on {ns.host} ({e.strerror or e})") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"moelink: OpenAI API front on http://{ns.host}:{ns.port}/v1 before the smg gateway on "
          f"127.0.0.1:{ns.upstream_port}", flush=True)
    await stop.wait()
    await front.stop()
    print("moelink: front stopped", flush=True)


def hand_gateway_commands(worker: str, gateway_args: tuple[str, ...] = (), smg_port: int = 8001,
                          http_port: int = 8000, metrics_port: int = 29000) -> str:
    """The two commands that serve the OpenAI API before `worker` (grpc://HOST:PORT) by hand, as the managed
    gateway would: smg on a loopback port, its metrics on loopback too (smg's default is 0.0.0.0:29000), this
    front on the public one, serving /metrics from both."""
    extra = f" {shlex.join(gateway_args)}" if gateway_args else ""
    return (f"smg launch --host 127.0.0.1 --port {smg_port} --worker-urls {worker} --prometheus-host 127.0.0.1 "
            f"--prometheus-port {metrics_port}{extra} & "
            f"moelink http-front --port {http_port} --upstream-port {smg_port} --upstream-metrics-port {metrics_port}")


PD_ROLES = {"kv_producer": "prefill", "kv_consumer": "decode"}  # a server's kv_role -> its side of a PD pair
PD_PEER = {"prefill": "grpc://DECODE_HOST:DECODE_PORT", "decode": "grpc://PREFILL_HOST:PREFILL_PORT"}


def hand_pd_gateway_commands(role: str, worker: str, model_path: str, gateway_args: tuple[str, ...] = (),
                             smg_port: int = 8001, http_port: int = 8000, metrics_port: int = 29000) -> str:
    """The two commands that serve the OpenAI API before a prefill/decode pair (docs/disaggregation.md), as a
    server of `role` ("prefill" or "decode", at `worker`, grpc://HOST:PORT) prints them: smg's PD mode on a
    loopback port with this server on its side and a placeholder for the other's address, and this front on the
    public one. smg's PD mode reads the tokenizer from `model_path` (--model-path)."""
    if role not in PD_PEER:
        raise ValueError(f"role={role!r} is invalid: a prefill/decode pair's server is 'prefill' or 'decode'.")
    prefill, decode = (worker, PD_PEER[role]) if role == "prefill" else (PD_PEER[role], worker)
    extra = f" {shlex.join(gateway_args)}" if gateway_args else ""
    return (f"smg launch --pd-disaggregation --prefill {prefill} --decode {decode} "
            f"--model-path {shlex.quote(model_path)} --host 127.0.0.1 --port {smg_port} --prometheus-host 127.0.0.1 "
            f"--prometheus-port {metrics_port}{extra} & "
            f"moelink http-front --port {http_port} --upstream-port {smg_port} --upstream-metrics-port {metrics_port}")


def by_hand_commands(worker: str, options: GatewayOptions, served_model_name: Optional[str],
                     model_aliases: Sequence[str], kv_role: Optional[str], model_path: str) -> str:
    """What a server started without the managed gateway (`--no-http`, at `worker`, grpc://HOST:PORT) prints for
    the OpenAI API by hand, as the managed gateway would serve it: the model's further names as aliases of the first
    (`served_model_name`), `options`; a server of a prefill/decode pair (`kv_role`) in smg's PD mode, which reads
    the tokenizer from `model_path`."""
    extra = (*alias_args(served_model_name, model_aliases), *options.args())
    pd_role = PD_ROLES.get(kv_role) if kv_role is not None else None
    if pd_role is None:
        return hand_gateway_commands(worker, extra)
    return hand_pd_gateway_commands(pd_role, worker, model_path, extra)

"""`moelink serve` (the gRPC server) and `moelink stats` (expert-load counts of a running one)."""
from __future__ import annotations

import argparse
import os

from ..api.cli_args import add_engine_args, engine_args_from
from ..api.vllm_flag_table import row
from .config import DEFAULT_MAX_MESSAGE_SIZE, ServerConfig
from .lora_names import LoRAModule, parse_lora_module
from .limits import add_limit_args, limits_from
from ..api.kv_args import add_role_args, role_from_args
from ..api.vllm_flags import OneValue, RequestLogFilter, add_refused_flags, add_vllm_server_flags
from ..api.vllm_kv_config import apply_kv_transfer_config
from .gateway.chat_template import check_chat_template
from .gateway.http_limits import add_http_limit_args, http_limits_from
from .gateway.options import add_gateway_flags, gateway_options


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=50051,
                   help="moelink's gRPC port (NOT vLLM's HTTP port: the OpenAI API is --http-port, default 8000); "
                        "0 picks a free one (printed at start)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model names clients may send, the first reported (as vLLM; default: the model argument "
                        "as given, a Hugging Face id or a path; a directory's own name is accepted too)")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="refuse (RESOURCE_EXHAUSTED) beyond this many sequences waiting for their first token "
                        "(a request with n samples counts n; an empty queue admits one request of any n)")
    p.add_argument("--max-queued-tokens", "--max-num-queued-tokens", type=int, default=None,
                   help="refuse (RESOURCE_EXHAUSTED) beyond this many prompt tokens waiting for their first token")
    p.add_argument("--shutdown-grace", "--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM; the rest end with 'abort'")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--api-key", action=OneValue, default=os.environ.get("MOELINK_API_KEY"), metavar="KEY",
                   help="require metadata 'authorization: Bearer KEY' (default: $MOELINK_API_KEY)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics over HTTP on this port (default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default loopback)")
    p.add_argument("--gateway-port", type=int, default=None,
                   help="also serve vllm.grpc.engine.VllmEngine and health on this port in plaintext and WITHOUT "
                        "the API key, for an OpenAI HTTP gateway on the same host that sends workers no key and no "
                        "TLS; 0 picks a free one (default: off)")
    p.add_argument("--gateway-host", default="127.0.0.1",
                   help="address of --gateway-port (default loopback: only this host can reach it)")
    http = p.add_mutually_exclusive_group()
    http.add_argument("--http-port", type=int, default=8000,
                      help="serve the OpenAI API over HTTP on this port through the managed OpenAI HTTP gateway, "
                           "started, restarted and stopped with the server (default: %(default)s, like `vllm serve`)")
    http.add_argument("--no-http", "--grpc", action="store_true",
                      help="no HTTP gateway: serve gRPC only (--grpc: vLLM's name, its gRPC server on --port)")
    p.add_argument("--http-host", default="127.0.0.1",
                   help="address of --http-port (default loopback; 0.0.0.0 for all)")
    p.add_argument("--http-metrics-port", type=int, default=None,
                   help="the gateway's Prometheus port (default: a free port; always on --http-metrics-host)")
    p.add_argument("--http-metrics-host", default="127.0.0.1",
                   help="address of the gateway's Prometheus port (default loopback)")
    p.add_argument("--http-upstream-port", type=int, default=None,
                   help="the managed gateway's own HTTP port behind the front on --http-port, always on 127.0.0.1 "
                        "(default: a free loopback port)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: one object per line with request ids, for log pipelines")
    p.add_argument("--max-message-size", type=int, default=DEFAULT_MAX_MESSAGE_SIZE,
                   help="largest gRPC message, in bytes, received or sent")
    p.add_argument("--lora-modules", nargs="+", action="extend", type=_lora_module, default=[], metavar="NAME=PATH",
                   help=row("--lora-modules").says)
    add_limit_args(p)
    add_http_limit_args(p)  # the OpenAI front's connection cap, timeouts and body caps (gateway/http_limits.py)
    add_role_args(p)


def _lora_module(text: str) -> LoRAModule:
    try:
        return parse_lora_module(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def server_config_from(ns: argparse.Namespace) -> ServerConfig:
    log_outputs = getattr(ns, "enable_log_outputs", False)
    if log_outputs and getattr(ns, "disable_log_requests", False):
        # vLLM's rule: the outputs are logged on the request lines, which --disable-log-requests drops.
        raise ValueError("--enable-log-outputs needs the request log lines: leave out --disable-log-requests.")
    return ServerConfig(host=ns.host, port=ns.port, served_model_name=ns.served_model_name,
                        max_queued_requests=ns.max_queued_requests, max_queued_tokens=ns.max_queued_tokens,
                        shutdown_grace=ns.shutdown_grace, tls_cert=ns.tls_cert, tls_key=ns.tls_key,
                        api_key=ns.api_key, max_message_size=ns.max_message_size,
                        metrics_port=ns.metrics_port, metrics_host=ns.metrics_host, log_format=ns.log_format,
                        gateway_port=ns.gateway_port, gateway_host=ns.gateway_host,
                        http_port=None if ns.no_http else ns.http_port, http_host=ns.http_host,
                        http_metrics_port=ns.http_metrics_port, http_metrics_host=ns.http_metrics_host,
                        http_upstream_port=ns.http_upstream_port,
                        limits=limits_from(ns), gateway=gateway_options(ns), http_limits=http_limits_from(ns),
                        lora_modules=tuple(ns.lora_modules),
                        return_tokens_as_token_ids=getattr(ns, "return_tokens_as_token_ids", False),
                        enable_log_outputs=log_outputs, max_log_len=getattr(ns, "max_log_len", None))


def _serve(ns: argparse.Namespace) -> int:
    apply_kv_transfer_config(ns)  # vLLM's --kv-transfer-config onto --role and the --kv-* flags
    check_chat_template(ns.chat_template)  # the gateway reads it at its start: a bad one must stop us before the weights
    config = server_config_from(ns)  # validate server flags before loading any weights
    if config.lora_modules and not ns.enable_lora:
        raise ValueError(f"lora_modules={[m.name for m in config.lora_modules]!r} needs --enable-lora: the engine "
                         "serves adapters only when started with it.")
    args = engine_args_from(ns)
    if ns.cpu_reserved_cores is None:  # a server leaves a core to its front, gateway and streams (EngineArgs)
        args.cpu_reserved_cores = 1
    if getattr(ns, "uvicorn_log_level", None) is not None:  # vLLM's HTTP server's level: the HTTP front's lines here
        import logging

        from ..api.vllm_flags import UVICORN_LEVELS

        logging.getLogger(__package__ + ".gateway").setLevel(UVICORN_LEVELS[ns.uvicorn_log_level])
    if ns.disable_log_requests:
        from .serving import logger as request_logger

        request_logger.addFilter(RequestLogFilter())
    # Every rank serves KV on its own port: the world is expert_parallel_size, or one TP group when that is 1.
    role = role_from_args(ns, num_ranks=max(args.expert_parallel_size, args.tensor_parallel_size))
    # At one rank the engine's rank runs in a process of its own (engine/api/serving_executor.py), and the grammar
    # compile fork server is one too: both forked now, while this process has one thread (not exec'd later, which
    # imports torch, transformers and xgrammar again: engine/core/grammar_forks.py). The rank first, so it holds no
    # copy of the fork server's socket (the fork server ends when the server closes its end).
    from ..api.serving_executor import choose_serving_executor

    choose_serving_executor(args)
    from ..core.grammar_forks import prefork

    prefork()
    connector = role.connector()  # PD's remote KV plane, or the offload tiers (--kv-offload-*), or None
    if connector is not None:
        args.kv_connector = connector
        describe = getattr(connector, "describe", None)  # what the KV plane listens on, whom it trusts
        if describe is not None:
            print(f"moelink: {describe()}", flush=True)
    args.grammar_prestart = True  # a server's first constrained request must not wait for a compile process start
    from .server import serve  # the engine and gRPC: imported once every flag is checked (a refusal is at once)

    return serve(args, config)


def _stats(ns: argparse.Namespace) -> int:
    """Fetch the raw expert-load counts from a running server (the ExpertLoad RPC) and print/save them."""
    import json

    import grpc

    from .gen import moelink_v1_pb2 as pb
    from .gen import moelink_v1_pb2_grpc as pb_grpc

    from .client import open_channel

    channel, metadata = open_channel(ns.target, ns.tls_ca, ns.api_key)
    with channel:
        try:
            r = pb_grpc.GenerationStub(channel).ExpertLoad(pb.ExpertLoadRequest(), timeout=ns.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise ValueError(f"target={ns.target!r}: {exc.code().name}: {exc.details()}") from None
    load = {"moe_layers": list(r.moe_layers), "num_experts": r.num_experts, "top_k": r.top_k,
            "world_size": r.world_size, "tokens_per_expert": [list(row.tokens_per_expert) for row in r.layers],
            "experts_on_ranks": [list(x.experts) for x in r.experts_on_ranks],
            "bytes_dispatched": r.bytes_dispatched, "bytes_combined": r.bytes_combined, "steps": r.steps}
    if r.placement_per_layer:  # online EPLB: the current per-layer placement and its counters
        load["placement_per_layer"] = [[list(x.experts) for x in layer.experts_on_ranks]
                                       for layer in r.placement_per_layer]
        load["eplb"] = {"rebalances": r.eplb_rebalances, "bytes_moved": r.eplb_bytes_moved,
                        "imbalance_before": r.eplb_imbalance_before, "imbalance_after": r.eplb_imbalance_after}
    text = json.dumps(load, indent=2)
    if ns.out:
        with open(ns.out, "w") as f:
            f.write(text)
        total = sum(map(sum, load["tokens_per_expert"]))
        print(f"wrote {ns.out}: {len(load['moe_layers'])} MoE layers x {load['num_experts']} experts, "
              f"{total} routed (token, expert) pairs")
    else:
        print(text)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over gRPC (moelink.v1 and vllm.grpc.engine.VllmEngine)")
    add_engine_args(p)
    add_server_args(p)
    add_gateway_flags(add_vllm_server_flags(p))  # vLLM's flags the OpenAI HTTP gateway reads, in their group
    add_refused_flags(p)  # last: a flag moelink takes itself is never refused
    p.set_defaults(func=_serve)

    from .gateway import front_cli  # http-front: the HTTP front before a gateway started by hand

    front_cli.register_cli(subparsers)
    st = subparsers.add_parser("stats", help="raw expert-load counts of a running server (JSON)")
    st.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of `moelink serve`")
    st.add_argument("--api-key", default=os.environ.get("MOELINK_API_KEY"))
    st.add_argument("--tls-ca", default=None, help="PEM of the CA (or self-signed cert) to trust: use TLS")
    st.add_argument("--timeout", type=float, default=30.0)
    st.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    st.set_defaults(func=_stats)

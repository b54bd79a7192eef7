"""`vllm serve`'s flags on moelink's subcommands: what a launch script written for vLLM means here.

Each flag of `vllm serve` that has a meaning in moelink is accepted under vLLM's name with vLLM's meaning
(moelink's own names stay as aliases: `--expert-parallel-size` beside `--data-parallel-size
--enable-expert-parallel`, `--role` / `--kv-*` beside `--kv-transfer-config`); every other flag vLLM documents
is refused with one line saying what to use instead, so a script never runs with a flag silently ignored.
docs/vllm-compat.md holds the table, flag by flag, and tests/api/test_vllm_flags.py walks it.

`--port` is the one name with another meaning: moelink's front is gRPC (`--port`, as in SGLang's gRPC mode) and
the OpenAI HTTP API is `--http-port` (default 8000, vLLM's `--port` default); both help texts say so.
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Optional

from .smg_parsers import check_parser_name

# -- refused flags -------------------------------------------------------------------------------------------
# vLLM flag -> what to use instead. Spelled as `vllm serve --help` spells them; a short alias beside its flag.
REFUSED: dict[tuple[str, ...], str] = {
    ("--pipeline-parallel-size", "-pp"): "moelink runs no pipeline parallelism: add ranks with --data-parallel-size N "
                                        "--enable-expert-parallel (Ray beyond one rank)",
    ("--data-parallel-size-local", "-dpl"): "moelink places its ranks with Ray: --ray-address joins a cluster",
    ("--data-parallel-address", "-dpa"): "moelink places its ranks with Ray: --ray-address joins a cluster",
    ("--data-parallel-rpc-port", "-dpp"): "moelink places its ranks with Ray: --ray-address joins a cluster",
    ("--data-parallel-start-rank", "-dpr"): "moelink places its ranks with Ray: --ray-address joins a cluster",
    ("--headless",): "moelink places its ranks with Ray: start the other nodes with `ray start --address ...`",
    ("--distributed-executor-backend",): "moelink picks it: in-process at one rank, Ray beyond (--ray-address)",
    ("--swap-space",): "moelink preempts by recompute and never swaps KV to the CPU: leave it out",
    ("--cpu-offload-gb",): "moelink keeps every weight on the device: add ranks with --data-parallel-size",
    ("--enable-lora", "--lora-modules", "--max-loras", "--max-lora-rank"): "LoRA adapters are not supported: "
                                                                           "serve a checkpoint with merged weights",
    ("--ssl-keyfile",): "TLS is on the gRPC port: --tls-key (put a TLS proxy in front of --http-port)",
    ("--ssl-certfile",): "TLS is on the gRPC port: --tls-cert (put a TLS proxy in front of --http-port)",
    ("--tokenizer-mode",): "moelink reads tokenizer.json (or a tiktoken file) with `tokenizers`: leave it out",
    ("--enable-prompt-tokens-details",): "usage.prompt_tokens_details.cached_tokens is always reported: leave it out",
    ("--enable-sleep-mode",): "not supported: stop the server to free the device",
    ("--structured-outputs-config", "--guided-decoding-backend"): "moelink compiles grammars with xgrammar: bound "
                                                                  "it with --grammar-compile-timeout / "
                                                                  "--grammar-compile-workers",
    ("--compilation-config", "-O"): "moelink runs its own Triton kernels: --enforce-eager / --cuda-graph-sizes",
    ("--max-seq-len-to-capture",): "use --cuda-graph-sizes (decode batch sizes captured)",
    ("--scheduling-policy",): "moelink serves first come, first served, shared fairly among clients: "
                              "--client-fairness / --no-client-fairness",
    ("--max-num-partial-prefills", "--long-prefill-token-threshold"): "prefill chunks are bounded by "
                                                                      "--max-num-batched-tokens",
    ("--preemption-mode",): "moelink preempts by recompute only: leave it out",
    ("--rope-scaling", "--rope-theta", "--hf-overrides"): "moelink reads the model's config.json as published: "
                                                          "edit it in a copy of the checkpoint",
    ("--limit-mm-per-prompt", "--mm-processor-kwargs"): "moelink serves text models: leave it out",
    ("--otlp-traces-endpoint",): "not supported: use --log-format json (request ids on every line) and /metrics",
    ("--uds",): "moelink listens on TCP: --host / --http-host",
    ("--root-path",): "not supported: put a proxy in front of --http-port",
    ("--allowed-origins", "--allowed-methods", "--allowed-headers", "--allow-credentials"): "no CORS: put a proxy "
                                                                                           "in front of --http-port",
    ("--api-server-count",): "one front per server: start more servers (or more ranks)",
    ("--response-role",): "the assistant role is the chat template's: leave it out",
    ("--return-tokens-as-token-ids",): "not supported: ask the gRPC services for token ids",
    ("--enable-log-outputs",): "not supported: request lines carry ids and token counts (--log-format json)",
    ("--speculative-model", "--num-speculative-tokens"): "use --speculative-config JSON, as vLLM now spells it",
    ("--config-format", "--load-format-options"): "moelink reads config.json: leave it out",
    ("--pt-load-timeout",): "moelink reads safetensors only: leave it out",
}


class _Refused(argparse.Action):
    """A vLLM flag moelink does not take: the parse stops with one line saying what to use instead. It takes
    an optional value so `--swap-space 4` reads as one flag, not as a stray argument."""

    def __init__(self, option_strings, dest, instead: str = "", **kw):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.instead = instead

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} (a `vllm serve` flag) is not supported by moelink: {self.instead}.")


def add_refused_flags(p: argparse.ArgumentParser) -> None:
    known = set(p._option_string_actions)  # a flag the parser (or another engineer's edit) already takes wins
    for flags, instead in REFUSED.items():
        free = [f for f in flags if f not in known]
        if free:
            p.add_argument(*free, action=_Refused, instead=instead)


# -- --kv-cache-dtype ----------------------------------------------------------------------------------------
KV_CACHE_DTYPE_CHOICES = ("auto", "fp8", "fp8_e4m3")


def kv_cache_dtype_flag(value: str) -> str:
    """argparse type of --kv-cache-dtype: vLLM's fp8_e5m2 is refused saying why (the fp8 KV path stores e4m3
    with a per-layer scale; no kernel reads e5m2)."""
    if value == "fp8_e5m2":
        raise argparse.ArgumentTypeError("fp8_e5m2 is not supported: moelink's fp8 KV cache stores e4m3 values "
                                         "with a per-layer scale and no attention kernel reads e5m2; use "
                                         "--kv-cache-dtype fp8 (= fp8_e4m3)")
    if value not in KV_CACHE_DTYPE_CHOICES:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(KV_CACHE_DTYPE_CHOICES)})")
    return value


# -- accepted engine flags (generate and serve) ---------------------------------------------------------------
def add_vllm_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM's names (docs/vllm-compat.md)")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=None, metavar="N",
                   help="with --enable-expert-parallel: N ranks, attention data-parallel and the experts sharded "
                        "over them (= --expert-parallel-size N); moelink's ranks always shard the experts")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="shard the experts over the --data-parallel-size ranks (always so in moelink)")
    # vLLM's positive spelling; moelink's --no-enable-prefix-caching turns it off (default on: nothing to set).
    g.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true",
                   default=argparse.SUPPRESS, help="on by default (--no-enable-prefix-caching: off)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM's scripts, and does nothing: moelink never runs code from a checkpoint "
                        "(its configs and tokenizers are read as data)")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="accepted when it names the model itself; moelink reads the tokenizer from the checkpoint "
                        "directory (copy tokenizer files there to serve another)")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="accepted: moelink always chunks prompts longer than --max-num-batched-tokens; "
                        "--no-enable-chunked-prefill is refused")
    g.add_argument("--generation-config", default="auto",
                   help="auto (the only value taken): moelink reads the checkpoint's generation_config.json "
                        "(its EOS ids); sampling defaults come from each request")


def apply_vllm_engine_flags(ns: argparse.Namespace) -> None:
    """Fold vLLM's spellings into moelink's fields of `ns`; ValueError names the flag."""
    dp = ns.data_parallel_size
    if dp is not None:
        if dp < 1:
            raise ValueError(f"--data-parallel-size={dp} is invalid: must be a positive integer.")
        if dp > 1 and not ns.enable_expert_parallel:
            raise ValueError(f"--data-parallel-size={dp} without --enable-expert-parallel is invalid: moelink's "
                             "ranks always shard the experts (vLLM's replicas with experts each are N servers here); "
                             "add --enable-expert-parallel.")
        # vLLM's expert-parallel group is every rank, DP x TP; moelink's --expert-parallel-size is that world.
        world = dp * getattr(ns, "tensor_parallel_size", 1)
        if ns.expert_parallel_size not in (1, world):
            raise ValueError(f"--data-parallel-size={dp} and --expert-parallel-size={ns.expert_parallel_size} "
                             f"disagree: give one of them (the ranks are data-parallel size x tensor-parallel size "
                             f"= {world}).")
        ns.expert_parallel_size = world
    elif ns.enable_expert_parallel and getattr(ns, "tensor_parallel_size", 1) > 1 and ns.expert_parallel_size == 1:
        # vLLM's -tp N --enable-expert-parallel: the experts in EP over the TP group's N ranks (EP = DP x TP, DP 1),
        # not split by intermediate size as -tp N alone splits them (docs/tensor-parallelism.md).
        ns.expert_parallel_size = ns.tensor_parallel_size
    if ns.enable_chunked_prefill is False:
        raise ValueError("--no-enable-chunked-prefill is not supported: moelink always chunks prompts longer than "
                         "--max-num-batched-tokens; set --max-num-batched-tokens to --max-model-len to prefill "
                         "prompts whole.")
    if ns.generation_config != "auto":
        raise ValueError(f"--generation-config={ns.generation_config!r} is not supported: moelink takes auto only "
                         "(the checkpoint's generation_config.json); pass sampling parameters per request.")
    if ns.tokenizer is not None and not _same_path(ns.tokenizer, ns.model):
        raise ValueError(f"--tokenizer={ns.tokenizer!r} is not supported: moelink reads the tokenizer from the "
                         f"checkpoint ({ns.model!r}); copy the tokenizer files into a copy of it instead.")


def _same_path(a: str, b: str) -> bool:
    import os

    return a == b or os.path.realpath(a) == os.path.realpath(b)


# -- accepted server flags (serve) ----------------------------------------------------------------------------
def add_vllm_server_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM's names, server side (docs/vllm-compat.md)")
    g.add_argument("--kv-transfer-config", default=None, metavar="JSON",
                   help="prefill/decode disaggregation as vLLM spells it: '{\"kv_connector\": \"MoelinkConnector\", "
                        "\"kv_role\": \"kv_producer\" | \"kv_consumer\" | \"kv_both\", \"kv_port\": N, "
                        "\"kv_connector_extra_config\": {\"transport\": \"tcp\", ...}}' (= --role and the --kv-* "
                        "flags; docs/vllm-compat.md)")
    g.add_argument("--seed", dest="engine_seed", type=int, default=None, metavar="N",
                   help="make sampling reproducible across runs: a request without a seed of its own samples with "
                        "one drawn from this seed and its arrival order (default: none, random)")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="no 'request admitted' / 'request finished' log lines")
    g.add_argument("--chat-template", default=None, metavar="PATH",
                   help="a Jinja chat template file for the OpenAI API's chats (given to the managed gateway, which "
                        "renders them; default: the checkpoint's); checked before the weights load: a regular file "
                        "of at most 1 MiB, UTF-8, that compiles with jinja2 (a path, not an inline template)")
    g.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="the managed gateway's tool-call parser (smg's names: deepseek, kimik2, qwen, glm45_moe, "
                        "minimax_m2, ...; vLLM's where they differ: hermes, kimi_k2, glm45, deepseek_v3, openai "
                        "for gpt-oss, ...): tool_calls in chat responses")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted with --tool-call-parser (the gateway parses tool calls whenever a parser is set)")
    g.add_argument("--reasoning-parser", default=None, metavar="NAME",
                   help="the managed gateway's reasoning parser (smg's names: deepseek_r1, qwen3, glm45, kimi, "
                        "minimax, ...; vLLM's where they differ: kimi_k2, minimax_m2, openai_gptoss for gpt-oss): "
                        "reasoning_content split out of chat responses")


# vLLM's kv_role -> moelink's --role.
KV_ROLES = {"kv_producer": "prefill", "kv_consumer": "decode", "kv_both": "both"}
KV_CONNECTOR = "MoelinkConnector"
# kv_connector_extra_config keys -> the --kv-* flag (namespace field) each sets.
KV_EXTRA = {"transport": "kv_transport", "host": "kv_host", "advertise_host": "kv_advertise_host",
            "ttl": "kv_ttl", "max_saved_bytes": "kv_max_saved_bytes", "fetch_timeout": "kv_fetch_timeout",
            "secret_file": "kv_secret_file", "peers": "kv_peers", "connect_timeout": "kv_connect_timeout",
            "first_byte_timeout": "kv_first_byte_timeout", "max_loads": "kv_max_loads",
            "max_loads_per_source": "kv_max_loads_per_source"}
KV_TOP = {"kv_connector", "kv_role", "kv_connector_extra_config", "kv_ip", "kv_port"}


def apply_kv_transfer_config(ns: argparse.Namespace) -> None:
    """--kv-transfer-config onto --role and the --kv-* fields of `ns`; ValueError names the key."""
    text = ns.kv_transfer_config
    if text is None:
        return
    flag = "--kv-transfer-config"
    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{flag} is not valid JSON ({exc}).") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{flag} must be a JSON object with kv_connector and kv_role.")
    unknown = sorted(set(cfg) - KV_TOP)
    if unknown:
        raise ValueError(f"{flag}: {unknown[0]} is not supported: moelink takes {', '.join(sorted(KV_TOP))}.")
    connector = cfg.get("kv_connector")
    if connector != KV_CONNECTOR:
        raise ValueError(f"{flag}: kv_connector={connector!r} is not supported: moelink moves KV with its own "
                         f"connector: \"kv_connector\": \"{KV_CONNECTOR}\" (transport in kv_connector_extra_config: "
                         "tcp, shm or collective).")
    role = cfg.get("kv_role")
    if role not in KV_ROLES:
        raise ValueError(f"{flag}: kv_role={role!r} is invalid: must be one of {', '.join(KV_ROLES)}.")
    if ns.role not in ("both", KV_ROLES[role]):
        raise ValueError(f"{flag}: kv_role={role!r} and --role {ns.role} disagree: give one of them.")
    ns.role = KV_ROLES[role]
    if "kv_port" in cfg:
        ns.kv_port = _int(flag, "kv_port", cfg["kv_port"])
    if "kv_ip" in cfg:
        ns.kv_host = str(cfg["kv_ip"])
    extra = cfg.get("kv_connector_extra_config") or {}
    if not isinstance(extra, dict):
        raise ValueError(f"{flag}: kv_connector_extra_config must be a JSON object.")
    for key, value in extra.items():
        if key not in KV_EXTRA:
            raise ValueError(f"{flag}: kv_connector_extra_config.{key} is not supported: moelink takes "
                             f"{', '.join(KV_EXTRA)}.")
        setattr(ns, KV_EXTRA[key], value)
    if ns.role == "prefill" and ns.kv_port is None:
        raise ValueError(f"{flag}: kv_role kv_producer needs kv_port (the first port this prefill server serves "
                         "its saved KV on).")


def _int(flag: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{flag}: {key}={value!r} is invalid: must be an integer.")
    return value


# vLLM's parser names where smg (1.13, its default "legacy" parsers) spells the same format otherwise; smg's own
# names pass through. None: gpt-oss, which smg reads in its built-in Harmony pipeline (it picks a GptOssForCausalLM
# worker by its architecture) with no parser flag: smg has none for harmony, and refuses `openai`.
VLLM_TOOL_CALL_PARSERS = {"openai": None, "hermes": "qwen", "kimi_k2": "kimik2", "glm45": "glm45_moe",
                          "deepseek_v3": "deepseek", "deepseek_v31": "deepseek31", "qwen3_coder": "qwen_coder",
                          "qwen3_xml": "qwen_xml", "llama3_json": "llama"}
VLLM_REASONING_PARSERS = {"openai_gptoss": None, "kimi_k2": "kimi", "minimax_m2": "minimax",
                          "minimax_m2_append_think": "minimax"}


def gateway_args(ns: argparse.Namespace) -> tuple[str, ...]:
    """The managed gateway's (smg) command-line arguments these flags ask for (vLLM's parser names as smg's)."""
    if ns.enable_auto_tool_choice and ns.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (which parser reads the model's tool "
                         "calls).")
    args: list[str] = []
    tool_call = VLLM_TOOL_CALL_PARSERS.get(ns.tool_call_parser, ns.tool_call_parser)
    reasoning = VLLM_REASONING_PARSERS.get(ns.reasoning_parser, ns.reasoning_parser)
    # Against smg's own registry now, not when smg starts after the weights have loaded (smg_parsers.py).
    check_parser_name("--tool-call-parser", ns.tool_call_parser, tool_call, "tool_call", VLLM_TOOL_CALL_PARSERS)
    check_parser_name("--reasoning-parser", ns.reasoning_parser, reasoning, "reasoning", VLLM_REASONING_PARSERS)
    for flag, value in (("--tool-call-parser", tool_call), ("--reasoning-parser", reasoning),
                        ("--chat-template", ns.chat_template)):
        if value is not None:
            args += [flag, value]
    return tuple(args)


class RequestLogFilter(logging.Filter):
    """--disable-log-requests: drops the per-request lines, keeps refusals and failures."""

    DROPPED = ("request admitted", "request finished")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.DROPPED


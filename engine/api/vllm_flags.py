"""`vllm serve`'s flags on moelink's subcommands: what a launch script written for vLLM means here.

Every flag of `vllm serve --help` (vLLM 0.33.0), and the flags of earlier releases scripts still carry, is in the
table of engine/api/vllm_flag_table.py: accepted with vLLM's meaning, mapped onto the moelink flag that does the
same, or refused with one line saying what to use instead, so a script never runs with a flag silently ignored.
This module registers the table's flags on the parsers (help texts from the table) and folds vLLM's spellings
into moelink's fields; docs/vllm-compat.md prints the table and tests/engine/test_vllm_flag_table.py walks it.
The flags the OpenAI HTTP gateway reads (the rows marked http_gateway) are the server's to register: the gateway
package (engine/server/gateway/options.py) adds them to add_vllm_server_flags's group.

`--port` is the one name with another meaning: moelink's front is gRPC (`--port`, as in SGLang's gRPC mode) and
the OpenAI HTTP API is `--http-port` (default 8000, vLLM's `--port` default); both help texts say so.

Nothing here imports torch: `moelink serve --help`, and a refused flag, answer at once.
"""
from __future__ import annotations

import argparse
import json
import logging
import re

from .vllm_flag_table import ALL_FLAGS, row


class _Refused(argparse.Action):
    """A vLLM flag moelink does not take: the parse stops with one line saying what to use instead (no usage
    dump). It takes an optional value so `--swap-space 4` reads as one flag, not as a stray argument."""

    def __init__(self, option_strings, dest, instead: str = "", **kw):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.instead = instead

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"{parser.prog}: error: {option_string} (a `vllm serve` flag) is not supported by moelink: "
                       f"{self.instead}.\n")


class _Values(argparse.Action):
    """A vLLM flag moelink takes with some of vLLM's values (those that mean what moelink does anyway); any other
    value stops the parse with one line."""

    def __init__(self, option_strings, dest, values: tuple[str, ...] = (), says: str = "", **kw):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, metavar="{" + ",".join(values) + "}",
                         help=f"{says} (takes {', '.join(values)})")
        self.allowed, self.says = values, says

    def __call__(self, parser, namespace, values, option_string=None):
        if values not in self.allowed:
            parser.exit(2, f"{parser.prog}: error: {option_string}={values!r} is not supported by moelink: "
                           f"{self.says} (it takes {', '.join(self.allowed)}).\n")
        setattr(namespace, self.dest, values)


class _EpShort(argparse.Action):
    """`-ep`: bare, vLLM's --enable-expert-parallel; with a number, moelink's --expert-parallel-size N."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs="?", type=int, default=argparse.SUPPRESS, metavar="N",
                         help=row("-ep").says)

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            namespace.enable_expert_parallel = True
        else:
            namespace.expert_parallel_size = values


class OneValue(argparse.Action):
    """A flag vLLM takes several values of and moelink one: several stop the parse with one line."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs="+", **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > 1:
            parser.exit(2, f"{parser.prog}: error: {option_string} with {len(values)} values is not supported by "
                           f"moelink: it takes one.\n")
        setattr(namespace, self.dest, values[0])


def add_refused_flags(p: argparse.ArgumentParser) -> None:
    """The table's refused flags, each a _Refused action."""
    known = set(p._option_string_actions)  # a flag the parser (or another engineer's edit) already takes wins
    for flags, f in ALL_FLAGS.items():
        free = [s for s in flags if s not in known]
        if f.kind == "refused" and free:
            p.add_argument(*free, action=_Refused, instead=f.says)


def _add(g, *spellings: str, **kw) -> None:
    """A vLLM flag of the table, its help text the table's (a spelling not in the table is a KeyError: the code
    cannot take a vLLM flag the table does not list)."""
    says = row(spellings[0]).says
    for s in spellings:
        row(s)
    if kw.get("action") is _Values:
        kw.update(values=row(spellings[0]).values, says=says)
    else:
        kw.setdefault("help", says)
    g.add_argument(*spellings, **kw)


# -- values as vLLM reads them ---------------------------------------------------------------------------------
_HUMAN = re.compile(r"(\d+(?:\.\d+)?)([kmgtKMGT]?)")
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_int(value: str) -> int:
    """argparse type of vLLM's sizes: 1k = 1000, 1K = 1024, 25.6k = 25600 (no decimals with K/M/G/T)."""
    m = _HUMAN.fullmatch(value.strip())
    if m is None or ("." in m.group(1) and m.group(2) not in _DECIMAL):
        raise argparse.ArgumentTypeError(f"invalid value: {value!r} (an integer, or with k/m/g/t = 1000^n or "
                                         "K/M/G/T = 1024^n)")
    number, suffix = m.groups()
    return int(float(number) * _DECIMAL[suffix]) if suffix in _DECIMAL else int(number) * _BINARY.get(suffix, 1)


def max_model_len_flag(value: str) -> int:
    """argparse type of --max-model-len: human_int, and vLLM's `auto` / -1 as -1 for apply_vllm_engine_flags to
    refuse in one line."""
    return -1 if value.strip() in ("-1", "auto") else human_int(value)


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
    _add(g, "--disable-expert-parallel", dest="enable_expert_parallel", action="store_false", default=argparse.SUPPRESS)
    _add(g, "-ep", action=_EpShort, dest="expert_parallel_size")
    # vLLM's positive spelling; moelink's --no-enable-prefix-caching turns it off (default on: nothing to set).
    g.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true",
                   default=argparse.SUPPRESS, help="on by default (--no-enable-prefix-caching: off)")
    _add(g, "--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)  # and --no-
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="accepted when it names the model itself; moelink reads the tokenizer from the checkpoint "
                        "directory (copy tokenizer files there to serve another)")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="accepted: moelink always chunks prompts longer than --max-num-batched-tokens; "
                        "--no-enable-chunked-prefill is refused")
    g.add_argument("--generation-config", default="auto",
                   help="auto (default): the checkpoint's generation_config.json gives the sampling fields a request "
                        "leaves out (temperature, top_p, top_k, min_p, repetition_penalty), as vLLM; vllm: "
                        "SamplingParams' own defaults")
    _add(g, "--use-tqdm-on-load", action=argparse.BooleanOptionalAction, default=True)  # and --no-
    _add(g, "--enable-dbo", dest="enable_two_batch_overlap", action="store_true", default=argparse.SUPPRESS)
    _add(g, "--disable-dbo", dest="enable_two_batch_overlap", action="store_false", default=argparse.SUPPRESS)
    _add(g, "--enable-eplb", action="store_true")
    _add(g, "--disable-eplb", dest="enable_eplb", action="store_false", default=argparse.SUPPRESS)
    _add(g, "--eplb-config", default=None, metavar="JSON")
    _add(g, "--spec-method", default=None, metavar="METHOD")
    _add(g, "--spec-model", default=None, metavar="PATH")
    _add(g, "--spec-tokens", type=int, default=None, metavar="N")
    _add(g, "--distributed-executor-backend", dest="distributed_executor_backend", action=_Values)
    for values in ("--runner", "--convert", "--tokenizer-mode", "--config-format", "--model-impl", "--logprobs-mode",
                   "--expert-placement-strategy", "--prefix-caching-hash-algo", "--stream-interval"):
        _add(g, values, action=_Values)
    # Accepted, and nothing to do: what they ask for is what moelink does anyway (the table says why).
    for no_op in (("--disable-cascade-attn", "--enable-cascade-attn"), ("--enable-ep-weight-filter",),
                  ("--no-language-model-only",), ("--disable-log-stats",)):
        _add(g, *no_op, dest=f"vllm_{no_op[0][2:].replace('-', '_')}", action="store_true",
             default=argparse.SUPPRESS)
    _add(g, "--mamba-cache-mode", default=argparse.SUPPRESS, metavar="MODE")
    _add(g, "--lora-dtype", default=None, metavar="DTYPE")
    # vLLM's text-only switch: images off (= --limit-mm-per-prompt image=0).
    _add(g, "--language-model-only", dest="limit_mm_per_prompt", action="store_const",
         const={"image": 0, "video": 0}, default=argparse.SUPPRESS)


# vLLM's EPLBConfig keys moelink takes (others are refused by name), and its default step_interval.
EPLB_KEYS = ("step_interval", "num_redundant_experts", "window_size", "policy")
VLLM_EPLB_STEP_INTERVAL = 3000


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
    if ns.generation_config not in ("auto", "vllm"):
        raise ValueError(f"--generation-config={ns.generation_config!r} is not supported: moelink takes auto (the "
                         "checkpoint's generation_config.json) or vllm (SamplingParams' defaults), not a folder.")
    if ns.tokenizer is not None and not _same_path(ns.tokenizer, ns.model):
        raise ValueError(f"--tokenizer={ns.tokenizer!r} is not supported: moelink reads the tokenizer from the "
                         f"checkpoint ({ns.model!r}); copy the tokenizer files into a copy of it instead.")
    lora_dtype = getattr(ns, "lora_dtype", None)
    if lora_dtype not in (None, "auto") and lora_dtype != getattr(ns, "dtype", None):
        raise ValueError(f"--lora-dtype={lora_dtype!r} is not supported: adapters run in the model's dtype (--dtype "
                         f"{getattr(ns, 'dtype', 'auto')}); give auto or leave it out.")
    if ns.max_model_len == -1:
        raise ValueError("--max-model-len auto (or -1) is not supported: moelink serves the model's "
                         "max_position_embeddings when the flag is left out, or the number given.")
    _apply_eplb(ns)
    _apply_spec(ns)
    _apply_executor(ns)


_VLLM_EXECUTORS = {"mp": "mp", "uni": "inprocess", "ray": "ray"}


def _apply_executor(ns: argparse.Namespace) -> None:
    """vLLM's --distributed-executor-backend as moelink's --executor (both given: they must agree). vLLM's `mp`
    beyond one rank (its default on a multi-GPU node) is moelink's own choice there, Ray's ranks."""
    backend = getattr(ns, "distributed_executor_backend", None)
    if backend is None:
        return
    kind = _VLLM_EXECUTORS[backend]
    if kind == "mp" and max(ns.expert_parallel_size, getattr(ns, "tensor_parallel_size", 1)) > 1:
        kind = "auto"
    if getattr(ns, "executor", "auto") not in ("auto", kind):
        raise ValueError(f"--distributed-executor-backend={backend} and --executor={ns.executor} disagree: give one "
                         "of them.")
    ns.executor = kind

def _apply_eplb(ns: argparse.Namespace) -> None:
    """--enable-eplb / --eplb-config (vLLM's EPLBConfig JSON) onto --eplb-interval and --num-redundant-experts."""
    text = ns.eplb_config
    if text is not None and not ns.enable_eplb:
        raise ValueError("--eplb-config without --enable-eplb is invalid: it configures the load balancing "
                         "--enable-eplb turns on (add it).")
    if not ns.enable_eplb:
        return
    cfg = {}
    if text is not None:
        try:
            cfg = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"--eplb-config is not valid JSON ({exc}).") from None
        if not isinstance(cfg, dict):
            raise ValueError("--eplb-config must be a JSON object (vLLM's EPLBConfig).")
        for key in cfg:
            if key not in EPLB_KEYS:
                raise ValueError(f"--eplb-config: {key} is not supported: moelink takes {', '.join(EPLB_KEYS)}.")
    interval = cfg.get("step_interval", ns.eplb_interval or VLLM_EPLB_STEP_INTERVAL)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"--eplb-config: step_interval={interval!r} is invalid: must be a positive integer.")
    if ns.eplb_interval not in (0, interval):
        raise ValueError(f"--eplb-config step_interval {interval} and --eplb-interval {ns.eplb_interval} disagree: "
                         "give one of them.")
    window = cfg.get("window_size", interval)
    if window != interval:
        raise ValueError(f"--eplb-config: window_size={window!r} is not supported: moelink balances on the load of "
                         f"the whole interval; leave it out or set it to step_interval ({interval}).")
    if cfg.get("policy", "default") != "default":
        raise ValueError(f"--eplb-config: policy={cfg['policy']!r} is not supported: moelink's own placement "
                         "(\"default\").")
    redundant = cfg.get("num_redundant_experts", ns.num_redundant_experts)
    if isinstance(redundant, bool) or not isinstance(redundant, int) or redundant < 0:
        raise ValueError(f"--eplb-config: num_redundant_experts={redundant!r} is invalid: must be an integer >= 0.")
    if ns.num_redundant_experts not in (0, redundant):
        raise ValueError(f"--eplb-config num_redundant_experts {redundant} and --num-redundant-experts "
                         f"{ns.num_redundant_experts} disagree: give one of them.")
    ns.eplb_interval, ns.num_redundant_experts = interval, redundant


def _apply_spec(ns: argparse.Namespace) -> None:
    """vLLM's --spec-method / --spec-model / --spec-tokens as the --speculative-config JSON."""
    given = {k: v for k, v in (("method", ns.spec_method), ("model", ns.spec_model),
                               ("num_speculative_tokens", ns.spec_tokens)) if v is not None}
    if not given:
        return
    if ns.speculative_config is not None:
        raise ValueError("--spec-method / --spec-model / --spec-tokens and --speculative-config are both given: "
                         "give one of them.")
    ns.speculative_config = json.dumps(given)


def _same_path(a: str, b: str) -> bool:
    import os

    return a == b or os.path.realpath(a) == os.path.realpath(b)


# -- accepted server flags (serve) ----------------------------------------------------------------------------
def add_vllm_server_flags(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """vLLM's server flags the server reads itself, in their group of `p`, which is returned: the server adds the
    flags its OpenAI HTTP gateway reads to it (the table's rows marked http_gateway)."""
    g = p.add_argument_group("vLLM's names, server side (docs/vllm-compat.md)")
    g.add_argument("--kv-transfer-config", default=None, metavar="JSON",
                   help="prefill/decode disaggregation (or the KV offload tier) as vLLM spells it: "
                        "'{\"kv_connector\": \"NixlConnector\" | \"MoelinkConnector\" | ..., \"kv_role\": "
                        "\"kv_producer\" | \"kv_consumer\" | \"kv_both\", \"kv_port\": N, "
                        "\"kv_connector_extra_config\": {...}}' (= --role and the --kv-* flags; docs/vllm-compat.md)")
    _add(g, "--kv-offloading-size", type=float, default=None, metavar="GIB")
    _add(g, "--kv-offloading-backend", action=_Values)
    g.add_argument("--seed", dest="engine_seed", type=int, default=None, metavar="N",
                   help="make sampling reproducible across runs: a request without a seed of its own samples with "
                        "one drawn from this seed and its arrival order (default: none, random)")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="no 'request admitted' / 'request finished' log lines")
    _add(g, "--enable-log-requests", dest="disable_log_requests", action="store_false", default=argparse.SUPPRESS)
    _add(g, "--max-log-len", type=int, default=argparse.SUPPRESS, metavar="N")
    _add(g, "--enable-log-outputs", dest="enable_log_outputs", action="store_true", default=False)
    _add(g, "--disable-log-outputs", dest="enable_log_outputs", action="store_false", default=argparse.SUPPRESS)
    _add(g, "--return-tokens-as-token-ids", action=argparse.BooleanOptionalAction, default=False)  # and --no-
    _add(g, "--enable-prompt-tokens-details", dest="vllm_enable_prompt_tokens_details", action="store_true",
         default=argparse.SUPPRESS)
    _add(g, "--uvicorn-log-level", action=_Values, dest="uvicorn_log_level")
    _add(g, "--disable-uvicorn-access-log", dest="vllm_disable_uvicorn_access_log", action="store_true",
         default=argparse.SUPPRESS)
    return g


# vLLM's --uvicorn-log-level values -> Python's logging levels (uvicorn's "trace" is below DEBUG: DEBUG here).
UVICORN_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
                  "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG}


class RequestLogFilter(logging.Filter):
    """--disable-log-requests: drops the per-request lines, keeps refusals and failures."""

    DROPPED = ("request admitted", "request finished")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.DROPPED
